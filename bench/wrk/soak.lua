-- The mixed soak: reads by id, hot searches, creates and scored responses, drawn per request.
--   wrk ... -s soak.lua http://127.0.0.1:PORT -- READS SEARCHES CREATES RESPONSES W_READ W_SEARCH W_CREATE W_RESPONSE NTHREADS
-- READS/SEARCHES: files of paths; CREATES: Observation bodies; RESPONSES: QuestionnaireResponse bodies
-- (posted in order per thread, as in post.lua). The W_* are integer weights. The counts of each kind
-- sent and of answers >= 400 go out through done() (wrk counts non-2xx/3xx in errors.status too).
local common = dofile("common.lua")
local reads, searches, creates, responses
local weights, total
local nthreads, next_response, post_headers
sent_read, sent_search, sent_create, sent_response, bad = 0, 0, 0, 0, 0

setup = common.setup

function init(args)
  reads = common.lines(args[1])
  searches = common.lines(args[2])
  creates = common.lines(args[3])
  responses = common.lines(args[4])
  weights = { tonumber(args[5]), tonumber(args[6]), tonumber(args[7]), tonumber(args[8]) }
  total = weights[1] + weights[2] + weights[3] + weights[4]
  nthreads = tonumber(args[9] or "1")
  next_response = (thread_no or 1) - 1
  math.randomseed(os.time() * 1000 + (thread_no or 0))
  -- wrk.format() takes the headers it is given instead of wrk.headers (which hold -H Authorization).
  post_headers = {}
  for k, v in pairs(wrk.headers) do
    post_headers[k] = v
  end
  post_headers["Content-Type"] = "application/fhir+json"
end


function request()
  local r = math.random(total)
  if r <= weights[1] then
    sent_read = sent_read + 1
    return wrk.format("GET", reads[math.random(#reads)])
  end
  r = r - weights[1]
  if r <= weights[2] then
    sent_search = sent_search + 1
    return wrk.format("GET", searches[math.random(#searches)])
  end
  r = r - weights[2]
  if r <= weights[3] then
    sent_create = sent_create + 1
    return wrk.format("POST", "/fhir/Observation", post_headers, creates[math.random(#creates)])
  end
  sent_response = sent_response + 1
  local body = responses[(next_response % #responses) + 1]
  next_response = next_response + nthreads
  return wrk.format("POST", "/fhir/QuestionnaireResponse", post_headers, body)
end

function response(status, headers, body)
  if status >= 400 then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  common.done(summary, latency, requests, { "sent_read", "sent_search", "sent_create", "sent_response", "bad" })
end
