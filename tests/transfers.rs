//! Transfers over HTTP against a real server on 127.0.0.1 (docs/API.md, `POST /v1/transfers` and
//! `GET /v1/transfers/{id}`): the answer, every refusal with nothing moved, idempotent
//! retries (also concurrent and across a restart), the key lookup, transfers that cross
//! each other, a hot destination, the refund when the destination refuses, and money
//! conservation with the in-flight gauge.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::TestServer;
use serde_json::{json, Value};

/// 2^53 - 1, the largest amount and balance.
const MAX: u64 = 9_007_199_254_740_991;

struct Resp {
    status: u16,
    replayed: bool,
    body: Value,
}

async fn send(request: reqwest::RequestBuilder) -> Resp {
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let bytes = response.bytes().await.expect("body read");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        replayed,
        body,
    }
}

fn key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("tk-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn open(ts: &TestServer, id: &str, currency: &str) {
    let r = send(
        ts.client
            .put(ts.url(&format!("/v1/accounts/{id}")))
            .json(&json!({ "currency": currency })),
    )
    .await;
    assert_eq!(r.status, 201, "open {id}: {}", r.body);
}

async fn credit(ts: &TestServer, id: &str, amount: u64) {
    let r = send(
        ts.client
            .post(ts.url(&format!("/v1/accounts/{id}/credits")))
            .header("idempotency-key", key())
            .json(&json!({ "amount": amount })),
    )
    .await;
    assert_eq!(r.status, 201, "credit {id}: {}", r.body);
}

async fn account(ts: &TestServer, id: &str) -> Value {
    let r = send(ts.client.get(ts.url(&format!("/v1/accounts/{id}")))).await;
    assert_eq!(r.status, 200, "get {id}: {}", r.body);
    r.body
}

async fn transfer_raw(ts: &TestServer, key: Option<&str>, body: &Value) -> Resp {
    let mut request = ts.client.post(ts.url("/v1/transfers")).json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    send(request).await
}

async fn transfer(ts: &TestServer, key: &str, from: &str, to: &str, amount: u64) -> Resp {
    transfer_raw(
        ts,
        Some(key),
        &json!({ "from": from, "to": to, "amount": amount }),
    )
    .await
}

fn assert_problem(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.body["code"], code, "{}", r.body);
}

/// Balance and seq of an account.
async fn numbers(ts: &TestServer, id: &str) -> (i64, u64) {
    let a = account(ts, id).await;
    (
        a["balance"].as_i64().expect("balance"),
        a["seq"].as_u64().expect("seq"),
    )
}

async fn metric(ts: &TestServer, name: &str) -> u64 {
    let text = ts.get_text("/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

#[tokio::test]
async fn a_transfer_moves_money_and_answers_with_both_accounts() {
    let ts = TestServer::start().await;
    open(&ts, "alice", "GEM").await;
    open(&ts, "bob", "GEM").await;
    credit(&ts, "alice", 100).await;

    let r = transfer_raw(
        &ts,
        Some("t-1"),
        &json!({"from": "alice", "to": "bob", "amount": 30, "metadata": {"trade": "sword"}}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(!r.replayed);
    let t = &r.body["transfer"];
    let id = t["id"].as_str().expect("transfer id").to_string();
    assert_eq!(
        uuid::Uuid::parse_str(&id).expect("uuid").get_version_num(),
        7
    );
    assert_eq!(t["from"], "alice");
    assert_eq!(t["to"], "bob");
    assert_eq!(t["amount"], 30);
    assert_eq!(t["status"], "completed");
    assert_eq!(t["metadata"], json!({"trade": "sword"}));
    assert!(t["created_at"].is_string());
    assert!(t.get("failure_code").is_none());
    assert_eq!(r.body["from_account"]["balance"], 70);
    assert_eq!(r.body["from_account"]["seq"], 2);
    assert_eq!(r.body["to_account"]["balance"], 30);
    assert_eq!(r.body["to_account"]["seq"], 1);

    // Each side has one transaction naming the transfer.
    let history = |id: &'static str| {
        let ts = &ts;
        async move {
            send(
                ts.client
                    .get(ts.url(&format!("/v1/accounts/{id}/transactions"))),
            )
            .await
            .body
        }
    };
    let out = &history("alice").await["transactions"][0];
    assert_eq!(out["kind"], "transfer_out");
    assert_eq!(out["amount"], 30);
    assert_eq!(out["transfer_id"], id.as_str());
    assert_eq!(out["balance"], 70);
    let inn = &history("bob").await["transactions"][0];
    assert_eq!(inn["kind"], "transfer_in");
    assert_eq!(inn["transfer_id"], id.as_str());
    assert_eq!(inn["metadata"], json!({"trade": "sword"}));

    // GET returns the transfer itself.
    let got = send(ts.client.get(ts.url(&format!("/v1/transfers/{id}")))).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, r.body["transfer"]);

    // The same key and body: the same answer, marked replayed, nothing applied twice.
    let again = transfer_raw(
        &ts,
        Some("t-1"),
        &json!({"from": "alice", "to": "bob", "amount": 30, "metadata": {"trade": "sword"}}),
    )
    .await;
    assert_eq!(again.status, 201);
    assert!(again.replayed);
    assert_eq!(again.body, r.body);
    assert_eq!(numbers(&ts, "alice").await, (70, 2));
    assert_eq!(numbers(&ts, "bob").await, (30, 1));

    // The same key with another body is refused; so is the key on another path's scope
    // only when it is the same account (keys are scoped to `from`).
    let reused = transfer(&ts, "t-1", "alice", "bob", 31).await;
    assert_problem(&reused, 422, "idempotency_key_reused");
    let other_scope = transfer(&ts, "t-1", "bob", "alice", 5).await;
    assert_eq!(other_scope.status, 201, "{}", other_scope.body);

    // The key lookup on the source tells what happened.
    let lookup = send(
        ts.client
            .get(ts.url("/v1/accounts/alice/idempotency-keys/t-1")),
    )
    .await;
    assert_eq!(lookup.status, 200);
    assert_eq!(lookup.body["status"], 201);
    assert_eq!(lookup.body["response"], r.body);
}

#[tokio::test]
async fn refused_transfers_move_nothing() {
    let ts = TestServer::start().await;
    open(&ts, "alice", "GEM").await;
    open(&ts, "bob", "GEM").await;
    open(&ts, "carol", "USD").await;
    credit(&ts, "alice", 100).await;

    assert_problem(
        &transfer(&ts, &key(), "alice", "alice", 10).await,
        422,
        "validation_failed",
    );
    assert_problem(
        &transfer(&ts, &key(), "alice", "nobody", 10).await,
        404,
        "account_not_found",
    );
    assert_problem(
        &transfer(&ts, &key(), "nobody", "alice", 10).await,
        404,
        "account_not_found",
    );
    assert_problem(
        &transfer(&ts, &key(), "alice", "carol", 10).await,
        409,
        "currency_mismatch",
    );
    assert_problem(
        &transfer(&ts, &key(), "alice", "bob", 101).await,
        409,
        "insufficient_funds",
    );
    for amount in [json!(0), json!(-1), json!(MAX + 1)] {
        let r = transfer_raw(
            &ts,
            Some(&key()),
            &json!({"from": "alice", "to": "bob", "amount": amount}),
        )
        .await;
        assert_problem(&r, 422, "validation_failed");
    }
    for body in [
        json!({"from": "alice", "to": "bob", "amount": "5"}),
        json!({"from": "alice", "to": "bob", "amount": 1.5}),
        json!({"from": "alice", "to": "bob"}),
        json!({"from": "alice", "amount": 5}),
        json!({"from": "al ice", "to": "bob", "amount": 5}),
        json!({"from": "alice", "to": "bob", "amount": 5, "extra": 1}),
        json!(["alice", "bob", 5]),
    ] {
        let r = transfer_raw(&ts, Some(&key()), &body).await;
        assert_problem(&r, 400, "invalid_request");
    }
    let r = transfer_raw(
        &ts,
        None,
        &json!({"from": "alice", "to": "bob", "amount": 5}),
    )
    .await;
    assert_problem(&r, 400, "idempotency_key_missing");

    assert_eq!(numbers(&ts, "alice").await, (100, 1));
    assert_eq!(numbers(&ts, "bob").await, (0, 0));
    assert_eq!(numbers(&ts, "carol").await, (0, 0));

    // A refused request leaves no trace: the same key can succeed later.
    let k = key();
    assert_problem(
        &transfer(&ts, &k, "alice", "bob", 150).await,
        409,
        "insufficient_funds",
    );
    credit(&ts, "alice", 100).await;
    let r = transfer(&ts, &k, "alice", "bob", 150).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(!r.replayed);

    // Unknown and malformed transfer ids.
    let unknown = send(
        ts.client
            .get(ts.url(&format!("/v1/transfers/{}", uuid::Uuid::now_v7()))),
    )
    .await;
    assert_problem(&unknown, 404, "transfer_not_found");
    let bad = send(ts.client.get(ts.url("/v1/transfers/not-a-uuid"))).await;
    assert_problem(&bad, 400, "invalid_request");
}

#[tokio::test]
async fn a_destination_at_its_balance_limit_refuses_and_the_source_is_refunded() {
    let ts = TestServer::start().await;
    open(&ts, "alice", "GEM").await;
    open(&ts, "whale", "GEM").await;
    credit(&ts, "alice", 100).await;
    credit(&ts, "whale", MAX - 5).await;

    let k = key();
    let r = transfer(&ts, &k, "alice", "whale", 10).await;
    assert_problem(&r, 409, "balance_limit_exceeded");
    assert!(!r.replayed);
    let detail = r.body["detail"].as_str().expect("detail");
    assert!(detail.contains("went back to alice"), "{detail}");

    // Debited, then refunded: two transactions on the source, none on the destination.
    assert_eq!(numbers(&ts, "alice").await, (100, 3));
    assert_eq!(numbers(&ts, "whale").await, ((MAX - 5) as i64, 1));
    let history = send(ts.client.get(ts.url("/v1/accounts/alice/transactions"))).await;
    let txs = history.body["transactions"]
        .as_array()
        .expect("transactions");
    assert_eq!(txs[0]["kind"], "transfer_in");
    assert_eq!(txs[1]["kind"], "transfer_out");
    assert_eq!(txs[0]["transfer_id"], txs[1]["transfer_id"]);
    let id = txs[0]["transfer_id"].as_str().expect("transfer id");

    let got = send(ts.client.get(ts.url(&format!("/v1/transfers/{id}")))).await;
    assert_eq!(got.body["status"], "failed");
    assert_eq!(got.body["failure_code"], "balance_limit_exceeded");

    // A retry answers the same refusal again and moves nothing.
    let again = transfer(&ts, &k, "alice", "whale", 10).await;
    assert_problem(&again, 409, "balance_limit_exceeded");
    assert!(again.replayed);
    assert_eq!(again.body, r.body);
    assert_eq!(numbers(&ts, "alice").await, (100, 3));
    assert_eq!(metric(&ts, "coffer_transfers_in_flight").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_transfers_apply_once() {
    let ts = TestServer::start().await;
    open(&ts, "alice", "GEM").await;
    open(&ts, "bob", "GEM").await;
    credit(&ts, "alice", 1000).await;
    let body = json!({"from": "alice", "to": "bob", "amount": 7});
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let request = ts
            .client
            .post(ts.url("/v1/transfers"))
            .header("idempotency-key", "same")
            .json(&body);
        tasks.spawn(send(request));
    }
    let answers: Vec<Resp> = tasks.join_all().await;
    let first: Vec<&Resp> = answers.iter().filter(|r| !r.replayed).collect();
    assert_eq!(first.len(), 1, "exactly one answer is not a replay");
    for r in &answers {
        assert_eq!(r.status, 201);
        assert_eq!(r.body, first[0].body);
    }
    assert_eq!(numbers(&ts, "alice").await, (993, 2));
    assert_eq!(numbers(&ts, "bob").await, (7, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_transfers_and_a_hot_destination_conserve_money() {
    let ts = TestServer::start().await;
    let players: u32 = 40;
    open(&ts, "house", "GEM").await;
    open(&ts, "a", "GEM").await;
    open(&ts, "b", "GEM").await;
    credit(&ts, "a", 10_000).await;
    credit(&ts, "b", 10_000).await;
    for i in 0..players {
        open(&ts, &format!("p{i}"), "GEM").await;
        credit(&ts, &format!("p{i}"), 100).await;
    }
    // Two accounts sending to each other at the same time, and every player paying the
    // house at once: all must finish, none twice.
    let mut tasks = Vec::new();
    for round in 0..50 {
        let ts_a = ts.client.clone();
        let base = ts.base.clone();
        tasks.push(tokio::spawn(async move {
            let (from, to) = if round % 2 == 0 {
                ("a", "b")
            } else {
                ("b", "a")
            };
            send(
                ts_a.post(format!("{base}/v1/transfers"))
                    .header("idempotency-key", format!("x-{round}"))
                    .json(&json!({"from": from, "to": to, "amount": 3})),
            )
            .await
            .status
        }));
    }
    for i in 0..players {
        for n in 0..5 {
            let client = ts.client.clone();
            let base = ts.base.clone();
            tasks.push(tokio::spawn(async move {
                send(
                    client
                        .post(format!("{base}/v1/transfers"))
                        .header("idempotency-key", format!("pay-{n}"))
                        .json(&json!({"from": format!("p{i}"), "to": "house", "amount": 20})),
                )
                .await
                .status
            }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 201);
    }
    assert_eq!(numbers(&ts, "a").await, (10_000, 51));
    assert_eq!(numbers(&ts, "b").await, (10_000, 51));
    assert_eq!(
        numbers(&ts, "house").await,
        (i64::from(players) * 100, u64::from(players) * 5)
    );
    for i in 0..players {
        assert_eq!(numbers(&ts, &format!("p{i}")).await, (0, 6));
    }
    let conservation = ts.engine().conservation();
    assert!(conservation.holds(), "{conservation:?}");
    assert_eq!(conservation.in_flight, 0);
    assert_eq!(metric(&ts, "coffer_transfers_in_flight").await, 0);
}

#[tokio::test]
async fn transfers_and_their_keys_survive_a_restart() {
    let mut ts = TestServer::start().await;
    open(&ts, "alice", "GEM").await;
    open(&ts, "bob", "GEM").await;
    credit(&ts, "alice", 100).await;
    let first = transfer(&ts, "r-1", "alice", "bob", 40).await;
    assert_eq!(first.status, 201);
    let id = first.body["transfer"]["id"]
        .as_str()
        .expect("id")
        .to_string();

    ts.restart().await;
    let again = transfer(&ts, "r-1", "alice", "bob", 40).await;
    assert_eq!(again.status, 201);
    assert!(again.replayed);
    assert_eq!(again.body, first.body);
    let got = send(ts.client.get(ts.url(&format!("/v1/transfers/{id}")))).await;
    assert_eq!(got.body, first.body["transfer"]);
    assert_eq!(numbers(&ts, "alice").await, (60, 2));
    assert_eq!(numbers(&ts, "bob").await, (40, 1));

    // And from a snapshot, too.
    ts.engine().snapshot().await.expect("snapshot");
    ts.restart().await;
    let again = transfer(&ts, "r-1", "alice", "bob", 40).await;
    assert!(again.replayed);
    assert_eq!(again.body, first.body);
    assert!(ts.engine().conservation().holds());
}

/// Cuts the last record of the WAL in `data_dir`, as a crash that tore the last group commit
/// would; returns the LSN cut.
fn cut_last_record(data_dir: &std::path::Path) -> u64 {
    let mut segments: Vec<_> = std::fs::read_dir(data_dir.join("wal"))
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment");
    let bytes = std::fs::read(last).expect("read the segment");
    let mut offset = 0;
    let mut last_frame = None;
    while let Ok((frame, size)) = coffer::wal::codec::decode_frame(&bytes[offset..]) {
        last_frame = Some((offset, frame.lsn));
        offset += size;
    }
    let (start, lsn) = last_frame.expect("the last segment has a record");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .expect("open the segment");
    file.set_len(start as u64).expect("cut");
    lsn
}

#[tokio::test]
async fn recovery_finishes_a_transfer_whose_second_half_was_lost() {
    // Goal: a crash between the two halves (the log has the debit and not the credit, or
    // not the refund) is finished by recovery before the server is ready: completed, or
    // failed with the source refunded; the retry answers as the first answer did.
    for refused in [false, true] {
        let mut ts = TestServer::start_with(|config| {
            config.snapshot_every_records = None;
            config.snapshot_interval = None;
        })
        .await;
        open(&ts, "alice", "GEM").await;
        open(&ts, "bob", "GEM").await;
        credit(&ts, "alice", 100).await;
        if refused {
            credit(&ts, "bob", MAX - 10).await;
        }
        let first = transfer(&ts, "half", "alice", "bob", 30).await;
        assert_eq!(
            first.status,
            if refused { 409 } else { 201 },
            "{}",
            first.body
        );
        ts.stop().await;

        cut_last_record(ts.dir.path());
        let verified = coffer::audit::verify(ts.dir.path(), None).expect("the cut log verifies");
        assert_eq!(verified.transfers_pending, (1, 30), "refused: {refused}");

        ts.resume().await;
        assert_eq!(metric(&ts, "coffer_transfers_in_flight").await, 0);
        let again = transfer(&ts, "half", "alice", "bob", 30).await;
        assert!(again.replayed);
        assert_eq!(again.status, first.status);
        assert_eq!(again.body, first.body, "refused: {refused}");
        let (alice, bob) = (numbers(&ts, "alice").await, numbers(&ts, "bob").await);
        if refused {
            assert_eq!(alice, (100, 3));
            assert_eq!(bob, ((MAX - 10) as i64, 1));
        } else {
            assert_eq!(alice, (70, 2));
            assert_eq!(bob, (30, 1));
        }
        assert!(ts.engine().conservation().holds());
        let verified = coffer::audit::verify(ts.dir.path(), None).expect("verifies");
        assert_eq!(verified.transfers_pending, (0, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_accounts_paying_one_hot_account_at_once_all_finish() {
    // Goal: no deadlock and no lost wake-up when 2,000 accounts transfer to one account
    // at the same time while it also pays some of them back; every transfer finishes
    // exactly once, within a bounded time.
    use coffer::domain::{AccountId, Currency, IdempotencyKey, Metadata, Request};
    let ts = TestServer::start().await;
    let engine = ts.engine().clone();
    let senders = 2000u32;
    let id = |text: String| AccountId::parse(&text).expect("id");
    let gem = Currency::parse("GEM").expect("currency");
    engine
        .open_account(id("hot".into()), gem.clone(), 0, Metadata::empty())
        .await
        .expect("open hot");
    let mut setup = tokio::task::JoinSet::new();
    for i in 0..senders {
        let engine = engine.clone();
        let gem = gem.clone();
        setup.spawn(async move {
            let account = id(format!("s{i}"));
            engine
                .open_account(account.clone(), gem, 0, Metadata::empty())
                .await
                .expect("open");
            let credit = Request::Credit {
                amount: 10,
                metadata: Default::default(),
            };
            engine
                .execute(
                    &account,
                    Some(IdempotencyKey::parse("c").expect("key")),
                    credit,
                )
                .await
                .expect("credit");
        });
    }
    setup.join_all().await;
    let started = std::time::Instant::now();
    let mut transfers = tokio::task::JoinSet::new();
    for i in 0..senders {
        let sender = engine.clone();
        transfers.spawn(async move {
            let engine = sender;
            let from = id(format!("s{i}"));
            let pay = Request::Transfer {
                to: id("hot".into()),
                amount: 10,
                metadata: Default::default(),
            };
            let key = IdempotencyKey::parse("pay").expect("key");
            engine
                .transfer(&from, Some(key), pay)
                .await
                .expect("transfer")
        });
        if i % 4 == 0 {
            // The hot account pays back some of them meanwhile: transfers cross.
            let engine = engine.clone();
            transfers.spawn(async move {
                let back = Request::Transfer {
                    to: id(format!("s{i}")),
                    amount: 1,
                    metadata: Default::default(),
                };
                let key = IdempotencyKey::parse(&format!("back-{i}")).expect("key");
                loop {
                    match engine
                        .transfer(&id("hot".into()), Some(key.clone()), back.clone())
                        .await
                    {
                        Ok(outcome) => return outcome,
                        // Until the hot account has received something.
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                    }
                }
            });
        }
    }
    let outcomes = tokio::time::timeout(std::time::Duration::from_secs(60), transfers.join_all())
        .await
        .expect("every transfer finishes (no deadlock, no lost wake-up)");
    assert!(outcomes
        .iter()
        .all(|o| o.record.status.as_str() == "completed"));
    let paid_back = u64::from(senders.div_ceil(4));
    assert_eq!(outcomes.len() as u64, u64::from(senders) + paid_back);
    let hot = engine.account(&id("hot".into())).await.expect("hot");
    assert_eq!(hot.balance, i64::from(senders) * 10 - paid_back as i64);
    assert_eq!(hot.seq, u64::from(senders) + paid_back);
    let conservation = engine.conservation();
    assert!(conservation.holds(), "{conservation:?}");
    assert_eq!(conservation.external, i64::from(senders) * 10);
    eprintln!(
        "{} transfers to and from one hot account in {:?}",
        outcomes.len(),
        started.elapsed()
    );
}
