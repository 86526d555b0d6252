-- Sends each of the first LIMIT tokens of TOKEN_FILE exactly once, then stops (one thread).
-- bench/run.py uses it to put 100k distinct verified tokens into a cache before reading RSS.
--
--   wrk -t1 -s fill.lua URL -- TOKEN_FILE LIMIT

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local tokens = {}
local sent = 0
local answered = 0

function init(args)
   tokens = bench_read_lines(args[1], tonumber(args[2]))
end

function request()
   sent = sent + 1
   -- Past the end (requests still in flight when the last one goes out): repeat the last token,
   -- which is a cache hit and adds nothing to the cache.
   local token = tokens[math.min(sent, #tokens)]
   return wrk.format(nil, nil, bench_with_token(token))
end

function response(status, headers, body)
   answered = answered + 1
   if answered >= #tokens then
      wrk.thread:stop()
   end
end
