-- GET a random account. Arguments (after `--`): the path prefix (/accounts/ or the
-- baseline's) and the number of accounts.
dofile("bench/wrk/report.lua")

local prefix, accounts = "/accounts/", 1000

function init(args)
  prefix = args[1] or prefix
  accounts = tonumber(args[2] or accounts)
  seed_once()
end

function request()
  return wrk.format("GET", prefix .. math.random(accounts))
end
