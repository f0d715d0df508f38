# Meridian: one image, every role (`meridian edge|dns|serve|origin|demo|check ...`).
#
# Build it with scripts/build-image.sh: it collects Meridian's wheel and its dependencies' wheels
# (binary wheels only) into the build context's wheels/ directory, so the build itself needs no
# network and no compiler, and runs `buildah bud`.  `--context DIR` only writes the context (this
# file included), for `docker build DIR` or another builder.
#
# BASE must have python3 with its venv module (Debian: python3 + python3-venv) and useradd.
# scripts/image-base.sh makes one from Debian's packages (debootstrap) where no registry is
# reachable.
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS build
COPY wheels/ /tmp/wheels/
# A venv, not the system interpreter (PEP 668).  pip leaves with the build stage: the final image
# gets the venv's packages and no installer.
RUN python3 -m venv /opt/meridian \
 && /opt/meridian/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels meridian \
 && /opt/meridian/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
COPY --from=build /opt/meridian /opt/meridian
COPY config/global.yaml /etc/meridian/global.yaml
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin meridian
# Bytecode was compiled at install time; the root filesystem may be read-only at run time.
ENV PATH=/opt/meridian/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MERIDIAN_HEALTHCHECK_URL=http://127.0.0.1:9100/healthz
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /

# Edge 8080, edge admin 9100, GeoDNS 5353 (UDP and TCP), GeoDNS admin 9153: the demo's ports.
EXPOSE 8080 9100 5353/udp 5353/tcp 9153
# The edge admin listener's /healthz (503 while draining); MERIDIAN_HEALTHCHECK_URL moves it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MERIDIAN_HEALTHCHECK_URL'], timeout=2).close()"]
ENTRYPOINT ["meridian"]
CMD ["demo"]
