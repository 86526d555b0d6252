-- One fixed request for the whole run (wrk's fast path: formatted once, no per-request Lua).
--
--   wrk -s fixed.lua URL -- none
--   wrk -s fixed.lua URL -- bearer TOKEN_FILE
--   wrk -s fixed.lua URL -- cookie TOKEN_FILE CLIENT_UAT
--   wrk -s fixed.lua URL -- bearer TOKEN_FILE PACE_MS       (paced: see below)
--
-- The token is the first line of TOKEN_FILE. The cookie form sends `__session=<token>` and
-- `__client_uat=<CLIENT_UAT>` (clerkgate's cookie rule needs 0 < client_uat <= iat).
--
-- Paced form: after every response (and before its first request) each connection waits an
-- exponentially distributed pause with mean PACE_MS (wrk's delay() hook; wrk takes whole
-- milliseconds, so the pause is rounded, which keeps the mean). Each connection is then close
-- to a Poisson source of 1000 / (PACE_MS + latency) requests per second, and C independent ones
-- add up to (very nearly) a Poisson stream of C * 1000 / (PACE_MS + latency) req/s: a steady
-- open-loop-like load while latency stays well under PACE_MS. bench/run.py uses it for the
-- latency-at-half-of-peak measurement.
--
-- Why not a fixed pause: all C connections start together and, with equal pauses and nearly
-- equal service times, stay in step, so requests arrive in bursts of C at once and the p99
-- measures the queue behind a burst (about C x the per-request service time), not the latency
-- at a steady half load. Random pauses spread the arrivals out.
--
-- Every wrk thread has its own Lua state and its own random generator, seeded from the clock
-- and a per-thread number handed out by setup() (which runs in wrk's main Lua state), so the
-- threads do not draw the same pauses.
--
-- Without PACE_MS, init() removes delay(): wrk checks for a global delay function once, after
-- init(), and only then calls into Lua and arms a timer around every request.

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local pace_ms = nil
local threads_seen = 0

function setup(thread)
   threads_seen = threads_seen + 1
   thread:set("bench_thread_id", threads_seen)
end

function init(args)
   for name, value in pairs(bench_extra_headers()) do
      wrk.headers[name] = value
   end
   local mode = args[1] or "none"
   if mode == "bearer" then
      wrk.headers["Authorization"] = "Bearer " .. bench_read_lines(args[2], 1)[1]
      if args[3] then pace_ms = tonumber(args[3]) end
   elseif mode == "cookie" then
      local token = bench_read_lines(args[2], 1)[1]
      wrk.headers["Cookie"] = "__session=" .. token .. "; __client_uat=" .. args[3]
   elseif mode ~= "none" then
      error("unknown mode " .. mode)
   end
   if pace_ms and pace_ms > 0 then
      math.randomseed(os.time() * 1000 + (bench_thread_id or 0) * 7919)
   else
      pace_ms = nil
      delay = nil
   end
end

-- Exponential with mean pace_ms (inverse CDF; math.random() is in [0, 1), so 1 - it is > 0).
function delay()
   return math.floor(-math.log(1 - math.random()) * pace_ms + 0.5)
end
