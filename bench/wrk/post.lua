-- POST bodies from a file (one JSON document a line) to one path.
--   wrk ... -s post.lua http://127.0.0.1:PORT -- PATH BODIES_FILE [random|sequential]
-- random: a body drawn at random per request (create: the server gives each a new id).
-- sequential: thread k of n posts bodies k, k+n, k+2n, ... so that no body is posted twice until the
-- file is used up (responses for ingest: each one a new administration); then it starts over.
local common = dofile("common.lua")
local path, bodies, order
local nthreads, next_index

setup = function(thread)
  common.setup(thread)
end

function init(args)
  path = args[1]
  bodies = common.lines(args[2])
  order = args[3] or "random"
  nthreads = tonumber(args[4] or "1")
  next_index = (thread_no or 1) - 1
  math.randomseed(os.time() * 1000 + (thread_no or 0))
  wrk.headers["Content-Type"] = "application/fhir+json"
end

function request()
  local body
  if order == "sequential" then
    body = bodies[(next_index % #bodies) + 1]
    next_index = next_index + nthreads
  else
    body = bodies[math.random(#bodies)]
  end
  return wrk.format("POST", path, nil, body)
end

function done(summary, latency, requests)
  common.done(summary, latency, requests)
end
