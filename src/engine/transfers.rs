//! Transfers between two accounts: a saga of two events on two accounts, made crash-safe by
//! the log (DESIGN.md).
//!
//! 1. Under the source's lock: decide (idempotency, validation, currencies, funds), write and
//!    apply `TransferOut`. The money has left the source; the transfer is pending in the
//!    book.
//! 2. Under the destination's lock: write and apply `TransferIn`, unless the transfer already
//!    ended. If the destination refuses (balance limit; a missing account or another
//!    currency only in a damaged log), then under the source's lock: `TransferRefund`, and
//!    the transfer ends `failed`.
//! 3. Wait until the last event is durable, then answer. The log is durable in LSN order, so
//!    the end being durable means both halves are.
//!
//! Steps 1 and 2 run in one synchronous stretch of the request's task, each under one lock
//! and never two locks at once: no deadlock between accounts transferring to each other, and
//! a client that goes away cannot split a transfer between its halves. Step 2 is idempotent
//! (it re-checks the book under the account's lock), so anyone may drive a pending transfer
//! to its end: the request that started it, a retry of that request, or recovery, which
//! finishes every pending transfer before `/readyz` turns 200.

use std::sync::Arc;

use uuid::Uuid;

use super::{Engine, EngineError, Inner, Slot};
use crate::domain::{
    AccountId, Currency, Decision, Field, IdempotencyKey, Invalid, OpError, Request,
    TransferFailure, TransferRecord, TransferStatus,
};

/// The end of a transfer request.
#[derive(Debug, Clone)]
pub struct TransferOutcome {
    /// The transfer as it ended (completed or failed; pending only if its refund is stuck).
    pub record: Arc<TransferRecord>,
    /// True when this answers an earlier request with the same key.
    pub replayed: bool,
}

/// Money conservation over the whole engine (invariant 3): `balances + in_flight` must equal
/// `external`. Exact only at a quiet point (it reads the accounts one at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conservation {
    /// Sum of all balances.
    pub balances: i128,
    /// Sum of the amounts of pending transfers.
    pub in_flight: i128,
    /// Sum of credits minus debits and captures over all accounts, modulo 2^64 (accounts
    /// keep their running totals modulo 2^64: see [`crate::domain::Account`]).
    pub external: i64,
}

impl Conservation {
    /// Whether money is conserved.
    pub fn holds(&self) -> bool {
        // Modulo 2^64, as the totals are kept; the balances are exact.
        self.balances.wrapping_add(self.in_flight) as i64 == self.external
    }
}

/// What the source's half decided.
enum Start {
    /// The transfer is debited and pending.
    Started(Uuid),
    /// The key was used for this same transfer before.
    Replay(Uuid),
}

impl Engine {
    /// Moves `amount` from one account to another (`request` is a [`Request::Transfer`];
    /// `from` is the key's scope). Answers once both halves are durable; a transfer the
    /// destination refused comes back `failed`, with its source refunded.
    pub async fn transfer(
        &self,
        from: &AccountId,
        key: Option<IdempotencyKey>,
        request: Request,
    ) -> Result<TransferOutcome, EngineError> {
        let Request::Transfer { to, .. } = &request else {
            return Err(EngineError::Op(OpError::Validation(Invalid::new(
                Field::Request,
                "not a transfer",
            ))));
        };
        let from_slot = self.inner.slot_or_404(from)?;
        let to_slot = self.inner.slot_or_404(to)?;
        // A currency never changes, and the destination's open is in the log before
        // anything this transfer writes: no need to wait for its durability here.
        let to_currency = to_slot.state.lock().currency().clone();
        let (id, replayed) =
            match self
                .inner
                .start_transfer(&from_slot, key, &request, &to_currency)
            {
                Ok(Start::Started(id)) => (id, false),
                Ok(Start::Replay(id)) => (id, true),
                Err((error, wait_lsn)) => {
                    // A refusal shows the account's state: only once that is durable.
                    self.inner.wal.wait_durable(wait_lsn).await?;
                    return Err(error);
                }
            };
        // Both for a new transfer and for a retry of one still in flight (a concurrent
        // identical request): drive it to its end; the book says if it already ended. The
        // record's last LSN covers its end: one wait for durability.
        self.inner.finish_transfer(id)?;
        let record = self.transfer_record(&id).await?;
        Ok(TransferOutcome { record, replayed })
    }

    /// A transfer by id, as durable.
    pub async fn transfer_record(&self, id: &Uuid) -> Result<Arc<TransferRecord>, EngineError> {
        let record = self.inner.transfer(*id)?;
        self.inner.wal.wait_durable(record.last_lsn()).await?;
        Ok(record)
    }

    /// Sums for the conservation check. Exact only when no request is in flight.
    pub fn conservation(&self) -> Conservation {
        let slots: Vec<Arc<Slot>> = self.inner.accounts.slots();
        let mut balances: i128 = 0;
        let mut external: i64 = 0;
        for slot in slots {
            let account = slot.state.lock();
            balances += i128::from(account.balance());
            external = external.wrapping_add(account.external_net());
        }
        let in_flight = self.inner.transfers.lock().in_flight().1;
        Conservation {
            balances,
            in_flight: i128::try_from(in_flight).unwrap_or(i128::MAX),
            external,
        }
    }
}

impl Inner {
    fn transfer(&self, id: Uuid) -> Result<Arc<TransferRecord>, EngineError> {
        self.transfers
            .lock()
            .get(&id)
            .cloned()
            .ok_or(EngineError::TransferNotFound(id))
    }

    /// The LSN that ended a transfer, if it ended.
    fn ended(&self, id: &Uuid) -> Option<u64> {
        self.transfers
            .lock()
            .get(id)
            .filter(|r| r.status != TransferStatus::Pending)
            .map(|r| r.end_lsn)
    }

    /// Step 1, under the source's lock. A refusal comes with the LSN to wait for.
    fn start_transfer(
        &self,
        from: &Slot,
        key: Option<IdempotencyKey>,
        request: &Request,
        to_currency: &Currency,
    ) -> Result<Start, (EngineError, u64)> {
        let now_ms = self.clock.now_ms();
        let mut account = from.state.lock();
        self.expire_account(&mut account, now_ms)
            .map_err(|e| (e, 0))?;
        let transfer_id = self.ids.next(now_ms);
        match account.decide_transfer(key.as_ref(), request, transfer_id, to_currency) {
            Ok(Decision::Apply(body)) => {
                self.commit(&mut account, key, body, now_ms)
                    .map_err(|e| (e, 0))?;
                Ok(Start::Started(transfer_id))
            }
            Ok(Decision::Replay(entry)) => match entry.receipt.transaction.transfer_id {
                Some(id) => Ok(Start::Replay(id)),
                None => Err((EngineError::Op(OpError::IdempotencyKeyReused), 0)),
            },
            Err(refusal) => Err((EngineError::Op(refusal), account.last_lsn())),
        }
    }

    /// Step 2: credits the destination, or refunds the source if the destination refuses.
    /// Idempotent; returns the LSN that ended the transfer (0 if it stays pending because
    /// even its refund is refused, which is logged).
    pub(super) fn finish_transfer(&self, id: Uuid) -> Result<u64, EngineError> {
        let record = self.transfer(id)?;
        if record.status != TransferStatus::Pending {
            return Ok(record.end_lsn);
        }
        let now_ms = self.clock.now_ms();
        let failure = match self.slot(&record.to) {
            None => TransferFailure::AccountNotFound,
            Some(slot) => {
                let mut account = slot.state.lock();
                if let Some(end) = self.ended(&id) {
                    return Ok(end);
                }
                match account.decide_transfer_in(
                    id,
                    &record.from,
                    &record.from_account.currency,
                    record.amount,
                    &record.metadata,
                ) {
                    Ok(body) => return Ok(self.commit(&mut account, None, body, now_ms)?.1),
                    Err(failure) => failure,
                }
            }
        };
        let slot = self.slot_or_404(&record.from)?;
        let mut account = slot.state.lock();
        if let Some(end) = self.ended(&id) {
            return Ok(end);
        }
        match account.decide_transfer_refund(id, &record.to, record.amount, failure) {
            Ok(body) => Ok(self.commit(&mut account, None, body, now_ms)?.1),
            Err(refusal) => {
                // Only if credits since the debit pushed the source near the balance limit:
                // the money stays in flight (counted in /metrics) until a restart retries.
                tracing::error!(
                    transfer = %id, from = %record.from, to = %record.to, ?refusal,
                    "a refused transfer cannot be refunded now; it stays pending"
                );
                Ok(0)
            }
        }
    }

    /// Finishes every transfer a crash left half done. Returns the last LSN written.
    pub(super) fn finish_pending_transfers(&self) -> Result<u64, EngineError> {
        let pending = self.transfers.lock().pending();
        if !pending.is_empty() {
            tracing::info!(
                transfers = pending.len(),
                "finishing transfers a crash left half done"
            );
        }
        let mut lsn = 0;
        for id in pending {
            lsn = lsn.max(self.finish_transfer(id)?);
        }
        Ok(lsn)
    }

    /// Forgets ended transfers no snapshot replay can need and no request can ask for
    /// again: ended at or below `lsn` (the snapshot's), longer ago than the retention's TTL,
    /// and whose key the source no longer remembers. Called while a snapshot is captured,
    /// before the book is.
    pub(super) fn prune_transfers(&self, lsn: u64, now_ms: u64) -> usize {
        let ttl = self.config.retention.ttl_ms;
        let candidates: Vec<(Uuid, AccountId, Option<IdempotencyKey>)> = self
            .transfers
            .lock()
            .records()
            .filter(|r| {
                r.status != TransferStatus::Pending
                    && r.end_lsn <= lsn
                    && r.ended_at_ms.saturating_add(ttl) <= now_ms
            })
            .map(|r| (r.id, r.from.clone(), r.key.clone()))
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        let mut forget = std::collections::HashSet::with_capacity(candidates.len());
        for (id, from, key) in candidates {
            // The key's answer is built from the book: keep the record while the key lives.
            let still_asked = match (self.slot(&from), &key) {
                (Some(slot), Some(key)) => slot
                    .state
                    .lock()
                    .idempotency_entry(key)
                    .is_some_and(|entry| entry.receipt.transaction.transfer_id == Some(id)),
                _ => false,
            };
            if !still_asked {
                forget.insert(id);
            }
        }
        self.transfers.lock().prune(|r| forget.contains(&r.id))
    }
}
