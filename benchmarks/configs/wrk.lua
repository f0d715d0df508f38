-- wrk script for benchmarks/compare.py: placeholders between double at-signs are filled in per scenario.
-- It prints one machine-readable line at the end (exact percentiles in microseconds), so the
-- runner never parses wrk's human summary.
wrk.method = "@@METHOD@@"
wrk.path = "@@PATH@@"
wrk.body = @@BODY@@
@@HEADERS@@
local unique = @@UNIQUE@@
local varied = @@VARIED@@
local keys = @@KEYS@@
local fill = false
local counter = 0

-- What real clients send: a handful of browsers and SDKs, a session cookie per client, and a
-- request id that is new on every request.  No two requests carry the same header bytes.
local agents = {
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
  "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
  "python-requests/2.32.3",
  "okhttp/4.12.0",
  "ccxt/4.4.40 (+https://github.com/ccxt/ccxt) Node.js/22.11.0",
  "Go-http-client/1.1",
}

local function target()
  if unique then
    -- A unique query per request: every request is a cache miss that reaches the origin.
    return wrk.path .. "?miss=@@RUN_ID@@-" .. counter
  elseif keys > 0 then
    local k = fill and ((counter - 1) % keys) + 1 or math.random(1, keys)
    return wrk.path .. "?k=" .. k
  end
  return wrk.path
end

if unique or varied or keys > 0 then
  request = function()
    counter = counter + 1
    if not varied then
      return wrk.format(nil, target())
    end
    local headers = {}
    for name, value in pairs(wrk.headers) do headers[name] = value end
    headers["User-Agent"] = agents[(counter % #agents) + 1] .. " r/" .. (counter % 997)
    headers["Cookie"] = "session=s" .. (counter % 5003) .. "; theme=dark; _ga=GA1.2." .. counter
    headers["X-Request-Id"] = "@@RUN_ID@@-" .. counter
    return wrk.format(nil, target(), headers)
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
