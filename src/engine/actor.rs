//! Account actors. Every account is owned by exactly one actor, which takes its commands one
//! at a time from a bounded mailbox: that serialization is what makes a double spend
//! impossible. An actor owns a shard of the accounts (by hash of the id): a fixed number of
//! actor tasks, about one per core, each serving many accounts.
//!
//! Why shards rather than a task per account: with commands spread over many accounts,
//! almost every command woke (or started) a different task, and that scheduling, not the
//! domain or the disk, was the cost of an operation (~10 µs in the engine bench). A shard
//! actor wakes once and drains every queued command for all its accounts; a batch costs one
//! message per shard. Tasks no longer grow with busy accounts at all, and an idle account
//! holds no task and no channel.
//!
//! For each command the actor expires the account's due holds, decides, writes the event to
//! the WAL, applies it and hands the reply to the WAL writer, which sends it right after the
//! covering fsync. It never waits for the disk itself, so one hot account is not limited to
//! one fsync per command (pipelining + group commit).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{EngineError, Executed, Inner, Slot};
use crate::domain::{AccountId, Decision, Fresh, IdempotencyKey, Request};

/// Capacity of each actor's mailbox: past this, senders wait (backpressure on HTTP).
pub const ACTOR_MAILBOX_CAPACITY: usize = 4096;
/// The largest mailbox capacity a configuration may ask for: a deeper queue only adds
/// latency before backpressure, and tokio's channels refuse capacities near `usize::MAX`.
pub const ACTOR_MAILBOX_CAPACITY_MAX: usize = 1 << 20;
/// The most actors a configuration may ask for (each is a task with a mailbox; a handful per
/// core is already more than the work can use).
pub const ACTORS_MAX: usize = 1024;

/// How long a sender waits for room in a full mailbox before giving up with
/// `EngineError::Overloaded` (503 `overloaded` with `Retry-After`) instead of waiting forever.
/// Nothing was queued then, so nothing was applied.
pub const MAILBOX_SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// One request for one account, as queued in an actor's mailbox.
pub(crate) type Item = (usize, Arc<Slot>, Option<IdempotencyKey>, Request);

pub(crate) enum Msg {
    Execute {
        slot: Arc<Slot>,
        key: Option<IdempotencyKey>,
        request: Request,
        reply: oneshot::Sender<Result<Executed, EngineError>>,
    },
    /// Several requests of one batch for this actor's accounts, applied in the order given,
    /// in one trip.
    Batch {
        items: Vec<Item>,
        reply: oneshot::Sender<Vec<(usize, Answer)>>,
    },
}

/// An actor's answer: the result, and the LSN that must be durable before the caller may
/// show it (a refusal also reveals state, so it waits too).
pub(crate) struct Answer {
    pub(crate) result: Result<Executed, EngineError>,
    pub(crate) wait_lsn: u64,
}

/// The mailboxes of the actors, and how accounts map onto them.
pub(crate) struct Actors {
    mailboxes: Vec<mpsc::Sender<Msg>>,
    hasher: ahash::RandomState,
}

impl Actors {
    /// Starts `count` actors. They hold the engine weakly and end when it is dropped.
    /// `count` and `capacity` are at least 1 (`EngineConfig::check`).
    pub(crate) fn start(inner: Weak<Inner>, count: usize, capacity: usize) -> Actors {
        assert!(count >= 1, "EngineConfig::check refuses 0 actors");
        assert!(
            capacity >= 1,
            "EngineConfig::check refuses an empty mailbox"
        );
        let mailboxes = (0..count)
            .map(|_| {
                let (tx, rx) = mpsc::channel(capacity);
                tokio::spawn(run(inner.clone(), rx));
                tx
            })
            .collect();
        Actors {
            mailboxes,
            hasher: ahash::RandomState::new(),
        }
    }

    /// The actor that owns `account`.
    pub(crate) fn owner(&self, account: &AccountId) -> usize {
        // Exact enough: the modulo of a 64-bit hash picks one of a handful of actors.
        (self.hasher.hash_one(account) % self.mailboxes.len() as u64) as usize
    }

    /// Number of actors.
    pub(crate) fn count(&self) -> usize {
        self.mailboxes.len()
    }

    /// Commands queued in all mailboxes now.
    pub(crate) fn queued(&self) -> usize {
        self.mailboxes
            .iter()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .sum()
    }

    /// Delivers a message to actor `owner`, waiting while its mailbox is full.
    pub(crate) async fn send(&self, owner: usize, msg: Msg) -> Result<(), EngineError> {
        use mpsc::error::SendTimeoutError;
        match self.mailboxes[owner]
            .send_timeout(msg, MAILBOX_SEND_WAIT)
            .await
        {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(_)) => Err(EngineError::Overloaded),
            Err(SendTimeoutError::Closed(_)) => Err(EngineError::ShuttingDown),
        }
    }
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Msg>) {
    if let Some(inner) = inner.upgrade() {
        inner.live_actors.fetch_add(1, Ordering::Relaxed);
    }
    while let Some(msg) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { break };
        handle(&inner, msg);
        // Drain what queued up meanwhile: one wake-up serves them all.
        while let Ok(msg) = rx.try_recv() {
            handle(&inner, msg);
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.live_actors.fetch_sub(1, Ordering::Relaxed);
    }
}

fn handle(inner: &Inner, msg: Msg) {
    match msg {
        Msg::Execute {
            slot,
            key,
            request,
            reply,
        } => {
            let answer = execute(inner, &slot, key, request);
            // The reply leaves only once everything it shows is durable; the WAL writer sends
            // it right after the covering fsync. The caller may have gone away (client
            // disconnected): nothing to do then.
            inner.wal.when_durable(
                answer.wait_lsn,
                Box::new(move |durable| {
                    let result = match durable {
                        Ok(()) => answer.result,
                        Err(error) => Err(EngineError::from(error)),
                    };
                    let _ = reply.send(result);
                }),
            );
        }
        Msg::Batch { items, reply } => {
            let answers = items
                .into_iter()
                .map(|(index, slot, key, request)| (index, execute(inner, &slot, key, request)))
                .collect();
            let _ = reply.send(answers);
        }
    }
}

fn execute(inner: &Inner, slot: &Slot, key: Option<IdempotencyKey>, request: Request) -> Answer {
    let now_ms = inner.clock.now_ms();
    let mut account = slot.state.lock();
    if let Err(error) = inner.expire_account(&mut account, now_ms) {
        return Answer {
            result: Err(error),
            wait_lsn: 0,
        };
    }
    let hold_id = match request {
        Request::Hold { .. } => inner.ids.next(now_ms),
        _ => Uuid::nil(),
    };
    let fresh = Fresh { now_ms, hold_id };
    match account.decide(key.as_ref(), &request, fresh) {
        Ok(Decision::Replay(entry)) => Answer {
            result: Ok(Executed {
                receipt: entry.receipt,
                replayed: true,
            }),
            wait_lsn: entry.lsn,
        },
        Ok(Decision::Apply(body)) => match inner.commit(&mut account, key, body, now_ms) {
            Ok((receipt, lsn)) => Answer {
                result: Ok(Executed {
                    receipt,
                    replayed: false,
                }),
                wait_lsn: lsn,
            },
            Err(error) => Answer {
                result: Err(error),
                wait_lsn: 0,
            },
        },
        Err(refusal) => Answer {
            result: Err(EngineError::Op(refusal)),
            wait_lsn: account.last_lsn(),
        },
    }
}
