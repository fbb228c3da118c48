//! A full account mailbox pushes back over HTTP: the request that finds no room within the
//! wait answers 503 `overloaded` with `Retry-After`, applies nothing, and may be retried with
//! the same key; the requests that did get in are answered normally.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use coffer::clock::{Clock, SystemClock};
use common::TestServer;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// A clock whose first reading after `arm` blocks until `release`: the actor that reads it
/// stops there, mid-command, so its mailbox fills up behind it.
#[derive(Default)]
struct GateClock {
    armed: AtomicBool,
    released: Mutex<bool>,
    opened: Condvar,
    entered: Notify,
}

/// How long a gated reading waits for `release` at most, so a broken test cannot hang.
const GATE_WAIT_MAX: Duration = Duration::from_secs(30);

impl GateClock {
    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn release(&self) {
        let mut released = self.released.lock().expect("gate lock");
        *released = true;
        self.opened.notify_all();
    }
}

impl Clock for GateClock {
    fn now_ms(&self) -> u64 {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            let released = self.released.lock().expect("gate lock");
            let _ = self
                .opened
                .wait_timeout_while(released, GATE_WAIT_MAX, |released| !*released)
                .expect("gate lock");
        }
        SystemClock.now_ms()
    }
}

async fn credit(ts: &TestServer, key: &str, amount: u64) -> reqwest::Response {
    send_credit(ts, key, amount).await
}

/// A credit of the busy account, as a future that owns what it needs (it can be spawned).
fn send_credit(
    ts: &TestServer,
    key: &str,
    amount: u64,
) -> impl std::future::Future<Output = reqwest::Response> + Send + 'static {
    let request = ts
        .client
        .post(ts.url("/v1/accounts/busy/credits"))
        .header("Idempotency-Key", key)
        .json(&json!({ "amount": amount }));
    async move { request.send().await.expect("send a credit") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_mailbox_answers_503_overloaded_with_retry_after_and_applies_nothing() {
    // Goal: with one actor whose one-slot mailbox is full, a further request waits for room,
    // then answers 503 overloaded with Retry-After: 1; it applies nothing, a retry with the
    // same key succeeds afresh, and the queued requests complete normally.
    let gate = Arc::new(GateClock::default());
    let clock = gate.clone();
    let ts = TestServer::start_with(move |config| {
        config.actors = 1;
        config.mailbox_capacity = 1;
        config.expiry_sweep = None;
        config.snapshot_interval = None;
        config.clock = clock;
    })
    .await;
    let created = ts
        .client
        .put(ts.url("/v1/accounts/busy"))
        .json(&json!({"currency": "GEM"}))
        .send()
        .await
        .expect("open the account");
    assert_eq!(created.status(), 201);

    // A: taken by the actor, which then stops at its clock reading.
    gate.arm();
    let entered = gate.entered.notified();
    let first = tokio::spawn(send_credit(&ts, "a", 1));
    tokio::time::timeout(Duration::from_secs(10), entered)
        .await
        .expect("the actor reads the clock for the first credit");

    // B: waits in the mailbox, which is then full.
    let second = tokio::spawn(send_credit(&ts, "b", 10));
    let mut queued = 0;
    for _ in 0..1000 {
        queued = ts.engine().stats().queued_commands;
        if queued == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(queued, 1, "the second credit waits in the mailbox");

    // C: finds no room within the send wait.
    let refused = credit(&ts, "c", 100).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(
        refused
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let problem: Value = refused.json().await.expect("a problem body");
    assert_eq!(problem["code"], "overloaded");
    assert_eq!(problem["status"], 503);

    gate.release();
    for (task, amount) in [(first, 1), (second, 10)] {
        let response = task.await.expect("join");
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("a receipt");
        assert_eq!(body["transaction"]["amount"], amount);
    }

    // Nothing of C was applied or remembered: its key is unknown, the balance is A + B.
    let lookup = ts
        .client
        .get(ts.url("/v1/accounts/busy/idempotency-keys/c"))
        .send()
        .await
        .expect("look up key c");
    assert_eq!(lookup.status(), 404);
    let account: Value = ts.get_json("/v1/accounts/busy").await;
    assert_eq!(account["balance"], 11);
    assert_eq!(account["seq"], 2);

    // A retry with the same key is evaluated afresh, not as a replay.
    let retried = credit(&ts, "c", 100).await;
    assert_eq!(retried.status(), 201);
    assert!(retried.headers().get("idempotent-replayed").is_none());
    let body: Value = retried.json().await.expect("a receipt");
    assert_eq!(body["account"]["balance"], 111);
}
