//! Transfers: the record of each one, and the book that keeps them. The book is derived
//! from the log alone (`TransferOut`, `TransferIn` and `TransferRefund` events), so replay
//! rebuilds exactly what the live path built; it is what answers `GET /v1/transfers/{id}`
//! and idempotent replays of `POST /v1/transfers`, and what recovery reads to finish the
//! transfers a crash left half done.

use std::sync::Arc;

use uuid::Uuid;

use super::account::{AccountView, ApplyError, Event, EventBody, TransferFailure};
use super::types::*;

/// Where a transfer is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferStatus {
    /// The source was debited; the destination has not been credited yet. Only seen while
    /// a transfer is in flight (microseconds), or after a crash until recovery finishes it.
    Pending,
    /// Both halves are done.
    Completed,
    /// The destination refused and the source was refunded.
    Failed(TransferFailure),
}

impl TransferStatus {
    /// The API name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Pending => "pending",
            TransferStatus::Completed => "completed",
            TransferStatus::Failed(_) => "failed",
        }
    }
}

/// A transfer and everything needed to answer for it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRecord {
    /// Transfer id (UUID v7).
    pub id: Uuid,
    /// Source.
    pub from: AccountId,
    /// Destination.
    pub to: AccountId,
    /// Amount moved.
    pub amount: Amount,
    /// Where it is.
    pub status: TransferStatus,
    /// When the source was debited (unix ms).
    pub created_at_ms: u64,
    /// Metadata of the request.
    pub metadata: Metadata,
    /// The key of the request, in the source's scope.
    pub key: Option<IdempotencyKey>,
    /// The source just after the debit.
    pub from_account: AccountView,
    /// The destination just after the credit (completed transfers).
    pub to_account: Option<AccountView>,
    /// LSN of the `TransferOut` event.
    pub out_lsn: u64,
    /// LSN of the event that ended it (`TransferIn` or `TransferRefund`); 0 while pending.
    pub end_lsn: u64,
    /// When it ended (unix ms); 0 while pending.
    pub ended_at_ms: u64,
}

impl TransferRecord {
    /// The LSN that must be durable before this record may be shown.
    pub fn last_lsn(&self) -> u64 {
        self.out_lsn.max(self.end_lsn)
    }
}

/// Every transfer still remembered, by id.
#[derive(Clone, Debug, Default)]
pub struct TransferBook {
    records: FastMap<Uuid, Arc<TransferRecord>>,
    /// Sum of the amounts of pending transfers: money between two accounts.
    in_flight_amount: u128,
    in_flight: usize,
}

impl TransferBook {
    /// A book of the given records (a snapshot). Refuses a record that breaks its rules.
    pub fn from_records(records: Vec<TransferRecord>) -> Result<TransferBook, ApplyError> {
        let mut book = TransferBook::default();
        for record in records {
            if record.from == record.to || record.from_account.id != record.from {
                return Err(ApplyError(
                    "snapshot: a transfer with inconsistent accounts",
                ));
            }
            match record.status {
                TransferStatus::Pending => {
                    if record.end_lsn != 0 || record.to_account.is_some() {
                        return Err(ApplyError("snapshot: a pending transfer that ended"));
                    }
                }
                TransferStatus::Completed => {
                    if record.end_lsn <= record.out_lsn
                        || record.to_account.as_ref().map(|v| &v.id) != Some(&record.to)
                    {
                        return Err(ApplyError("snapshot: a completed transfer out of step"));
                    }
                }
                TransferStatus::Failed(_) => {
                    if record.end_lsn <= record.out_lsn || record.to_account.is_some() {
                        return Err(ApplyError("snapshot: a failed transfer out of step"));
                    }
                }
            }
            if record.status == TransferStatus::Pending {
                book.in_flight += 1;
                book.in_flight_amount += u128::from(record.amount.get());
            }
            if book.records.insert(record.id, Arc::new(record)).is_some() {
                return Err(ApplyError("snapshot: a transfer id twice"));
            }
        }
        Ok(book)
    }

    /// A transfer by id.
    pub fn get(&self, id: &Uuid) -> Option<&Arc<TransferRecord>> {
        self.records.get(id)
    }

    /// Number of transfers remembered.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no transfer is remembered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Pending transfers: count and the sum of their amounts.
    pub fn in_flight(&self) -> (usize, u128) {
        (self.in_flight, self.in_flight_amount)
    }

    /// Ids of the pending transfers, oldest first (by LSN of their debit).
    pub fn pending(&self) -> Vec<Uuid> {
        let mut pending: Vec<(u64, Uuid)> = self
            .records
            .values()
            .filter(|r| r.status == TransferStatus::Pending)
            .map(|r| (r.out_lsn, r.id))
            .collect();
        pending.sort_unstable();
        pending.into_iter().map(|(_, id)| id).collect()
    }

    /// Every record, in no particular order.
    pub fn records(&self) -> impl Iterator<Item = &Arc<TransferRecord>> {
        self.records.values()
    }

    /// Forgets ended transfers for which `forget` says yes; returns how many.
    pub fn prune(&mut self, mut forget: impl FnMut(&TransferRecord) -> bool) -> usize {
        let before = self.records.len();
        self.records
            .retain(|_, r| r.status == TransferStatus::Pending || !forget(r));
        before - self.records.len()
    }

    /// Checks, without changing anything, that a new transfer event (not yet in the log)
    /// can be recorded: a debit's id is new; an end names a pending transfer with the same
    /// accounts and amount. The live path checks before writing the event.
    pub fn check_new(&self, event: &Event) -> Result<(), ApplyError> {
        let (id, from, to, amount) = match &event.body {
            EventBody::TransferOut { transfer_id, .. } => {
                return match self.records.contains_key(transfer_id) {
                    true => Err(ApplyError("transfer id used twice")),
                    false => Ok(()),
                };
            }
            EventBody::TransferIn {
                transfer_id,
                from,
                amount,
                ..
            } => (transfer_id, from, &event.account, amount),
            EventBody::TransferRefund {
                transfer_id,
                to,
                amount,
                ..
            } => (transfer_id, &event.account, to, amount),
            _ => return Ok(()),
        };
        let known = self
            .records
            .get(id)
            .ok_or(ApplyError("a transfer ends that never started"))?;
        if known.status != TransferStatus::Pending {
            return Err(ApplyError("a transfer ended twice"));
        }
        if known.from != *from || known.to != *to || known.amount != *amount {
            return Err(ApplyError("a transfer ends with other accounts or amount"));
        }
        Ok(())
    }

    /// Records a transfer event that was just applied to its account; `view` is that
    /// account just after it. Idempotent by LSN, so that a replay over a fuzzy snapshot (whose
    /// book may already hold events after the snapshot's LSN) records each event once; any
    /// other repetition (an id used twice, a transfer ended twice) is refused. `view` is
    /// `None` for an event the account already had (skipped in replay): the book must have
    /// it too, since it is captured after the accounts.
    pub fn record(&mut self, event: &Event, view: Option<AccountView>) -> Result<(), ApplyError> {
        match &event.body {
            EventBody::TransferOut {
                transfer_id,
                to,
                amount,
                metadata,
            } => {
                if let Some(known) = self.records.get(transfer_id) {
                    if known.out_lsn == event.lsn {
                        return Ok(());
                    }
                    return Err(ApplyError("transfer id used twice"));
                }
                let view = view.ok_or(ApplyError("the snapshot's transfers miss a debit"))?;
                let record = TransferRecord {
                    id: *transfer_id,
                    from: event.account.clone(),
                    to: to.clone(),
                    amount: *amount,
                    status: TransferStatus::Pending,
                    created_at_ms: event.at_ms,
                    metadata: metadata.clone(),
                    key: event.idempotency_key.clone(),
                    from_account: view,
                    to_account: None,
                    out_lsn: event.lsn,
                    end_lsn: 0,
                    ended_at_ms: 0,
                };
                self.in_flight += 1;
                self.in_flight_amount += u128::from(amount.get());
                self.records.insert(*transfer_id, Arc::new(record));
                Ok(())
            }
            EventBody::TransferIn {
                transfer_id,
                from,
                amount,
                ..
            } => self.end(
                event,
                *transfer_id,
                (from, &event.account),
                *amount,
                TransferStatus::Completed,
                view,
            ),
            EventBody::TransferRefund {
                transfer_id,
                to,
                amount,
                failure,
            } => self.end(
                event,
                *transfer_id,
                (&event.account, to),
                *amount,
                TransferStatus::Failed(*failure),
                None,
            ),
            _ => Ok(()),
        }
    }

    fn end(
        &mut self,
        event: &Event,
        id: Uuid,
        (from, to): (&AccountId, &AccountId),
        amount: Amount,
        status: TransferStatus,
        to_account: Option<AccountView>,
    ) -> Result<(), ApplyError> {
        let Some(known) = self.records.get_mut(&id) else {
            return Err(ApplyError("a transfer ends that never started"));
        };
        if known.end_lsn == event.lsn {
            return Ok(());
        }
        if known.status != TransferStatus::Pending {
            return Err(ApplyError("a transfer ended twice"));
        }
        if status == TransferStatus::Completed && to_account.is_none() {
            return Err(ApplyError("the snapshot's transfers miss a credit"));
        }
        if known.from != *from || known.to != *to || known.amount != amount {
            return Err(ApplyError("a transfer ends with other accounts or amount"));
        }
        if event.lsn <= known.out_lsn {
            return Err(ApplyError("a transfer ends before it started"));
        }
        let record = Arc::make_mut(known);
        record.status = status;
        record.to_account = to_account;
        record.end_lsn = event.lsn;
        record.ended_at_ms = event.at_ms;
        self.in_flight -= 1;
        self.in_flight_amount -= u128::from(amount.get());
        Ok(())
    }
}
