-- The ledger schema of contract section 7.

CREATE TABLE accounts (
    id         BIGSERIAL PRIMARY KEY,
    name       TEXT        NOT NULL,
    balance    BIGINT      NOT NULL CHECK (balance >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE transfers (
    id              BIGSERIAL PRIMARY KEY,
    from_account_id BIGINT      NOT NULL REFERENCES accounts,
    to_account_id   BIGINT      NOT NULL REFERENCES accounts,
    amount          BIGINT      NOT NULL CHECK (amount > 0),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT transfers_distinct_accounts CHECK (from_account_id <> to_account_id)
);

-- GET /transfers?account_id=A&after_id=M: one index per side, each ordered by id, so the
-- keyset scan of either side is an index range scan (and the foreign keys get the indexes
-- that ON DELETE checks on accounts would need).
CREATE INDEX transfers_from_account_id_id_idx ON transfers (from_account_id, id);
CREATE INDEX transfers_to_account_id_id_idx ON transfers (to_account_id, id);

-- Idempotency keys (contract section 4), scoped to the endpoint. The stored response is
-- replayed byte for byte; the fingerprint is a hash of the canonical JSON request body.
CREATE TABLE idempotency_keys (
    endpoint        TEXT        NOT NULL,
    key             TEXT        NOT NULL,
    fingerprint     TEXT        NOT NULL,
    response_status SMALLINT    NOT NULL,
    response_body   TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint, key)
);

-- The purge task deletes by age.
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
