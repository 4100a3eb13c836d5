DROP TABLE idempotency_keys;
DROP TABLE transfers;
DROP TABLE accounts;
