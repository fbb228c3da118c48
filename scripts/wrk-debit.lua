-- wrk script: debits of 1 with a unique Idempotency-Key per request, the same client the axum
-- echo ceiling is measured with. ACCOUNTS=N picks load-0..load-(N-1) uniformly (the accounts
-- `coffer load` creates); HOT=1 debits load-0 only.
--   ACCOUNTS=100000 wrk -t2 -c64 -d20s -s scripts/wrk-debit.lua http://127.0.0.1:8080
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function init(args)
  math.randomseed(os.time() + id)
  n = tonumber(os.getenv("ACCOUNTS") or "1000")
  hot = os.getenv("HOT")
  prefix = os.getenv("PREFIX") or "load"
  counter = 0
  run = tostring(os.time())
end
request = function()
  counter = counter + 1
  local account = hot and 0 or math.random(0, n - 1)
  local key = "wrk-" .. run .. "-" .. id .. "-" .. counter
  return wrk.format("POST", "/v1/accounts/" .. prefix .. "-" .. account .. "/debits",
    {["Idempotency-Key"] = key, ["Content-Type"] = "application/json"}, '{"amount":1}')
end
