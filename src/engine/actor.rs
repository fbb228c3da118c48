//! The account actor: one task per busy account takes commands from a bounded mailbox, one at
//! a time. For each it expires due holds, decides, writes the event to the WAL, applies it
//! and replies with the LSN the caller must wait for. It never waits for the disk itself, so
//! one hot account is not limited to one fsync per command (pipelining + group commit).
//!
//! Actors that had nothing to do for about `actor_idle` are retired by the idle sweeper: it
//! takes the mailbox's sender out of the slot, and the actor ends once the last in-flight
//! sender is gone and its queue is empty. The account's state stays in its slot and the next
//! command starts a new actor. (A timeout around every receive would arm and cancel a timer
//! per message; an epoch stamp per message costs one relaxed store.)

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{EngineError, Executed, Inner, Slot};
use crate::domain::{Decision, Fresh, IdempotencyKey, Request};

/// Capacity of an account's mailbox: past this, senders wait (backpressure on HTTP).
pub const ACCOUNT_MAILBOX_CAPACITY: usize = 1024;
/// A command is retried at most this many times against an actor that is stopping.
const SEND_ATTEMPTS_MAX: usize = 8;

pub(crate) enum Msg {
    Execute {
        key: Option<IdempotencyKey>,
        request: Request,
        reply: oneshot::Sender<Result<Executed, EngineError>>,
    },
    /// Several requests for this account, applied in the order given, in one trip.
    Batch {
        items: Vec<(usize, Option<IdempotencyKey>, Request)>,
        reply: oneshot::Sender<Vec<(usize, Answer)>>,
    },
}

/// An actor's answer: the result, and the LSN that must be durable before the caller may
/// show it (a refusal also reveals state, so it waits too).
pub(crate) struct Answer {
    pub(crate) result: Result<Executed, EngineError>,
    pub(crate) wait_lsn: u64,
}

/// Delivers a message to the account's actor, starting one if none runs.
pub(crate) async fn send(
    inner: &Arc<Inner>,
    slot: &Arc<Slot>,
    mut msg: Msg,
) -> Result<(), EngineError> {
    for _ in 0..SEND_ATTEMPTS_MAX {
        let tx = mailbox(inner, slot);
        match tx.send(msg).await {
            Ok(()) => return Ok(()),
            // The actor stopped between our lookup and our send: take the message back,
            // clear the dead mailbox if it is still the current one, and try again.
            Err(mpsc::error::SendError(back)) => {
                msg = back;
                let mut mailbox = slot.mailbox.lock();
                if mailbox
                    .as_ref()
                    .is_some_and(|current| current.same_channel(&tx))
                {
                    *mailbox = None;
                }
            }
        }
    }
    Err(EngineError::ShuttingDown)
}

/// The sender of the account's running actor, starting the actor if there is none.
fn mailbox(inner: &Arc<Inner>, slot: &Arc<Slot>) -> mpsc::Sender<Msg> {
    let mut mailbox = slot.mailbox.lock();
    if let Some(tx) = mailbox.as_ref() {
        if !tx.is_closed() {
            return tx.clone();
        }
    }
    let (tx, rx) = mpsc::channel(inner.config.mailbox_capacity.max(1));
    *mailbox = Some(tx.clone());
    drop(mailbox);
    slot.touch(inner);
    inner.live_actors.fetch_add(1, Ordering::Relaxed);
    inner.running.lock().push(slot.clone());
    tokio::spawn(run(inner.clone(), slot.clone(), rx));
    tx
}

async fn run(inner: Arc<Inner>, slot: Arc<Slot>, mut rx: mpsc::Receiver<Msg>) {
    while let Some(msg) = rx.recv().await {
        slot.touch(&inner);
        handle(&inner, &slot, msg);
        while let Ok(msg) = rx.try_recv() {
            handle(&inner, &slot, msg);
        }
    }
    inner.live_actors.fetch_sub(1, Ordering::Relaxed);
}

/// Retires actors idle for at least one sweep period: called by the idle sweeper once per
/// period, after it advanced the epoch.
pub(crate) fn retire_idle(inner: &Inner) {
    let epoch = inner.epoch.load(Ordering::Relaxed);
    inner.running.lock().retain(|slot| {
        if slot.last_epoch.load(Ordering::Relaxed) + 2 > epoch {
            return true;
        }
        // Dropping our sender ends the actor once in-flight senders are done and its queue
        // is empty; a command after this starts a new actor.
        slot.mailbox.lock().take();
        false
    });
}

fn handle(inner: &Inner, slot: &Slot, msg: Msg) {
    match msg {
        Msg::Execute {
            key,
            request,
            reply,
        } => {
            let answer = execute(inner, slot, key, request);
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
                .map(|(index, key, request)| (index, execute(inner, slot, key, request)))
                .collect();
            let _ = reply.send(answers);
        }
    }
}

fn execute(inner: &Inner, slot: &Slot, key: Option<IdempotencyKey>, request: Request) -> Answer {
    let now_ms = inner.clock.now_ms();
    let mut account = slot.state.lock();
    debug_assert_eq!(account.id(), &slot.id);
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
