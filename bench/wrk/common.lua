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
