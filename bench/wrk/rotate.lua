-- A different token on every request, rotating through the first LIMIT lines of TOKEN_FILE.
--
--   wrk -s rotate.lua URL -- TOKEN_FILE LIMIT
--
-- Requests are formatted once in init(), so the per-request Lua cost is a table lookup. Each
-- wrk thread starts at a different offset so threads do not send the same token in lockstep.

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local requests = {}
local index = 0
local threads = 0

function setup(thread)
   thread:set("id", threads)
   threads = threads + 1
end

function init(args)
   local tokens = bench_read_lines(args[1], tonumber(args[2]))
   for i, token in ipairs(tokens) do
      requests[i] = wrk.format(nil, nil, bench_with_token(token))
   end
   index = ((tonumber(wrk.thread:get("id")) or 0) * 7919) % #requests
end

function request()
   index = index % #requests + 1
   return requests[index]
end
