-- Shared by the wrk scripts: one machine-readable summary line that scripts/bench.sh parses.
-- `non2xx` is wrk's count of responses with a status >= 400 (these routes never answer
-- 1xx or 3xx); `socket_errors` adds connect, read, write and timeout errors.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK requests=%d seconds=%.3f rps=%.1f p50_ms=%.3f p99_ms=%.3f non2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end

-- Each wrk thread has its own Lua state; seed each one differently.
local seeded = false
function seed_once()
  if not seeded then
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
    seeded = true
  end
end

-- Two different accounts out of 1..n, uniformly.
function random_pair(n)
  local from = math.random(n)
  local to = math.random(n - 1)
  if to >= from then to = to + 1 end
  return from, to
end
