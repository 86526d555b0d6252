-- Shared by every clerkgate benchmark script: the one machine-readable result line.
--
-- wrk calls done() once, in the main Lua state, with the merged statistics of all threads.
-- `latency:percentile(p)` is in microseconds. bench/run.py parses the line that starts with
-- BENCH_RESULT; wrk's own human summary (printed before it) is kept in the run's log.

function bench_read_lines(path, limit)
   local lines = {}
   local file = assert(io.open(path, "r"), "cannot open " .. path)
   for line in file:lines() do
      if line ~= "" then
         lines[#lines + 1] = line
         if limit and #lines >= limit then break end
      end
   end
   file:close()
   assert(#lines > 0, path .. " has no tokens")
   return lines
end

-- The request shape's extra headers (bench/run.py --shapes realistic): a file of "Name: value"
-- lines named by BENCH_HEADERS_FILE, merged into every request. Empty when unset.
function bench_extra_headers()
   local headers = {}
   local path = os.getenv("BENCH_HEADERS_FILE")
   if path == nil or path == "" then return headers end
   local file = assert(io.open(path, "r"), "cannot open " .. path)
   for line in file:lines() do
      local name, value = line:match("^([^:]+):%s*(.*)$")
      if name then headers[name] = value end
   end
   file:close()
   return headers
end

-- The headers of one request carrying `token`: the shape's extra headers plus the bearer token.
-- (wrk.format uses the table it is given instead of wrk.headers, so merge them here.)
local extra_headers = nil
function bench_with_token(token)
   extra_headers = extra_headers or bench_extra_headers()
   local headers = { ["Authorization"] = "Bearer " .. token }
   for name, value in pairs(extra_headers) do headers[name] = value end
   return headers
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "BENCH_RESULT {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,"
         .. "\"connect_errors\":%d,\"read_errors\":%d,\"write_errors\":%d,"
         .. "\"status_errors\":%d,\"timeouts\":%d,\"mean_us\":%.1f,\"max_us\":%d,"
         .. "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"p999_us\":%d}\n",
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
