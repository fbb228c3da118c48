-- (e) transfer of 1 between a random pair of distinct accounts, as ONE transaction:
--     idempotency key (scoped to the source), debit the source, credit the destination,
--     ledger row. The balance check is the CHECK (balance >= 0) of account: a debit that
--     would overdraw fails its UPDATE and the whole transaction rolls back (pgbench would
--     report the client as aborted; with 1e9 per account and amounts of 1 it cannot happen).
--     No deadlock: both account rows are locked in ascending id order (the lower id is
--     updated first, whichever of the two is the source), so no two transfers wait on each
--     other in a cycle. 6 round trips, 1 commit.
\set from random(1, 100000)
\set other random(1, 99999)
\set to case when :other >= :from then :other + 1 else :other end
\set lo least(:from, :to)
\set hi greatest(:from, :to)
\set dlo case when :lo = :from then -1 else 1 end
\set dhi -:dlo
BEGIN;
INSERT INTO transfer_idem(from_id, key) VALUES (:from, gen_random_uuid());
UPDATE account SET balance = balance + :dlo WHERE id = :lo;
UPDATE account SET balance = balance + :dhi WHERE id = :hi;
INSERT INTO transfer(from_id, to_id, amount) VALUES (:from, :to, 1);
END;
