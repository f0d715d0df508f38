# Meridian: one image, every role (`meridian edge|dns|origin|demo|check ...`).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc is only needed while wheels build for platforms without binary wheels; removed afterwards.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meridian ./meridian
COPY edge ./edge
COPY geodns ./geodns
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install . \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* /src

COPY config/global.yaml /etc/meridian/global.yaml
RUN useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin meridian
USER meridian
WORKDIR /

# Edge 8080, edge admin 9100, GeoDNS 5353 (UDP and TCP), GeoDNS admin 9153.
EXPOSE 8080 9100 5353/udp 5353/tcp 9153
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["meridian"]
CMD ["demo"]
