-- wrk script: POST pre-signed receptionist webhooks, cycling through a file of them.
--
--   wrk -t1 -c50 -d8s -s benchmarks/wrk.lua URL -- FILE [OFFSET]
--
-- FILE holds one request per line, as benchmarks/workload.py writes it:
-- webhook-id TAB webhook-timestamp TAB webhook-signature TAB body. Sending starts
-- after OFFSET lines, so consecutive rounds against one server send new events.
-- When done, prints one line "WRK_JSON {...}" with the totals and latency percentiles.

local requests = {}
local index = 0

function init(args)
  local file = assert(io.open(args[1], "r"))
  for line in file:lines() do
    local id, stamp, signature, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", nil, {
      ["webhook-id"] = id,
      ["webhook-timestamp"] = stamp,
      ["webhook-signature"] = signature,
      ["content-type"] = "application/json",
    }, body)
  end
  file:close()
  index = (tonumber(args[2]) or 0) % #requests
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, _)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "status_errors": %d, "timeouts": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max
  ))
end
