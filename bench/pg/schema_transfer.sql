-- Transfers on the wallet baseline schema (../../../shared/anchors/postgres/schema.sql, loaded
-- first: account(id 1..100000, balance 1e9, CHECK balance >= 0)). What a user would add for
-- transfers: a ledger row per transfer, indexed by both accounts for per-account history,
-- with foreign keys, and idempotency keys scoped to the source account (as in coffer).
DROP TABLE IF EXISTS transfer_idem, transfer;
CREATE TABLE transfer(
  id         bigserial PRIMARY KEY,
  from_id    bigint NOT NULL REFERENCES account(id),
  to_id      bigint NOT NULL REFERENCES account(id),
  amount     bigint NOT NULL CHECK (amount > 0),
  created_at timestamptz NOT NULL DEFAULT now(),
  CHECK (from_id <> to_id)
);
CREATE INDEX transfer_from_idx ON transfer(from_id);
CREATE INDEX transfer_to_idx ON transfer(to_id);
CREATE TABLE transfer_idem(
  from_id    bigint NOT NULL,
  key        uuid   NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (from_id, key)
);
-- pre-populate the keys so the unique index is not trivially small (1M keys), as for (d)
INSERT INTO transfer_idem(from_id, key) SELECT 1 + (g % 100000), gen_random_uuid() FROM generate_series(1, 1000000) g;
VACUUM ANALYZE account; VACUUM ANALYZE transfer; VACUUM ANALYZE transfer_idem;
