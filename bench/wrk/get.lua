-- GET a path drawn at random (per request) from a file of paths, one per line.
--   wrk ... -s get.lua http://127.0.0.1:PORT -- PATHS_FILE
-- Read by id: a file of "/fhir/Observation/<id>" lines; the hot search: a file of
-- "/fhir/Observation?patient=..&code=..&_sort=-date&_count=20" lines over random patients and codes.
local common = dofile("common.lua")
local paths

setup = common.setup

function init(args)
  paths = common.lines(args[1])
  math.randomseed(os.time() * 1000 + (thread_no or 0))
end

function request()
  return wrk.format("GET", paths[math.random(#paths)])
end

function done(summary, latency, requests)
  common.done(summary, latency, requests)
end
