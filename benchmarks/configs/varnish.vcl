vcl 4.1;
# Varnish peer for benchmarks/compare.py (placeholders between double at-signs are filled in by
# the runner).  Freshness is the origin's max-age (1 s for ticker, depth and trades), as in
# Meridian, whose demo rules set a TTL only for responses that carry none; grace mirrors their
# stale-while-revalidate (ticker and trades 2 s, depth 1 s).
# Open-source Varnish has no Brotli: it stores gzip (do_gzip) and gunzips for clients that do
# not accept gzip, which is what a Varnish user gets without a vmod.

import std;

backend origin {
    .host = "@@ORIGIN_HOST@@";
    .port = "@@ORIGIN_PORT@@";
    .max_connections = 256;
}

sub vcl_recv {
    if (req.url ~ "^/api/v1/(whoami|orders)" || req.url ~ "^/(ws|_control|healthz)") {
        return (pass);
    }
    # Public market data is the same for every user: what a Varnish operator writes so that
    # browsers' cookies do not turn every request into a pass (the builtin VCL passes them).
    if (req.url ~ "^/api/v1/(ticker|depth|trades|symbols)") {
        unset req.http.Cookie;
    }
}

sub vcl_backend_response {
    if (bereq.url ~ "^/api/v1/depth/") {
        set beresp.grace = 1s;
    } elsif (bereq.url ~ "^/api/v1/(ticker|trades)/") {
        set beresp.grace = 2s;
    } elsif (bereq.url ~ "^/api/v1/symbols") {
        set beresp.grace = 1m;
    }
    if (beresp.http.Content-Type ~ "json" && std.integer(beresp.http.Content-Length, 0) >= 256) {
        set beresp.do_gzip = true;
    }
}

sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}
