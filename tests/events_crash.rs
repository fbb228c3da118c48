//! The event stream across SIGKILL of the real binary: a consumer long-polls
//! `GET /v1/events` while writers credit accounts and the server is killed and restarted on
//! the same data directory, again and again. Every acknowledged transaction must reach the
//! consumer exactly once after de-duplication by transaction id, each account's transactions
//! in `seq` order with no gap, and cursors only ever grow (no record is delivered twice).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{coffer_bin, http_client, ServerProcess};
use serde_json::{json, Value};

/// SIGKILL/restart cycles.
const KILL_CYCLES: usize = 3;
/// Accounts written to.
const ACCOUNTS: usize = 4;
/// Concurrent writers.
const WRITERS: usize = 4;
/// How long the load runs before each kill.
const LOAD_BEFORE_KILL: Duration = Duration::from_millis(700);
/// Bound of the whole test's waiting loops.
const DEADLINE: Duration = Duration::from_secs(120);

/// Starts the binary with small segments and frequent snapshots, so kills land around
/// rotations and snapshots; the retention keeps every event readable for the consumer.
async fn start_server(data_dir: &Path, logs: &Path) -> ServerProcess {
    let args = [
        "--wal-segment-bytes",
        "65536",
        "--snapshot-every-records",
        "400",
        "--event-retention",
        "1h",
    ];
    common::process::start_server(&coffer_bin(), data_dir, logs, &args).await
}

/// What the consumer saw: (cursor, transaction), in arrival order.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// Long-polls the stream from the start, following the current server's address, until told
/// to stop; retries (with the same cursor) when the server is down.
async fn consume(base: Arc<Mutex<String>>, seen: Seen, stop: Arc<AtomicBool>) -> String {
    let client = http_client();
    let mut after: Option<String> = None;
    let deadline = Instant::now() + DEADLINE;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let url = {
            let base = base.lock().expect("base").clone();
            match &after {
                None => format!("{base}/v1/events?limit=500&wait_ms=500"),
                Some(after) => format!("{base}/v1/events?limit=500&wait_ms=500&after={after}"),
            }
        };
        let page: Value = match client.get(&url).send().await {
            Ok(response) if response.status() == 200 => match response.json().await {
                Ok(page) => page,
                Err(_) => continue,
            },
            Ok(response) => panic!("GET {url}: {}", response.status()),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut seen = seen.lock().expect("seen");
        for event in page["events"].as_array().into_iter().flatten() {
            let cursor = event["cursor"].as_str().expect("cursor").to_string();
            seen.push((cursor, event["transaction"].clone()));
        }
        after = Some(page["next"].as_str().expect("next").to_string());
    }
    after.unwrap_or_default()
}

/// Credits random accounts until told to stop; returns the acknowledged transactions.
async fn write(
    base: Arc<Mutex<String>>,
    writer: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> Vec<Value> {
    let client = http_client();
    let mut acked = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let n = sent.fetch_add(1, Ordering::Relaxed);
        let account = format!("acct-{}", (writer + i) % ACCOUNTS);
        let url = format!(
            "{}/v1/accounts/{account}/credits",
            base.lock().expect("base")
        );
        let answer = client
            .post(url)
            .header("Idempotency-Key", format!("w{writer}-{i}-{n}"))
            .json(&json!({"amount": 1 + (i % 7)}))
            .send()
            .await;
        match answer {
            Ok(response) if response.status() == 201 => {
                if let Ok(body) = response.json::<Value>().await {
                    acked.push(body["transaction"].clone());
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_sees_every_acknowledged_transaction_once_in_order_across_sigkills() {
    let data = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut server = start_server(data.path(), logs.path()).await;
    let client = http_client();
    for a in 0..ACCOUNTS {
        let response = client
            .put(format!("{}/v1/accounts/acct-{a}", server.base))
            .json(&json!({"currency": "GEM"}))
            .send()
            .await
            .expect("PUT account");
        assert_eq!(response.status(), 201);
    }
    let base = Arc::new(Mutex::new(server.base.clone()));
    let seen: Seen = Arc::default();
    let stop_consumer = Arc::new(AtomicBool::new(false));
    let consumer = tokio::spawn(consume(base.clone(), seen.clone(), stop_consumer.clone()));
    let stop_writers = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(write(base.clone(), w, stop_writers.clone(), sent.clone())))
        .collect();
    for _ in 1..=KILL_CYCLES {
        tokio::time::sleep(LOAD_BEFORE_KILL).await;
        server.child.kill().expect("SIGKILL");
        server.child.wait().expect("reap");
        server = start_server(data.path(), logs.path()).await;
        *base.lock().expect("base") = server.base.clone();
    }
    tokio::time::sleep(LOAD_BEFORE_KILL).await;
    stop_writers.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await.expect("writer"));
    }
    assert!(acked.len() > 50, "the load wrote: {}", acked.len());
    // Let the consumer reach the end of the log, then stop it.
    let end = {
        let page: Value = client
            .get(format!(
                "{}/v1/events?limit=1&after=e0000000000000000",
                server.base
            ))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON");
        page["events"][0]["cursor"].as_str().map(str::to_string)
    };
    assert!(end.is_some(), "the log is readable from the start");
    let total = acked.len();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let ids: BTreeSet<String> = seen
            .lock()
            .expect("seen")
            .iter()
            .map(|(_, t)| t["id"].to_string())
            .collect();
        if acked.iter().all(|t| ids.contains(&t["id"].to_string())) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop_consumer.store(true, Ordering::Relaxed);
    let mut after = consumer.await.expect("consumer");
    // Drain what is left after the consumer's last cursor (writes nobody saw acknowledged).
    let mut seen = seen.lock().expect("seen").clone();
    for _ in 0..1000 {
        let page: Value = client
            .get(format!(
                "{}/v1/events?limit=1000&after={after}",
                server.base
            ))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON");
        let events = page["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            break;
        }
        for event in events {
            let cursor = event["cursor"].as_str().expect("cursor").to_string();
            seen.push((cursor, event["transaction"].clone()));
        }
        after = page["next"].as_str().expect("next").to_string();
    }
    // Cursors only grow: nothing was delivered twice, nothing out of commit order.
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "cursors grow");
    // After de-duplication by id (a no-op here, but what a consumer does), every acknowledged
    // transaction is there, exactly as it was acknowledged.
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    for (_, tx) in &seen {
        if let Some(first) = by_id.insert(tx["id"].to_string(), tx.clone()) {
            assert_eq!(&first, tx, "a duplicate is the same transaction");
        }
    }
    for tx in &acked {
        assert_eq!(
            by_id.get(&tx["id"].to_string()),
            Some(tx),
            "acknowledged and delivered"
        );
    }
    // Per account: seq 1, 2, 3, ... in arrival order, no gap, and the balances add up.
    let mut last: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for (_, tx) in &seen {
        let account = tx["account_id"].as_str().expect("account").to_string();
        let (seq, balance) = last.get(&account).copied().unwrap_or((0, 0));
        assert_eq!(
            tx["seq"].as_u64(),
            Some(seq + 1),
            "{account}: seq order without a gap"
        );
        let amount = tx["amount"].as_i64().expect("amount");
        assert_eq!(
            tx["balance"].as_i64(),
            Some(balance + amount),
            "{account}: balance after"
        );
        last.insert(account, (seq + 1, balance + amount));
    }
    // And the stream ends where each account is.
    for (account, (seq, balance)) in &last {
        let view: Value = client
            .get(format!("{}/v1/accounts/{account}", server.base))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON");
        assert_eq!(view["seq"].as_u64(), Some(*seq), "{account}: {view}");
        assert_eq!(view["balance"].as_i64(), Some(*balance));
    }
    eprintln!(
        "{} acknowledged of {} sent, {} delivered over {KILL_CYCLES} kills",
        total,
        sent.load(Ordering::Relaxed),
        seen.len()
    );
    drop(server);
}
