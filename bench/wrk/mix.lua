-- 90 % reads of a random account, 10 % transfers between two random accounts. Arguments
-- (after `--`): the read path prefix, the transfer path and the number of accounts.
dofile("bench/wrk/report.lua")

local prefix, path, accounts = "/accounts/", "/transfers", 1000
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  prefix = args[1] or prefix
  path = args[2] or path
  accounts = tonumber(args[3] or accounts)
  seed_once()
end

function request()
  if math.random(10) > 1 then
    return wrk.format("GET", prefix .. math.random(accounts))
  end
  local from, to = random_pair(accounts)
  local body = string.format('{"from_account_id":%d,"to_account_id":%d,"amount":%d}',
    from, to, math.random(100))
  return wrk.format("POST", path, headers, body)
end
