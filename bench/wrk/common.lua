-- Shared by the wrk scripts of bench/issue14.py (run with the working directory bench/wrk/).
-- Each wrk thread has its own Lua state: setup() runs in the main state and numbers the threads;
-- done() runs in the main state after the run and prints one line "WRKJSON {...}" with the figures
-- from wrk's own latency histogram (microseconds in, milliseconds out).
local M = {}

local threads = {}
local counter = 0

function M.setup(thread)
  counter = counter + 1
  thread:set("thread_no", counter)
  table.insert(threads, thread)
end

function M.lines(path)
  local out = {}
  local f = assert(io.open(path, "r"), "cannot open " .. tostring(path))
  for line in f:lines() do
    if #line > 0 then
      out[#out + 1] = line
    end
  end
  f:close()
  assert(#out > 0, "no lines in " .. path)
  return out
end

local function ms(us)
  return string.format("%.3f", us / 1000.0)
end

-- extra(thread) may return a table name -> number read from each thread (summed over threads).
function M.done(summary, latency, requests, counters)
  local seconds = summary.duration / 1e6
  local e = summary.errors
  local parts = {
    string.format('"requests": %d', summary.requests),
    string.format('"seconds": %.3f', seconds),
    string.format('"rps": %.3f', summary.requests / seconds),
    string.format('"bytes": %d', summary.bytes),
    string.format(
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}',
      e.connect, e.read, e.write, e.status, e.timeout
    ),
    '"p50": ' .. ms(latency:percentile(50)),
    '"p90": ' .. ms(latency:percentile(90)),
    '"p99": ' .. ms(latency:percentile(99)),
    '"max": ' .. ms(latency.max),
    '"mean": ' .. ms(latency.mean),
  }
  if counters then
    local sums = {}
    for _, t in ipairs(threads) do
      for _, name in ipairs(counters) do
        sums[name] = (sums[name] or 0) + (tonumber(t:get(name)) or 0)
      end
    end
    local items = {}
    for _, name in ipairs(counters) do
      items[#items + 1] = string.format('"%s": %d', name, sums[name])
    end
    parts[#parts + 1] = '"counts": {' .. table.concat(items, ", ") .. "}"
  end
  io.write("WRKJSON {" .. table.concat(parts, ", ") .. "}\n")
end

return M
