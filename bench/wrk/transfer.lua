-- POST a transfer between two random accounts. Arguments (after `--`): the path
-- (/transfers or the baseline's) and the number of accounts.
dofile("bench/wrk/report.lua")

local path, accounts = "/transfers", 1000
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  path = args[1] or path
  accounts = tonumber(args[2] or accounts)
  seed_once()
end

function request()
  local from, to = random_pair(accounts)
  local body = string.format('{"from_account_id":%d,"to_account_id":%d,"amount":%d}',
    from, to, math.random(100))
  return wrk.format("POST", path, headers, body)
end
