-- One fixed request for the whole run (wrk's fast path: formatted once, no per-request Lua).
--
--   wrk -s fixed.lua URL -- none
--   wrk -s fixed.lua URL -- bearer TOKEN_FILE
--   wrk -s fixed.lua URL -- cookie TOKEN_FILE CLIENT_UAT
--   wrk -s fixed.lua URL -- bearer TOKEN_FILE DELAY_MS      (paced: see below)
--
-- The token is the first line of TOKEN_FILE. The cookie form sends `__session=<token>` and
-- `__client_uat=<CLIENT_UAT>` (clerkgate's cookie rule needs 0 < client_uat <= iat).
--
-- Paced form: each connection waits DELAY_MS after every response before its next request, so
-- C connections offer about C * 1000 / DELAY_MS requests per second while latency stays well
-- under DELAY_MS. bench/run.py uses it for the latency-at-half-of-peak measurement.

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local pace_ms = nil

function init(args)
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
end

function delay()
   return pace_ms or 0
end
