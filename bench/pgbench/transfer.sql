-- One transfer between two random accounts, exactly as the service sends it (see
-- BENCHMARKS.md, "Round trips"), run by pgbench with no HTTP in front: the database's own
-- limit for this workload. Run with -M prepared (the service's statements are prepared
-- once per connection too; pipeline mode needs the extended protocol) and -D accounts=N.
--
-- One deviation, forced by pgbench: the service computes both new balances in memory from
-- the rows it locked and writes them; pgbench cannot carry a multi-row result into the next
-- statement, so the UPDATE adds the deltas instead (same statement shape, same rows, same
-- plan, same locks).
\set from random(1, :accounts)
\set step random(1, :accounts - 1)
\set to 1 + (:from - 1 + :step) % :accounts
\set amount random(1, 100)
\set debit 0 - :amount
BEGIN;
SELECT "accounts"."id", "accounts"."balance" FROM "accounts" WHERE (("accounts"."id" = :from) OR ("accounts"."id" = :to)) ORDER BY "accounts"."id" ASC FOR UPDATE;
UPDATE accounts AS a SET balance = a.balance + v.delta FROM unnest(ARRAY[:from, :to]::bigint[], ARRAY[:debit, :amount]::bigint[]) AS v(id, delta) WHERE a.id = v.id;
INSERT INTO "transfers" ("from_account_id", "to_account_id", "amount") VALUES (:from, :to, :amount) RETURNING "transfers"."id", "transfers"."from_account_id", "transfers"."to_account_id", "transfers"."amount", "transfers"."created_at";
-- The Consistency-Token of the answer: the insert position, read behind the COMMIT in the
-- same round trip, as the service pipelines it on the write's connection.
\startpipeline
COMMIT;
SELECT pg_current_wal_insert_lsn();
\endpipeline
