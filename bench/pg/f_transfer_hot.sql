-- (f) transfer of 1 from a random account (2..100000) to one hot destination (id 1), as ONE
--     transaction, the same statements as (e). Lock order: the source first, the hot row
--     last, so the hot row's lock is held only across its own UPDATE, the ledger insert and
--     the commit's WAL flush (the kindest order for PostgreSQL). It cannot deadlock: the hot
--     account is never a source, so every transaction locks one cold row, then the hot row.
--     The ledger row comes after the credit: its foreign-key check then finds the hot row
--     already locked by the same transaction (no KEY SHARE lock by others on the hot row).
\set from random(2, 100000)
BEGIN;
INSERT INTO transfer_idem(from_id, key) VALUES (:from, gen_random_uuid());
UPDATE account SET balance = balance - 1 WHERE id = :from;
UPDATE account SET balance = balance + 1 WHERE id = 1;
INSERT INTO transfer(from_id, to_id, amount) VALUES (:from, 1, 1);
END;
