-- wrk script for benchmarks/compare.py: placeholders between double at-signs are filled in per scenario.
-- It prints one machine-readable line at the end (exact percentiles in microseconds), so the
-- runner never parses wrk's human summary.
wrk.method = "GET"
wrk.path = "@@PATH@@"
@@HEADERS@@
local unique = @@UNIQUE@@
local counter = 0

if unique then
  -- A unique query per request: every request is a cache miss that reaches the origin.
  request = function()
    counter = counter + 1
    return wrk.format(nil, wrk.path .. "?miss=@@RUN_ID@@-" .. counter)
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,' ..
    '"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
