//! HTTP tests against a real server on `127.0.0.1:0` (docs/API.md): every endpoint, status
//! and error code of accounts, credits, debits, holds, lists, idempotency and operations.
//! Transfers, batch, events and authentication are covered elsewhere.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use coffer::clock::ManualClock;
use common::TestServer;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{json, Value};
use uuid::Uuid;

/// 2^53 - 1, the largest amount and balance.
const MAX: u64 = 9_007_199_254_740_991;
/// 2027-01-15T08:00:00.000Z
const T0_MS: u64 = 1_800_000_000_000;
const T0_TEXT: &str = "2027-01-15T08:00:00.000Z";

// ---------------------------------------------------------------------------------------
// Helpers

/// A received answer.
struct Resp {
    status: u16,
    headers: HeaderMap,
    bytes: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    fn replayed(&self) -> bool {
        match self.header("idempotent-replayed") {
            None => false,
            Some("true") => true,
            Some(other) => panic!("Idempotent-Replayed: {other}"),
        }
    }
}

async fn send(request: reqwest::RequestBuilder) -> Resp {
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body read").to_vec();
    Resp {
        status,
        headers,
        bytes,
    }
}

/// A fresh idempotency key.
fn key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("key-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn get(ts: &TestServer, path: &str) -> Resp {
    send(ts.client.get(ts.url(path))).await
}

async fn put(ts: &TestServer, path: &str, body: impl Into<reqwest::Body>) -> Resp {
    send(
        ts.client
            .put(ts.url(path))
            .header("content-type", "application/json")
            .body(body),
    )
    .await
}

/// POSTs a raw body, with the `Idempotency-Key` header when `key` is given.
async fn post_raw(
    ts: &TestServer,
    path: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Resp {
    let mut request = ts
        .client
        .post(ts.url(path))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    send(request).await
}

async fn post(ts: &TestServer, path: &str, key: &str, body: &Value) -> Resp {
    post_raw(ts, path, Some(key), body.to_string()).await
}

async fn open_account(ts: &TestServer, id: &str, body: Value) -> Value {
    let r = put(ts, &format!("/v1/accounts/{id}"), body.to_string()).await;
    assert_eq!(r.status, 201, "open {id}: {}", r.text());
    r.json()
}

async fn open(ts: &TestServer, id: &str) -> Value {
    open_account(ts, id, json!({"currency": "GEM"})).await
}

async fn account(ts: &TestServer, id: &str) -> Value {
    let r = get(ts, &format!("/v1/accounts/{id}")).await;
    assert_eq!(r.status, 200, "get {id}: {}", r.text());
    r.json()
}

/// A credit that must succeed; returns the body.
async fn credit(ts: &TestServer, id: &str, amount: u64) -> Value {
    let r = post(
        ts,
        &format!("/v1/accounts/{id}/credits"),
        &key(),
        &json!({"amount": amount}),
    )
    .await;
    assert_eq!(r.status, 201, "credit {amount} to {id}: {}", r.text());
    r.json()
}

/// A hold that must succeed; returns the body.
async fn hold(ts: &TestServer, id: &str, body: Value) -> Value {
    let r = post(ts, &format!("/v1/accounts/{id}/holds"), &key(), &body).await;
    assert_eq!(r.status, 201, "hold on {id}: {}", r.text());
    r.json()
}

/// Asserts an RFC 9457 problem answer with this status and code.
#[track_caller]
fn assert_problem(r: &Resp, status: u16, code: &str) {
    assert_eq!(
        (r.status, r.header("content-type")),
        (status, Some("application/problem+json")),
        "expected {status} {code}, got: {}",
        r.text()
    );
    let body = r.json();
    let mut keys: Vec<&str> = body
        .as_object()
        .expect("a problem is an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    // The members every problem has, plus the extensions of its code: `field` (where the
    // offending value is, when one is) for validation problems, `available` and `requested`
    // for insufficient_funds.
    let mut expected = vec!["code", "detail", "status", "title", "type"];
    match code {
        "invalid_request" | "idempotency_key_missing" | "validation_failed"
            if body.get("field").is_some() =>
        {
            assert!(body["field"].is_string(), "{body}");
            expected.push("field");
        }
        "insufficient_funds" => {
            assert!(body["available"].is_i64(), "{body}");
            assert!(body["requested"].is_u64(), "{body}");
            expected.extend(["available", "requested"]);
        }
        _ => {}
    }
    expected.sort_unstable();
    assert_eq!(keys, expected, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["type"], format!("urn:coffer:error:{code}"), "{body}");
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(body["detail"].is_string(), "{body}");
}

/// Asserts a validation problem (400 or 422) naming `field` as where the fault is.
#[track_caller]
fn assert_problem_at(r: &Resp, status: u16, code: &str, field: &str) {
    assert_problem(r, status, code);
    assert_eq!(r.json()["field"], field, "{}", r.text());
}

/// Asserts that the account still has this seq and balance (nothing was applied).
async fn assert_untouched(ts: &TestServer, id: &str, seq: u64, balance: i64) {
    let a = account(ts, id).await;
    assert_eq!(
        (a["seq"].as_u64(), a["balance"].as_i64()),
        (Some(seq), Some(balance)),
        "{a}"
    );
}

fn sorted_keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    keys.sort_unstable();
    keys
}

/// `2026-11-22T01:02:03.456Z`
#[track_caller]
fn assert_timestamp(v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    let b = s.as_bytes();
    let ok = b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(ok, "not RFC 3339 UTC with milliseconds: {s}");
}

#[track_caller]
fn assert_uuid_v7(v: &Value) -> Uuid {
    let id = Uuid::parse_str(v.as_str().unwrap_or_default())
        .unwrap_or_else(|_| panic!("not a UUID: {v}"));
    assert_eq!(id.get_version_num(), 7, "not a UUID v7: {v}");
    id
}

#[track_caller]
fn assert_account_shape(a: &Value) {
    assert_eq!(
        sorted_keys(a),
        [
            "available",
            "balance",
            "created_at",
            "currency",
            "held",
            "id",
            "metadata",
            "open_holds",
            "overdraft_limit",
            "seq"
        ],
        "{a}"
    );
    assert!(a["id"].is_string() && a["currency"].is_string(), "{a}");
    for field in ["held", "overdraft_limit", "open_holds", "seq"] {
        assert!(a[field].is_u64(), "{field} in {a}");
    }
    for field in ["balance", "available"] {
        assert!(a[field].is_i64(), "{field} in {a}");
    }
    assert_eq!(
        a["available"].as_i64(),
        Some(a["balance"].as_i64().unwrap() - a["held"].as_i64().unwrap()),
        "{a}"
    );
    assert_timestamp(&a["created_at"]);
    assert!(a["metadata"].is_object(), "{a}");
}

#[track_caller]
fn assert_transaction_shape(t: &Value) {
    assert_eq!(
        sorted_keys(t),
        [
            "account_id",
            "amount",
            "available",
            "balance",
            "created_at",
            "held",
            "hold_id",
            "id",
            "kind",
            "metadata",
            "seq",
            "transfer_id"
        ],
        "{t}"
    );
    assert_uuid_v7(&t["id"]);
    assert_timestamp(&t["created_at"]);
    assert!(t["metadata"].is_object(), "{t}");
}

#[track_caller]
fn assert_hold_shape(h: &Value) {
    assert_eq!(
        sorted_keys(h),
        [
            "account_id",
            "amount",
            "captured",
            "created_at",
            "expires_at",
            "id",
            "metadata",
            "status"
        ],
        "{h}"
    );
    assert_uuid_v7(&h["id"]);
    assert_timestamp(&h["created_at"]);
    assert_timestamp(&h["expires_at"]);
    assert!(h["metadata"].is_object(), "{h}");
}

/// Replaces `created_at` and `id` of `actual` in `expected`, then compares the rest exactly.
#[track_caller]
fn assert_like(actual: &Value, mut expected: Value) {
    for field in ["id", "created_at", "expires_at"] {
        if expected.get(field).is_some_and(Value::is_null) && !actual[field].is_null() {
            expected[field] = actual[field].clone();
        }
    }
    assert_eq!(actual, &expected);
}

fn metadata_with_keys(n: usize) -> Value {
    Value::Object((0..n).map(|i| (format!("k{i}"), json!("v"))).collect())
}

// ---------------------------------------------------------------------------------------
// Accounts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_account_creates_confirms_and_conflicts() {
    // Goal: PUT creates an account (201), confirms an identical one (200) without comparing or changing metadata, and refuses different currency or overdraft_limit (409).
    let ts = TestServer::start().await;
    let path = "/v1/accounts/player-42";
    let r = put(
        &ts,
        path,
        r#"{"currency":"GEM","metadata":{"tier":"gold"}}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    assert_account_shape(&created);
    assert_like(
        &created,
        json!({"id": "player-42", "currency": "GEM", "balance": 0, "held": 0, "available": 0,
               "overdraft_limit": 0, "open_holds": 0, "seq": 0, "created_at": null,
               "metadata": {"tier": "gold"}}),
    );

    // Same currency and overdraft_limit (explicit or default), other metadata: 200, unchanged.
    for body in [
        r#"{"currency":"GEM"}"#,
        r#"{"currency":"GEM","overdraft_limit":0,"metadata":{"tier":"silver","x":"y"}}"#,
        r#"{"currency":"GEM","metadata":{}}"#,
    ] {
        let r = put(&ts, path, body).await;
        assert_eq!(r.status, 200, "{body}: {}", r.text());
        assert_eq!(r.json(), created, "{body}");
    }
    // Different fields: 409, and nothing changes.
    for body in [
        r#"{"currency":"USD"}"#,
        r#"{"currency":"GEM","overdraft_limit":5}"#,
        r#"{"currency":"USD","overdraft_limit":5,"metadata":{"tier":"gold"}}"#,
    ] {
        let r = put(&ts, path, body).await;
        assert_problem(&r, 409, "account_exists");
    }
    assert_eq!(account(&ts, "player-42").await, created);

    // An overdraft account: the same limit confirms, the default (0) conflicts.
    let od = open_account(
        &ts,
        "od",
        json!({"currency": "USD", "overdraft_limit": MAX}),
    )
    .await;
    assert_eq!(od["overdraft_limit"], MAX);
    let r = put(
        &ts,
        "/v1/accounts/od",
        json!({"currency": "USD", "overdraft_limit": MAX}).to_string(),
    )
    .await;
    assert_eq!((r.status, r.json()), (200, od.clone()));
    let r = put(&ts, "/v1/accounts/od", r#"{"currency":"USD"}"#).await;
    assert_problem(&r, 409, "account_exists");

    // Limits that pass exactly.
    let id128 = "a".repeat(128);
    let edge = open_account(
        &ts,
        &id128,
        json!({"currency": "ABCDEFGHIJ_12345",
               "metadata": {"k".repeat(40): "v".repeat(500), "e": "é".repeat(500)}}),
    )
    .await;
    assert_eq!(edge["id"], id128.as_str());
    assert_eq!(edge["metadata"]["e"], "é".repeat(500));
    let full = open_account(
        &ts,
        "sixteen-keys",
        json!({"currency": "GEM", "metadata": metadata_with_keys(16)}),
    )
    .await;
    assert_eq!(full["metadata"], metadata_with_keys(16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_account_refuses_bad_input() {
    // Goal: malformed PUTs are 400 invalid_request, out-of-bounds values 422 validation_failed, and none creates an account.
    let ts = TestServer::start().await;
    let invalid = [
        "{",
        "",
        "[]",
        "null",
        "{}",
        r#"{"currency":"GEM","colour":"red"}"#,
        r#"{"currency":5}"#,
        r#"{"currency":null}"#,
        r#"{"currency":"GEM","overdraft_limit":"5"}"#,
        r#"{"currency":"GEM","overdraft_limit":1.5}"#,
        r#"{"currency":"GEM","overdraft_limit":null}"#,
        r#"{"currency":"GEM","overdraft_limit":true}"#,
        r#"{"currency":"GEM","metadata":{"k":1}}"#,
        r#"{"currency":"GEM","metadata":[]}"#,
        r#"{"currency":"GEM","metadata":null}"#,
    ];
    for body in invalid {
        let r = put(&ts, "/v1/accounts/acct", body).await;
        assert_problem(&r, 400, "invalid_request");
    }
    let long_key = "k".repeat(41);
    let unprocessable = [
        json!({"currency": "gem"}),
        json!({"currency": ""}),
        json!({"currency": "ABCDEFGHIJKLMNOPQ"}),
        json!({"currency": "GE M"}),
        json!({"currency": "GEM", "overdraft_limit": -1}),
        json!({"currency": "GEM", "overdraft_limit": MAX + 1}),
        json!({"currency": "GEM", "metadata": metadata_with_keys(17)}),
        json!({"currency": "GEM", "metadata": {long_key: "v"}}),
        json!({"currency": "GEM", "metadata": {"k": "v".repeat(501)}}),
        json!({"currency": "GEM", "metadata": {"": "v"}}),
    ];
    for body in unprocessable {
        let r = put(&ts, "/v1/accounts/acct", body.to_string()).await;
        assert_problem(&r, 422, "validation_failed");
    }
    // A huge integer literal is an integer out of bounds, not a syntax error.
    let r = put(
        &ts,
        "/v1/accounts/acct",
        r#"{"currency":"GEM","overdraft_limit":100000000000000000000000}"#,
    )
    .await;
    assert_problem(&r, 422, "validation_failed");
    let r = get(&ts, "/v1/accounts/acct").await;
    assert_problem(&r, 404, "account_not_found");

    // Bad account ids in the path.
    let id129 = "a".repeat(129);
    for id in [id129.as_str(), "a%20b", "a%2Fb", "%C3%A9", "a+b", "a!b"] {
        let r = put(&ts, &format!("/v1/accounts/{id}"), r#"{"currency":"GEM"}"#).await;
        assert_problem(&r, 400, "invalid_request");
        let r = get(&ts, &format!("/v1/accounts/{id}")).await;
        assert_problem(&r, 400, "invalid_request");
    }
    let r = get(&ts, "/metrics").await;
    assert!(r.text().contains("coffer_accounts 0"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_account_shape_and_not_found() {
    // Goal: GET answers the Account exactly as docs/API.md shows it, and 404 account_not_found for an unknown id.
    let clock = Arc::new(ManualClock::new(T0_MS));
    let c = clock.clone();
    let ts = TestServer::start_with(|config| config.clock = c).await;
    open_account(
        &ts,
        "player-42",
        json!({"currency": "GEM", "overdraft_limit": 10, "metadata": {"a": "b"}}),
    )
    .await;
    clock.advance_ms(1_234);
    credit(&ts, "player-42", 1500).await;
    hold(&ts, "player-42", json!({"amount": 200})).await;
    let r = get(&ts, "/v1/accounts/player-42").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let a = r.json();
    assert_account_shape(&a);
    assert_eq!(
        a,
        json!({"id": "player-42", "currency": "GEM", "balance": 1500, "held": 200,
               "available": 1300, "overdraft_limit": 10, "open_holds": 1, "seq": 2,
               "created_at": T0_TEXT, "metadata": {"a": "b"}})
    );
    let r = get(&ts, "/v1/accounts/nobody").await;
    assert_problem(&r, 404, "account_not_found");
}

// ---------------------------------------------------------------------------------------
// Credits, debits, holds

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_and_debits_answer_transaction_and_account() {
    // Goal: credits and debits answer 201 {transaction, account} with the values just after them and number the changes 1, 2, 3.
    let ts = TestServer::start().await;
    open(&ts, "w1").await;
    let r = post(
        &ts,
        "/v1/accounts/w1/credits",
        &key(),
        &json!({"amount": 100, "metadata": {"order": "o-1"}}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(!r.replayed());
    let body = r.json();
    assert_eq!(sorted_keys(&body), ["account", "transaction"]);
    assert_transaction_shape(&body["transaction"]);
    assert_account_shape(&body["account"]);
    assert_like(
        &body["transaction"],
        json!({"id": null, "account_id": "w1", "seq": 1, "kind": "credit", "amount": 100,
               "hold_id": null, "transfer_id": null, "balance": 100, "held": 0,
               "available": 100, "created_at": null, "metadata": {"order": "o-1"}}),
    );
    assert_eq!(body["account"], account(&ts, "w1").await);
    assert_eq!(
        (&body["account"]["balance"], &body["account"]["seq"]),
        (&json!(100), &json!(1))
    );

    let r = post(
        &ts,
        "/v1/accounts/w1/debits",
        &key(),
        &json!({"amount": 30}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let body = r.json();
    assert_like(
        &body["transaction"],
        json!({"id": null, "account_id": "w1", "seq": 2, "kind": "debit", "amount": 30,
               "hold_id": null, "transfer_id": null, "balance": 70, "held": 0,
               "available": 70, "created_at": null, "metadata": {}}),
    );
    let r = post(
        &ts,
        "/v1/accounts/w1/credits",
        &key(),
        &json!({"amount": 5}),
    )
    .await;
    assert_eq!(r.json()["transaction"]["seq"], 3);
    let a = account(&ts, "w1").await;
    assert_eq!(
        (&a["balance"], &a["available"], &a["seq"]),
        (&json!(75), &json!(75), &json!(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_capture_and_release() {
    // Goal: holds reserve money, a partial capture is one capture transaction that releases the rest, and closed holds answer 409 hold_not_open naming their status.
    let ts = TestServer::start().await;
    open(&ts, "h").await;
    credit(&ts, "h", 100).await;

    let body = hold(
        &ts,
        "h",
        json!({"amount": 40, "expires_in_secs": 600, "metadata": {"cart": "c1"}}),
    )
    .await;
    assert_eq!(sorted_keys(&body), ["account", "hold", "transaction"]);
    assert_hold_shape(&body["hold"]);
    let h1 = body["hold"]["id"].as_str().unwrap().to_string();
    assert_like(
        &body["hold"],
        json!({"id": null, "account_id": "h", "amount": 40, "captured": 0, "status": "open",
               "created_at": null, "expires_at": null, "metadata": {"cart": "c1"}}),
    );
    assert_like(
        &body["transaction"],
        json!({"id": null, "account_id": "h", "seq": 2, "kind": "hold", "amount": 40,
               "hold_id": h1, "transfer_id": null, "balance": 100, "held": 40,
               "available": 60, "created_at": null, "metadata": {"cart": "c1"}}),
    );
    assert_eq!(
        (&body["account"]["held"], &body["account"]["available"]),
        (&json!(40), &json!(60))
    );
    assert_eq!(body["account"]["open_holds"], 1);
    let r = get(&ts, &format!("/v1/accounts/h/holds/{h1}")).await;
    assert_eq!((r.status, r.json()), (200, body["hold"].clone()));

    // Partial capture: 25 of 40 captured, 15 released, one transaction.
    let r = post(
        &ts,
        &format!("/v1/accounts/h/holds/{h1}/capture"),
        &key(),
        &json!({"amount": 25}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(sorted_keys(&body), ["account", "hold", "transaction"]);
    assert_eq!(
        (&body["hold"]["status"], &body["hold"]["captured"]),
        (&json!("captured"), &json!(25))
    );
    assert_eq!(body["hold"]["amount"], 40);
    assert_like(
        &body["transaction"],
        json!({"id": null, "account_id": "h", "seq": 3, "kind": "capture", "amount": 25,
               "hold_id": h1, "transfer_id": null, "balance": 75, "held": 0,
               "available": 75, "created_at": null, "metadata": {}}),
    );
    let a = account(&ts, "h").await;
    assert_eq!(
        (&a["balance"], &a["held"], &a["open_holds"], &a["seq"]),
        (&json!(75), &json!(0), &json!(0), &json!(3))
    );
    let r = get(&ts, "/v1/accounts/h/transactions").await;
    assert_eq!(r.json()["transactions"].as_array().unwrap().len(), 3);

    // The captured hold is closed for capture and release alike.
    for action in ["capture", "release"] {
        let r = post(
            &ts,
            &format!("/v1/accounts/h/holds/{h1}/{action}"),
            &key(),
            &json!({}),
        )
        .await;
        assert_problem(&r, 409, "hold_not_open");
        assert!(r.json()["detail"].as_str().unwrap().contains("captured"));
    }
    assert_untouched(&ts, "h", 3, 75).await;

    // Release returns the whole amount; the released hold is closed too.
    let h2 = hold(&ts, "h", json!({"amount": 50})).await["hold"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = post_raw(
        &ts,
        &format!("/v1/accounts/h/holds/{h2}/release"),
        Some(&key()),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(
        (&body["hold"]["status"], &body["hold"]["captured"]),
        (&json!("released"), &json!(0))
    );
    assert_like(
        &body["transaction"],
        json!({"id": null, "account_id": "h", "seq": 5, "kind": "release", "amount": 50,
               "hold_id": h2, "transfer_id": null, "balance": 75, "held": 0,
               "available": 75, "created_at": null, "metadata": {}}),
    );
    for (action, body) in [("capture", json!({"amount": 1})), ("release", json!({}))] {
        let r = post(
            &ts,
            &format!("/v1/accounts/h/holds/{h2}/{action}"),
            &key(),
            &body,
        )
        .await;
        assert_problem(&r, 409, "hold_not_open");
        assert!(r.json()["detail"].as_str().unwrap().contains("released"));
    }

    // Capture without a body captures the whole hold; more than the hold is 422.
    let h3 = hold(&ts, "h", json!({"amount": 20})).await["hold"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = post(
        &ts,
        &format!("/v1/accounts/h/holds/{h3}/capture"),
        &key(),
        &json!({"amount": 21}),
    )
    .await;
    assert_problem(&r, 422, "amount_exceeds_hold");
    assert_untouched(&ts, "h", 6, 75).await;
    let r = post_raw(
        &ts,
        &format!("/v1/accounts/h/holds/{h3}/capture"),
        Some(&key()),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(
        (&body["hold"]["captured"], &body["transaction"]["amount"]),
        (&json!(20), &json!(20))
    );
    assert_eq!(body["account"]["balance"], 55);

    // Unknown holds and malformed hold ids.
    let unknown = Uuid::now_v7();
    let r = get(&ts, &format!("/v1/accounts/h/holds/{unknown}")).await;
    assert_problem(&r, 404, "hold_not_found");
    for action in ["capture", "release"] {
        let r = post(
            &ts,
            &format!("/v1/accounts/h/holds/{unknown}/{action}"),
            &key(),
            &json!({}),
        )
        .await;
        assert_problem(&r, 404, "hold_not_found");
        let r = post(
            &ts,
            &format!("/v1/accounts/h/holds/not-a-uuid/{action}"),
            &key(),
            &json!({}),
        )
        .await;
        assert_problem(&r, 400, "invalid_request");
    }
    let r = get(&ts, "/v1/accounts/h/holds/not-a-uuid").await;
    assert_problem(&r, 400, "invalid_request");
    let r = get(&ts, &format!("/v1/accounts/nobody/holds/{h1}")).await;
    assert_problem(&r, 404, "account_not_found");
    assert_untouched(&ts, "h", 7, 55).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funds_overdraft_and_balance_limit() {
    // Goal: debits and holds beyond available + overdraft_limit are 409 insufficient_funds, the overdraft allows a negative available, and a balance over 2^53-1 is 409 balance_limit_exceeded.
    let ts = TestServer::start().await;
    open(&ts, "poor").await;
    credit(&ts, "poor", 10).await;
    hold(&ts, "poor", json!({"amount": 4})).await;
    for (path, amount) in [("debits", 7), ("holds", 7), ("debits", 100)] {
        let r = post(
            &ts,
            &format!("/v1/accounts/poor/{path}"),
            &key(),
            &json!({"amount": amount}),
        )
        .await;
        assert_problem(&r, 409, "insufficient_funds");
    }
    assert_untouched(&ts, "poor", 2, 10).await;
    let r = post(
        &ts,
        "/v1/accounts/poor/debits",
        &key(),
        &json!({"amount": 6}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["account"]["available"], 0);

    open_account(&ts, "od", json!({"currency": "GEM", "overdraft_limit": 50})).await;
    let r = post(
        &ts,
        "/v1/accounts/od/debits",
        &key(),
        &json!({"amount": 30}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        (
            &r.json()["account"]["balance"],
            &r.json()["account"]["available"]
        ),
        (&json!(-30), &json!(-30))
    );
    let r = post(&ts, "/v1/accounts/od/holds", &key(), &json!({"amount": 20})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["account"]["available"], -50);
    for path in ["debits", "holds"] {
        let r = post(
            &ts,
            &format!("/v1/accounts/od/{path}"),
            &key(),
            &json!({"amount": 1}),
        )
        .await;
        assert_problem(&r, 409, "insufficient_funds");
        assert!(r.json()["detail"].as_str().unwrap().contains("-50"));
    }
    let a = account(&ts, "od").await;
    assert_eq!(
        (&a["balance"], &a["held"], &a["available"], &a["seq"]),
        (&json!(-30), &json!(20), &json!(-50), &json!(2))
    );

    open(&ts, "rich").await;
    let body = credit(&ts, "rich", MAX).await;
    assert_eq!(body["account"]["balance"], MAX);
    let r = post(
        &ts,
        "/v1/accounts/rich/credits",
        &key(),
        &json!({"amount": 1}),
    )
    .await;
    assert_problem(&r, 409, "balance_limit_exceeded");
    assert_untouched(&ts, "rich", 1, MAX as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_money_requests_apply_nothing() {
    // Goal: every malformed or out-of-bounds money request is a problem+json 400 or 422 and leaves the account untouched.
    let ts = TestServer::start().await;
    open(&ts, "m").await;
    credit(&ts, "m", 1000).await;
    let hold_id = hold(&ts, "m", json!({"amount": 10})).await["hold"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let capture = format!("/v1/accounts/m/holds/{hold_id}/capture");
    let release = format!("/v1/accounts/m/holds/{hold_id}/release");
    let long_key = "k".repeat(41);
    let meta17 = metadata_with_keys(17).to_string();
    let meta_long_key = json!({long_key: "v"}).to_string();
    let meta_long_value = json!({"k": "v".repeat(501)}).to_string();
    let mut cases: Vec<(String, String, u16)> = Vec::new();
    for path in ["credits", "debits", "holds"] {
        let path = format!("/v1/accounts/m/{path}");
        for (body, status) in [
            ("{".to_string(), 400),
            (String::new(), 400),
            ("[]".to_string(), 400),
            ("{}".to_string(), 400),
            (r#"{"amount":5,"memo":"x"}"#.to_string(), 400),
            (r#"{"amount":1.5}"#.to_string(), 400),
            (r#"{"amount":1e-3}"#.to_string(), 400),
            (r#"{"amount":4503599627370497.5}"#.to_string(), 400),
            (r#"{"amount":3000000000000000.1}"#.to_string(), 400),
            (r#"{"amount":1.0000000000000000000001}"#.to_string(), 400),
            (r#"{"amount":0.0}"#.to_string(), 422),
            (r#"{"amount":1e400}"#.to_string(), 422),
            (r#"{"amount":"5"}"#.to_string(), 400),
            (r#"{"amount":null}"#.to_string(), 400),
            (r#"{"amount":true}"#.to_string(), 400),
            (r#"{"amount":5,"metadata":null}"#.to_string(), 400),
            (r#"{"amount":5,"metadata":{"k":5}}"#.to_string(), 400),
            (r#"{"amount":5,"amount":6}"#.to_string(), 400),
            (r#"{"amount":0}"#.to_string(), 422),
            (r#"{"amount":-5}"#.to_string(), 422),
            (format!(r#"{{"amount":{}}}"#, MAX + 1), 422),
            (r#"{"amount":100000000000000000000000}"#.to_string(), 422),
            (r#"{"amount":-100000000000000000000000}"#.to_string(), 422),
            (format!(r#"{{"amount":5,"metadata":{meta17}}}"#), 422),
            (format!(r#"{{"amount":5,"metadata":{meta_long_key}}}"#), 422),
            (
                format!(r#"{{"amount":5,"metadata":{meta_long_value}}}"#),
                422,
            ),
        ] {
            cases.push((path.clone(), body, status));
        }
    }
    for (body, status) in [
        (r#"{"amount":5,"expires_in_secs":"60"}"#, 400),
        (r#"{"amount":5,"expires_in_secs":null}"#, 400),
        (r#"{"amount":5,"expires_in_secs":1.5}"#, 400),
        (r#"{"amount":5,"expires_in_secs":0}"#, 422),
        (r#"{"amount":5,"expires_in_secs":-1}"#, 422),
        (r#"{"amount":5,"expires_in_secs":2592001}"#, 422),
    ] {
        cases.push(("/v1/accounts/m/holds".into(), body.into(), status));
    }
    for (body, status) in [
        ("{", 400),
        (r#"{"amount":"5"}"#, 400),
        (r#"{"amount":null}"#, 400),
        (r#"{"amount":2.5}"#, 400),
        (r#"{"amount":5,"memo":"x"}"#, 400),
        (r#"{"amount":0}"#, 422),
        (r#"{"amount":-1}"#, 422),
    ] {
        cases.push((capture.clone(), body.into(), status));
    }
    for (body, status) in [
        ("{", 400),
        (r#"{"amount":5}"#, 400),
        (r#"{"metadata":null}"#, 400),
    ] {
        cases.push((release.clone(), body.into(), status));
    }
    cases.push((capture.clone(), format!(r#"{{"metadata":{meta17}}}"#), 422));
    cases.push((release.clone(), format!(r#"{{"metadata":{meta17}}}"#), 422));

    for (path, body, status) in &cases {
        let r = post_raw(&ts, path, Some(&key()), body.clone()).await;
        let code = if *status == 400 {
            "invalid_request"
        } else {
            "validation_failed"
        };
        assert_eq!(r.status, *status, "POST {path} {body}: {}", r.text());
        assert_problem(&r, *status, code);
    }
    assert_untouched(&ts, "m", 2, 1000).await;
    let r = get(&ts, &format!("/v1/accounts/m/holds/{hold_id}")).await;
    assert_eq!(r.json()["status"], "open");

    // The bounds themselves pass.
    let r = post(
        &ts,
        "/v1/accounts/m/holds",
        &key(),
        &json!({"amount": 1, "expires_in_secs": 2_592_000, "metadata": metadata_with_keys(16)}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = post(
        &ts,
        "/v1/accounts/m/holds",
        &key(),
        &json!({"amount": 1, "expires_in_secs": 1}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_header_is_required_and_well_formed() {
    // Goal: a missing Idempotency-Key is 400 idempotency_key_missing, an empty, over-long or non-visible-ASCII one is 400 invalid_request, and neither applies anything.
    let ts = TestServer::start().await;
    open(&ts, "k").await;
    credit(&ts, "k", 100).await;
    let hold_id = hold(&ts, "k", json!({"amount": 10})).await["hold"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let paths = [
        "/v1/accounts/k/credits".to_string(),
        "/v1/accounts/k/debits".to_string(),
        "/v1/accounts/k/holds".to_string(),
        format!("/v1/accounts/k/holds/{hold_id}/capture"),
        format!("/v1/accounts/k/holds/{hold_id}/release"),
    ];
    let body = r#"{"amount":5}"#;
    for path in &paths {
        let body = if path.ends_with("release") {
            "{}"
        } else {
            body
        };
        let r = post_raw(&ts, path, None, body).await;
        assert_problem(&r, 400, "idempotency_key_missing");
        let too_long = "k".repeat(256);
        for bad in ["", too_long.as_str(), "a b", "a\tb"] {
            let r = post_raw(&ts, path, Some(bad), body).await;
            assert_problem(&r, 400, "invalid_request");
        }
        let r = send(
            ts.client
                .post(ts.url(path))
                .header(
                    "idempotency-key",
                    HeaderValue::from_bytes(b"caf\xe9").unwrap(),
                )
                .body(body),
        )
        .await;
        assert_problem(&r, 400, "invalid_request");
    }
    assert_untouched(&ts, "k", 2, 100).await;
    // 255 visible ASCII characters are a valid key.
    let longest: String = (0..255u8).map(|i| char::from(b'!' + i % 94)).collect();
    let r = post_raw(&ts, "/v1/accounts/k/credits", Some(&longest), body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = post_raw(&ts, "/v1/accounts/k/credits", Some(&longest), body).await;
    assert_eq!((r.status, r.replayed()), (201, true));
    assert_untouched(&ts, "k", 3, 105).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_up_to_64_kib_are_accepted() {
    // Goal: a body of exactly 65,536 bytes is accepted and one of 65,537 bytes is 413 payload_too_large with nothing applied.
    let ts = TestServer::start().await;
    open(&ts, "big").await;
    let padded = |len: usize, amount: u64| {
        let head = format!(r#"{{"amount":{amount},"metadata":{{"note":"x"}}"#);
        let body = format!("{head}{}}}", " ".repeat(len - head.len() - 1));
        assert_eq!(body.len(), len);
        body
    };
    let r = post_raw(
        &ts,
        "/v1/accounts/big/credits",
        Some(&key()),
        padded(65_536, 7),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = post_raw(
        &ts,
        "/v1/accounts/big/credits",
        Some(&key()),
        padded(65_537, 7),
    )
    .await;
    assert_problem(&r, 413, "payload_too_large");
    let r = post_raw(
        &ts,
        "/v1/accounts/big/debits",
        Some(&key()),
        padded(65_537, 1),
    )
    .await;
    assert_problem(&r, 413, "payload_too_large");
    assert_untouched(&ts, "big", 1, 7).await;

    // 413 comes before every 400: bad path, bad JSON, missing key.
    let garbage = "x".repeat(65_537);
    let r = post_raw(&ts, "/v1/accounts/a%20b/credits", None, garbage.clone()).await;
    assert_problem(&r, 413, "payload_too_large");
    let r = post_raw(&ts, "/v1/accounts/big/holds", Some(""), garbage.clone()).await;
    assert_problem(&r, 413, "payload_too_large");

    // PUT too: exactly 64 KiB creates, one byte more is refused.
    let account_body = |len: usize| {
        let head = r#"{"currency":"GEM""#;
        format!("{head}{}}}", "\n".repeat(len - head.len() - 1))
    };
    let r = put(&ts, "/v1/accounts/put-ok", account_body(65_536)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = put(&ts, "/v1/accounts/put-big", account_body(65_537)).await;
    assert_problem(&r, 413, "payload_too_large");
    let r = get(&ts, "/v1/accounts/put-big").await;
    assert_problem(&r, 404, "account_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_precedence() {
    // Goal: when a request has several faults, the error docs/API.md ranks first wins.
    let ts = TestServer::start().await;
    open(&ts, "p").await;
    credit(&ts, "p", 100).await;
    let hold_id = hold(&ts, "p", json!({"amount": 10})).await["hold"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let unknown_hold = Uuid::now_v7();
    let zero = r#"{"amount":0}"#;

    // 400 syntax / path / key format before idempotency_key_missing before 404 account.
    let r = post_raw(&ts, "/v1/accounts/a%20b/credits", None, zero).await;
    assert_problem(&r, 400, "invalid_request");
    let r = post_raw(&ts, "/v1/accounts/nobody/credits", None, "{").await;
    assert_problem(&r, 400, "invalid_request");
    let r = post_raw(&ts, "/v1/accounts/nobody/credits", Some(""), zero).await;
    assert_problem(&r, 400, "invalid_request");
    let r = post_raw(
        &ts,
        "/v1/accounts/nobody/holds/not-a-uuid/capture",
        None,
        "{}",
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    let r = post_raw(&ts, "/v1/accounts/nobody/credits", None, zero).await;
    assert_problem(&r, 400, "idempotency_key_missing");
    let r = post_raw(&ts, "/v1/accounts/p/debits", None, r#"{"amount":1000}"#).await;
    assert_problem(&r, 400, "idempotency_key_missing");

    // 404 account before validation and before hold checks.
    let r = post_raw(&ts, "/v1/accounts/nobody/credits", Some(&key()), zero).await;
    assert_problem(&r, 404, "account_not_found");
    let r = post_raw(
        &ts,
        &format!("/v1/accounts/nobody/holds/{unknown_hold}/capture"),
        Some(&key()),
        zero,
    )
    .await;
    assert_problem(&r, 404, "account_not_found");
    let r = get(&ts, "/v1/accounts/nobody/holds?limit=5").await;
    assert_problem(&r, 404, "account_not_found");

    // The key's reuse is decided before validation and everything after it.
    let k = key();
    let r = post(&ts, "/v1/accounts/p/debits", &k, &json!({"amount": 50})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let first = r.bytes.clone();
    for (path, body) in [
        ("/v1/accounts/p/debits".to_string(), zero.to_string()),
        (
            "/v1/accounts/p/debits".to_string(),
            r#"{"amount":1000}"#.into(),
        ),
        (
            "/v1/accounts/p/credits".to_string(),
            r#"{"amount":50}"#.into(),
        ),
        (
            format!("/v1/accounts/p/holds/{unknown_hold}/capture"),
            "{}".into(),
        ),
    ] {
        let r = post_raw(&ts, &path, Some(&k), body).await;
        assert_problem(&r, 422, "idempotency_key_reused");
    }
    // A replay wins over funds that have since run out.
    credit(&ts, "p", 1).await;
    let r = post(&ts, "/v1/accounts/p/debits", &key(), &json!({"amount": 41})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = post(&ts, "/v1/accounts/p/debits", &k, &json!({"amount": 50})).await;
    assert_eq!((r.status, r.replayed(), &r.bytes), (201, true, &first));

    // validation_failed before hold_not_found, hold_not_open, amount_exceeds_hold.
    let r = post_raw(
        &ts,
        &format!("/v1/accounts/p/holds/{unknown_hold}/capture"),
        Some(&key()),
        zero,
    )
    .await;
    assert_problem(&r, 422, "validation_failed");
    // hold_not_found before anything about the hold.
    let r = post_raw(
        &ts,
        &format!("/v1/accounts/p/holds/{unknown_hold}/capture"),
        Some(&key()),
        r#"{"amount":1000}"#,
    )
    .await;
    assert_problem(&r, 404, "hold_not_found");
    // A validation fault on a hold request beats insufficient funds.
    let r = post_raw(
        &ts,
        "/v1/accounts/p/holds",
        Some(&key()),
        r#"{"amount":1000,"expires_in_secs":0}"#,
    )
    .await;
    assert_problem(&r, 422, "validation_failed");
    let state = account(&ts, "p").await;
    let seq = state["seq"].as_u64().unwrap();

    // hold_not_open before amount_exceeds_hold; and a replay beats hold_not_open.
    let ck = key();
    let capture = format!("/v1/accounts/p/holds/{hold_id}/capture");
    let r = post(&ts, &capture, &ck, &json!({"amount": 4})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let captured = r.bytes.clone();
    let r = post(&ts, &capture, &key(), &json!({"amount": 11})).await;
    assert_problem(&r, 409, "hold_not_open");
    let r = post(&ts, &capture, &ck, &json!({"amount": 4})).await;
    assert_eq!((r.status, r.replayed(), &r.bytes), (200, true, &captured));
    let r = post(&ts, &capture, &ck, &json!({"amount": 5})).await;
    assert_problem(&r, 422, "idempotency_key_reused");
    assert_untouched(&ts, "p", seq + 1, 100 + 1 - 50 - 41 - 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_arrays_are_not_request_objects() {
    // Goal: a body that is a JSON array instead of an object is 400 invalid_request on every endpoint and moves nothing.
    let ts = TestServer::start().await;
    open(&ts, "arr").await;
    credit(&ts, "arr", 100).await;
    let hold_id = hold(&ts, "arr", json!({"amount": 10})).await["hold"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let capture = format!("/v1/accounts/arr/holds/{hold_id}/capture");
    let release = format!("/v1/accounts/arr/holds/{hold_id}/release");
    let mut failures = Vec::new();
    for (path, body) in [
        ("/v1/accounts/arr/credits", "[5]"),
        ("/v1/accounts/arr/debits", "[5]"),
        ("/v1/accounts/arr/holds", "[5]"),
        ("/v1/accounts/arr/holds", "[5, 60]"),
        (capture.as_str(), "[]"),
        (capture.as_str(), "[3]"),
        (release.as_str(), "[]"),
    ] {
        let r = post_raw(&ts, path, Some(&key()), body).await;
        if r.status != 400 || r.json()["code"] != "invalid_request" {
            failures.push(format!("POST {path} {body} -> {} {}", r.status, r.text()));
        }
    }
    let r = put(&ts, "/v1/accounts/arr2", r#"["GEM"]"#).await;
    if r.status != 400 {
        failures.push(format!(
            "PUT /v1/accounts/arr2 [\"GEM\"] -> {} {}",
            r.status,
            r.text()
        ));
    }
    assert!(
        failures.is_empty(),
        "accepted arrays:\n{}",
        failures.join("\n")
    );
    assert_untouched(&ts, "arr", 2, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_query_values_count_as_absent() {
    // Goal: a list parameter given with an empty value (the `?status=open&limit=&after=` URL template of docs/API.md) means "not given": the answer is 200 with exactly the body of the same request without it, while a non-empty bad value stays 400 invalid_request.
    let ts = TestServer::start().await;
    open(&ts, "q").await;
    credit(&ts, "q", 10).await;
    credit(&ts, "q", 20).await;
    let first = hold(&ts, "q", json!({"amount": 1})).await["hold"]["id"].clone();
    hold(&ts, "q", json!({"amount": 2})).await;
    let first = first.as_str().unwrap_or_default().to_string();
    assert!(!first.is_empty(), "the first hold has an id");
    let holds = "/v1/accounts/q/holds";
    let txs = "/v1/accounts/q/transactions";
    let cases = [
        (format!("{holds}?limit=&after="), holds.to_string()),
        (
            format!("{holds}?status=open&limit=&after="),
            format!("{holds}?status=open"),
        ),
        (format!("{holds}?status=&limit=&after="), holds.to_string()),
        (format!("{holds}?status="), holds.to_string()),
        (format!("{holds}?after="), holds.to_string()),
        (
            format!("{holds}?limit=1&after="),
            format!("{holds}?limit=1"),
        ),
        (
            format!("{holds}?limit=&after={first}"),
            format!("{holds}?after={first}"),
        ),
        (format!("{txs}?limit="), txs.to_string()),
        (format!("{txs}?before_seq="), txs.to_string()),
        (format!("{txs}?limit=&before_seq="), txs.to_string()),
        (
            format!("{txs}?limit=2&before_seq="),
            format!("{txs}?limit=2"),
        ),
        (
            format!("{txs}?limit=&before_seq=3"),
            format!("{txs}?before_seq=3"),
        ),
    ];
    for (with_empty, without) in &cases {
        let a = get(&ts, with_empty).await;
        let b = get(&ts, without).await;
        assert_eq!(a.status, 200, "GET {with_empty}: {}", a.text());
        assert_eq!(b.status, 200, "GET {without}: {}", b.text());
        assert_eq!(
            a.text(),
            b.text(),
            "GET {with_empty} differs from GET {without}"
        );
    }
    // The comparisons above are not between empty pages: the lists have content.
    let all = get(&ts, holds).await;
    assert_eq!(all.json()["holds"].as_array().map(Vec::len), Some(2));
    let page = get(&ts, &format!("{holds}?limit=1&after=")).await;
    assert_eq!(page.json()["holds"][0]["id"], first.as_str());
    assert_eq!(page.json()["next"], first.as_str());
    let all = get(&ts, txs).await;
    assert_eq!(all.json()["transactions"].as_array().map(Vec::len), Some(4));
    for path in [
        format!("{holds}?limit=0"),
        format!("{holds}?limit=+5"),
        format!("{holds}?limit=1001"),
        format!("{holds}?status=foo"),
        format!("{holds}?status=open&limit=&after=nope"),
        format!("{holds}?after=%20"),
        format!("{holds}?unknown=1"),
        format!("{txs}?limit=+5"),
        format!("{txs}?limit=0&before_seq="),
        format!("{txs}?before_seq=0"),
        format!("{txs}?before_seq=-1"),
    ] {
        let r = get(&ts, &path).await;
        assert_problem(&r, 400, "invalid_request");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_whose_exact_value_is_an_integer_are_that_integer() {
    // Goal: `46.0`, `4.6e1` and `460e-1` are read as 46 from their text (never through a float): they credit 46, count as the same request as `46` for idempotency, and out-of-range integral values are 422, while fractions stay 400.
    let ts = TestServer::start().await;
    open(&ts, "f").await;
    let k = key();
    let mut seq = 0;
    for literal in ["46", "46.0", "4.6e1", "460e-1", "0.46E+2"] {
        let r = post_raw(
            &ts,
            "/v1/accounts/f/credits",
            Some(&k),
            format!(r#"{{"amount":{literal}}}"#),
        )
        .await;
        assert_eq!(r.status, 201, "{literal}: {}", r.text());
        assert_eq!(r.json()["transaction"]["amount"], 46, "{literal}");
        if literal != "46" {
            assert_eq!(r.header("idempotent-replayed"), Some("true"), "{literal}");
        }
        seq = r.json()["account"]["seq"].as_u64().unwrap_or(0);
    }
    assert_eq!(seq, 1, "one credit, then replays");
    let hold = post_raw(
        &ts,
        "/v1/accounts/f/holds",
        Some(&key()),
        r#"{"amount":1.0e1,"expires_in_secs":6.0e1}"#.to_string(),
    )
    .await;
    assert_eq!(hold.status, 201, "{}", hold.text());
    assert_eq!(hold.json()["hold"]["amount"], 10);
    let r = put(
        &ts,
        "/v1/accounts/g",
        r#"{"currency":"GEM","overdraft_limit":5.00}"#.to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["overdraft_limit"], 5);
    for (index, (literal, status)) in [
        ("9007199254740991.0", 201),
        ("9007199254740992.0", 422),
        ("4503599627370497.5", 400),
        ("3000000000000000.1", 400),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("n{index}");
        open(&ts, &id).await;
        let r = post_raw(
            &ts,
            &format!("/v1/accounts/{id}/credits"),
            Some(&key()),
            format!(r#"{{"amount":{literal}}}"#),
        )
        .await;
        assert_eq!(r.status, status, "{literal}: {}", r.text());
        if status != 201 {
            assert_untouched(&ts, &id, 0, 0).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_replay_returns_the_original_answer() {
    // Goal: the same key with the same request replays the byte-identical answer with Idempotent-Replayed: true, and a different request with that key is 422 idempotency_key_reused with nothing applied.
    let ts = TestServer::start().await;
    open(&ts, "i").await;
    let k = key();
    let r1 = post_raw(
        &ts,
        "/v1/accounts/i/credits",
        Some(&k),
        r#"{"amount":10,"metadata":{"a":"1","b":"2"}}"#,
    )
    .await;
    assert_eq!(r1.status, 201, "{}", r1.text());
    assert!(r1.header("idempotent-replayed").is_none());
    // The same parsed body, written differently, is the same request.
    for body in [
        r#"{"amount":10,"metadata":{"a":"1","b":"2"}}"#,
        r#"{ "metadata": {"b": "2", "a": "1"},
             "amount": 10 }"#,
    ] {
        let r = post_raw(&ts, "/v1/accounts/i/credits", Some(&k), body).await;
        assert_eq!(r.status, 201, "{}", r.text());
        assert!(r.replayed());
        assert_eq!(r.bytes, r1.bytes);
    }
    assert_untouched(&ts, "i", 1, 10).await;
    for (path, body) in [
        (
            "/v1/accounts/i/credits",
            r#"{"amount":11,"metadata":{"a":"1","b":"2"}}"#,
        ),
        (
            "/v1/accounts/i/credits",
            r#"{"amount":10,"metadata":{"a":"1"}}"#,
        ),
        ("/v1/accounts/i/credits", r#"{"amount":10}"#),
        (
            "/v1/accounts/i/debits",
            r#"{"amount":10,"metadata":{"a":"1","b":"2"}}"#,
        ),
        (
            "/v1/accounts/i/holds",
            r#"{"amount":10,"metadata":{"a":"1","b":"2"}}"#,
        ),
    ] {
        let r = post_raw(&ts, path, Some(&k), body).await;
        assert_problem(&r, 422, "idempotency_key_reused");
    }
    assert_untouched(&ts, "i", 1, 10).await;

    // Holds, captures and releases replay too.
    let hk = key();
    let h1 = post(&ts, "/v1/accounts/i/holds", &hk, &json!({"amount": 3})).await;
    assert_eq!(h1.status, 201);
    let h2 = post(&ts, "/v1/accounts/i/holds", &hk, &json!({"amount": 3})).await;
    assert_eq!(
        (h2.status, h2.replayed(), &h2.bytes),
        (201, true, &h1.bytes)
    );
    let hold_id = h1.json()["hold"]["id"].as_str().unwrap().to_string();
    let release = format!("/v1/accounts/i/holds/{hold_id}/release");
    let rk = key();
    let r1 = post_raw(&ts, &release, Some(&rk), "").await;
    assert_eq!(r1.status, 200, "{}", r1.text());
    assert!(!r1.replayed());
    let r2 = post_raw(&ts, &release, Some(&rk), "").await;
    assert_eq!(
        (r2.status, r2.replayed(), &r2.bytes),
        (200, true, &r1.bytes)
    );
    assert_untouched(&ts, "i", 3, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_leave_no_trace() {
    // Goal: a refused request (insufficient funds, validation) is not remembered, so a retry with the same key is evaluated afresh.
    let ts = TestServer::start().await;
    open(&ts, "r").await;
    let k = key();
    let r = post(&ts, "/v1/accounts/r/debits", &k, &json!({"amount": 50})).await;
    assert_problem(&r, 409, "insufficient_funds");
    let r = get(&ts, &format!("/v1/accounts/r/idempotency-keys/{k}")).await;
    assert_problem(&r, 404, "unknown_idempotency_key");
    credit(&ts, "r", 100).await;
    let r = post(&ts, "/v1/accounts/r/debits", &k, &json!({"amount": 50})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(!r.replayed());
    assert_untouched(&ts, "r", 2, 50).await;

    let k2 = key();
    let r = post(&ts, "/v1/accounts/r/credits", &k2, &json!({"amount": 0})).await;
    assert_problem(&r, 422, "validation_failed");
    let r = post_raw(&ts, "/v1/accounts/r/credits", Some(&k2), "{").await;
    assert_problem(&r, 400, "invalid_request");
    let r = post(&ts, "/v1/accounts/r/credits", &k2, &json!({"amount": 5})).await;
    assert_eq!((r.status, r.replayed()), (201, false), "{}", r.text());
    assert_untouched(&ts, "r", 3, 55).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_scoped_per_account() {
    // Goal: the same key on two accounts names two independent requests.
    let ts = TestServer::start().await;
    open(&ts, "a1").await;
    open(&ts, "a2").await;
    let k = key();
    let r1 = post(&ts, "/v1/accounts/a1/credits", &k, &json!({"amount": 10})).await;
    let r2 = post(&ts, "/v1/accounts/a2/credits", &k, &json!({"amount": 20})).await;
    assert_eq!((r1.status, r1.replayed()), (201, false), "{}", r1.text());
    assert_eq!((r2.status, r2.replayed()), (201, false), "{}", r2.text());
    assert_eq!(r2.json()["transaction"]["account_id"], "a2");
    let r3 = post(&ts, "/v1/accounts/a2/credits", &k, &json!({"amount": 10})).await;
    assert_problem(&r3, 422, "idempotency_key_reused");
    assert_untouched(&ts, "a1", 1, 10).await;
    assert_untouched(&ts, "a2", 1, 20).await;
    let l1 = get(&ts, &format!("/v1/accounts/a1/idempotency-keys/{k}")).await;
    let l2 = get(&ts, &format!("/v1/accounts/a2/idempotency-keys/{k}")).await;
    assert_eq!(l1.json()["response"], r1.json());
    assert_eq!(l2.json()["response"], r2.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_requests_apply_once() {
    // Goal: of 20 concurrent identical requests with one key exactly one is answered without Idempotent-Replayed, all answers are identical, and the change happens once.
    let ts = TestServer::start().await;
    open(&ts, "c").await;
    let k = key();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let request = ts
            .client
            .post(ts.url("/v1/accounts/c/credits"))
            .header("idempotency-key", k.clone())
            .body(r#"{"amount":10}"#);
        tasks.spawn(send(request));
    }
    let answers: Vec<Resp> = tasks.join_all().await;
    assert_eq!(answers.len(), 20);
    let fresh = answers.iter().filter(|r| !r.replayed()).count();
    assert_eq!(fresh, 1, "exactly one answer is not a replay");
    for r in &answers {
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.bytes, answers[0].bytes);
    }
    assert_untouched(&ts, "c", 1, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_survive_restart() {
    // Goal: after a restart on the same data directory, replays still return the original answers and reused keys are still refused.
    let mut ts = TestServer::start().await;
    open(&ts, "s").await;
    let (k1, k2, k3) = (key(), key(), key());
    let c = post(&ts, "/v1/accounts/s/credits", &k1, &json!({"amount": 100})).await;
    assert_eq!(c.status, 201);
    let h = post(
        &ts,
        "/v1/accounts/s/holds",
        &k2,
        &json!({"amount": 30, "metadata": {"m": "1"}}),
    )
    .await;
    assert_eq!(h.status, 201);
    let hold_id = h.json()["hold"]["id"].as_str().unwrap().to_string();
    let capture = format!("/v1/accounts/s/holds/{hold_id}/capture");
    let cap = post(&ts, &capture, &k3, &json!({"amount": 10})).await;
    assert_eq!(cap.status, 200);
    let before = account(&ts, "s").await;

    ts.restart().await;
    assert_eq!(account(&ts, "s").await, before);
    let r = post(&ts, "/v1/accounts/s/credits", &k1, &json!({"amount": 100})).await;
    assert_eq!((r.status, r.replayed(), &r.bytes), (201, true, &c.bytes));
    let r = post(
        &ts,
        "/v1/accounts/s/holds",
        &k2,
        &json!({"amount": 30, "metadata": {"m": "1"}}),
    )
    .await;
    assert_eq!((r.status, r.replayed(), &r.bytes), (201, true, &h.bytes));
    let r = post(&ts, &capture, &k3, &json!({"amount": 10})).await;
    assert_eq!((r.status, r.replayed(), &r.bytes), (200, true, &cap.bytes));
    let r = post(&ts, "/v1/accounts/s/credits", &k1, &json!({"amount": 99})).await;
    assert_problem(&r, 422, "idempotency_key_reused");
    let r = get(&ts, &format!("/v1/accounts/s/idempotency-keys/{k3}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["response"], cap.json());
    assert_eq!(account(&ts, "s").await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_lookup() {
    // Goal: the idempotency-key lookup returns {key, status, response, created_at} with the original status and body, answers 404 unknown_idempotency_key otherwise, and never applies anything.
    let ts = TestServer::start().await;
    open(&ts, "l").await;
    let k = "order/42?x#y%".to_string();
    let encoded = "order%2F42%3Fx%23y%25";
    let c = post(&ts, "/v1/accounts/l/credits", &k, &json!({"amount": 70})).await;
    assert_eq!(c.status, 201, "{}", c.text());
    let r = get(&ts, &format!("/v1/accounts/l/idempotency-keys/{encoded}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let lookup = r.json();
    assert_eq!(
        sorted_keys(&lookup),
        ["created_at", "key", "response", "status"]
    );
    assert_eq!(lookup["key"], k.as_str());
    assert_eq!(lookup["status"], 201);
    assert_eq!(lookup["response"], c.json());
    assert_timestamp(&lookup["created_at"]);

    let hk = key();
    let h = post(&ts, "/v1/accounts/l/holds", &hk, &json!({"amount": 20})).await;
    let hold_id = h.json()["hold"]["id"].as_str().unwrap().to_string();
    let ck = key();
    let cap = post(
        &ts,
        &format!("/v1/accounts/l/holds/{hold_id}/capture"),
        &ck,
        &json!({"amount": 5}),
    )
    .await;
    assert_eq!(cap.status, 200, "{}", cap.text());
    for (k, status, original) in [(&hk, 201, &h), (&ck, 200, &cap)] {
        let r = get(&ts, &format!("/v1/accounts/l/idempotency-keys/{k}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.replayed());
        let lookup = r.json();
        assert_eq!(lookup["key"], k.as_str());
        assert_eq!(lookup["status"], status);
        // The stored response is the original, also though the hold has changed since.
        assert_eq!(lookup["response"], original.json());
    }
    assert_untouched(&ts, "l", 3, 65).await;

    let r = get(&ts, "/v1/accounts/l/idempotency-keys/never-used").await;
    assert_problem(&r, 404, "unknown_idempotency_key");
    let r = get(&ts, &format!("/v1/accounts/nobody/idempotency-keys/{hk}")).await;
    assert_problem(&r, 404, "account_not_found");
    let r = get(
        &ts,
        &format!("/v1/accounts/l/idempotency-keys/{}", "k".repeat(256)),
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    let r = get(&ts, "/v1/accounts/l/idempotency-keys/a%20b").await;
    assert_problem(&r, 400, "invalid_request");
    assert_untouched(&ts, "l", 3, 65).await;
}

// ---------------------------------------------------------------------------------------
// Lists

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_list_filters_and_pages() {
    // Goal: the holds list is in creation order, filters by status, and pages with limit and the after cursor until next is null.
    let ts = TestServer::start().await;
    open(&ts, "hl").await;
    credit(&ts, "hl", 1000).await;
    let mut ids = Vec::new();
    for amount in 1..=5u64 {
        let body = hold(&ts, "hl", json!({"amount": amount})).await;
        ids.push(body["hold"]["id"].as_str().unwrap().to_string());
    }
    let r = post(
        &ts,
        &format!("/v1/accounts/hl/holds/{}/capture", ids[1]),
        &key(),
        &json!({}),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post(
        &ts,
        &format!("/v1/accounts/hl/holds/{}/release", ids[3]),
        &key(),
        &json!({}),
    )
    .await;
    assert_eq!(r.status, 200);

    let page = |r: Resp| -> (Vec<String>, Value) {
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        assert_eq!(sorted_keys(&body), ["holds", "next"]);
        let holds = body["holds"].as_array().unwrap();
        holds.iter().for_each(assert_hold_shape);
        let ids = holds
            .iter()
            .map(|h| h["id"].as_str().unwrap().to_string())
            .collect();
        (ids, body["next"].clone())
    };
    let (all, next) = page(get(&ts, "/v1/accounts/hl/holds").await);
    assert_eq!((all, next), (ids.clone(), Value::Null));
    let (open, next) = page(get(&ts, "/v1/accounts/hl/holds?status=open").await);
    assert_eq!(
        (open, next),
        (
            vec![ids[0].clone(), ids[2].clone(), ids[4].clone()],
            Value::Null
        )
    );
    let (open, next) = page(get(&ts, "/v1/accounts/hl/holds?status=open&limit=3").await);
    assert_eq!((open.len(), next), (3, Value::Null));
    for (status, index) in [("captured", 1), ("released", 3)] {
        let (found, _) = page(get(&ts, &format!("/v1/accounts/hl/holds?status={status}")).await);
        assert_eq!(found, [ids[index].clone()]);
    }
    let (none, next) = page(get(&ts, "/v1/accounts/hl/holds?status=expired").await);
    assert_eq!((none.len(), next), (0, Value::Null));

    // Pages of 2: [0, 1], [2, 3], [4] and the end.
    let mut seen = Vec::new();
    let mut path = "/v1/accounts/hl/holds?limit=2".to_string();
    for expected_len in [2, 2, 1] {
        let (got, next) = page(get(&ts, &path).await);
        assert_eq!(got.len(), expected_len);
        seen.extend(got);
        assert_eq!(
            next.is_null(),
            expected_len == 1,
            "next is null only at the end"
        );
        if let Some(cursor) = next.as_str() {
            path = format!("/v1/accounts/hl/holds?limit=2&after={cursor}");
        }
    }
    assert_eq!(seen, ids);
    // Open holds, one per page.
    let (first, next) = page(get(&ts, "/v1/accounts/hl/holds?status=open&limit=1").await);
    assert_eq!(first, [ids[0].clone()]);
    let cursor = next.as_str().expect("more open holds").to_string();
    let (second, _) = page(
        get(
            &ts,
            &format!("/v1/accounts/hl/holds?status=open&limit=1&after={cursor}"),
        )
        .await,
    );
    assert_eq!(second, [ids[2].clone()]);
    let (_, next) = page(get(&ts, "/v1/accounts/hl/holds?limit=1000").await);
    assert_eq!(next, Value::Null);

    for query in [
        "colour=red",
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "status=pending",
        "after=not-a-cursor",
        "before_seq=3",
    ] {
        let r = get(&ts, &format!("/v1/accounts/hl/holds?{query}")).await;
        assert_eq!(r.status, 400, "?{query}: {}", r.text());
        assert_problem(&r, 400, "invalid_request");
    }
    let r = get(&ts, "/v1/accounts/nobody/holds").await;
    assert_problem(&r, 404, "account_not_found");
    assert_untouched(&ts, "hl", 8, 998).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_list_newest_first_and_pages() {
    // Goal: the transactions list is newest first and pages with limit and the before_seq cursor until next is null.
    let ts = TestServer::start().await;
    open(&ts, "tl").await;
    let r = get(&ts, "/v1/accounts/tl/transactions").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"transactions": [], "next": null}));
    for amount in 1..=5u64 {
        credit(&ts, "tl", amount).await;
    }
    let page = |r: Resp| -> (Vec<u64>, Value) {
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        assert_eq!(sorted_keys(&body), ["next", "transactions"]);
        let txs = body["transactions"].as_array().unwrap();
        txs.iter().for_each(assert_transaction_shape);
        for t in txs {
            assert_eq!(t["seq"], t["amount"], "credit n has seq n: {t}");
        }
        let seqs = txs.iter().map(|t| t["seq"].as_u64().unwrap()).collect();
        (seqs, body["next"].clone())
    };
    let (all, next) = page(get(&ts, "/v1/accounts/tl/transactions").await);
    assert_eq!((all, next), (vec![5, 4, 3, 2, 1], Value::Null));
    let (all, next) = page(get(&ts, "/v1/accounts/tl/transactions?limit=5").await);
    assert_eq!((all.len(), next), (5, Value::Null));

    let mut seen = Vec::new();
    let mut path = "/v1/accounts/tl/transactions?limit=2".to_string();
    for expected_len in [2, 2, 1] {
        let (got, next) = page(get(&ts, &path).await);
        assert_eq!(got.len(), expected_len, "{path}");
        seen.extend(got);
        assert_eq!(
            next.is_null(),
            expected_len == 1,
            "next is null only at the end"
        );
        if let Some(cursor) = next.as_str() {
            path = format!("/v1/accounts/tl/transactions?limit=2&before_seq={cursor}");
        }
    }
    assert_eq!(seen, [5, 4, 3, 2, 1]);
    let (got, next) = page(get(&ts, "/v1/accounts/tl/transactions?before_seq=3").await);
    assert_eq!((got, next), (vec![2, 1], Value::Null));
    let (got, next) = page(get(&ts, "/v1/accounts/tl/transactions?before_seq=1").await);
    assert_eq!((got.len(), next), (0, Value::Null));

    for query in [
        "colour=red",
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=2.5",
        "before_seq=0",
        "before_seq=abc",
        "before_seq=-1",
        "after=3",
    ] {
        let r = get(&ts, &format!("/v1/accounts/tl/transactions?{query}")).await;
        assert_eq!(r.status, 400, "?{query}: {}", r.text());
        assert_problem(&r, 400, "invalid_request");
    }
    let r = get(&ts, "/v1/accounts/nobody/transactions").await;
    assert_problem(&r, 404, "account_not_found");
    assert_untouched(&ts, "tl", 5, 15).await;
}

// ---------------------------------------------------------------------------------------
// Hold expiry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_expire_at_their_deadline() {
    // Goal: a hold whose deadline passes is expired durably by an expire transaction, not earlier, and capturing it afterwards is 409 hold_not_open.
    let clock = Arc::new(ManualClock::new(T0_MS));
    let c = clock.clone();
    let ts = TestServer::start_with(|config| config.clock = c).await;
    open(&ts, "e").await;
    credit(&ts, "e", 100).await;
    let h1 = hold(&ts, "e", json!({"amount": 30, "expires_in_secs": 60})).await;
    assert_eq!(h1["hold"]["created_at"], T0_TEXT);
    assert_eq!(h1["hold"]["expires_at"], "2027-01-15T08:01:00.000Z");
    let h1 = h1["hold"]["id"].as_str().unwrap().to_string();
    let h2 = hold(&ts, "e", json!({"amount": 20})).await;
    assert_eq!(h2["hold"]["expires_at"], "2027-01-15T09:00:00.000Z");
    let h2 = h2["hold"]["id"].as_str().unwrap().to_string();

    // One millisecond before the deadline nothing expires.
    clock.advance_ms(59_999);
    ts.engine().expire_due().await.expect("expire due holds");
    let r = get(&ts, &format!("/v1/accounts/e/holds/{h1}")).await;
    assert_eq!(r.json()["status"], "open");

    clock.advance_ms(1);
    ts.engine().expire_due().await.expect("expire due holds");
    let r = get(&ts, &format!("/v1/accounts/e/holds/{h1}")).await;
    assert_eq!(
        (&r.json()["status"], &r.json()["captured"]),
        (&json!("expired"), &json!(0))
    );
    let r = get(&ts, &format!("/v1/accounts/e/holds/{h2}")).await;
    assert_eq!(r.json()["status"], "open");
    let a = account(&ts, "e").await;
    assert_eq!(
        (
            &a["balance"],
            &a["held"],
            &a["available"],
            &a["open_holds"],
            &a["seq"]
        ),
        (&json!(100), &json!(20), &json!(80), &json!(1), &json!(4))
    );
    let r = get(&ts, "/v1/accounts/e/transactions?limit=1").await;
    let latest = r.json()["transactions"][0].clone();
    assert_like(
        &latest,
        json!({"id": null, "account_id": "e", "seq": 4, "kind": "expire", "amount": 30,
               "hold_id": h1, "transfer_id": null, "balance": 100, "held": 20,
               "available": 80, "created_at": "2027-01-15T08:01:00.000Z", "metadata": {}}),
    );
    for action in ["capture", "release"] {
        let r = post(
            &ts,
            &format!("/v1/accounts/e/holds/{h1}/{action}"),
            &key(),
            &json!({}),
        )
        .await;
        assert_problem(&r, 409, "hold_not_open");
        assert!(r.json()["detail"].as_str().unwrap().contains("expired"));
    }
    let r = get(&ts, "/v1/accounts/e/holds?status=expired").await;
    assert_eq!(r.json()["holds"][0]["id"], h1.as_str());

    // Without an explicit sweep, the next command on the account expires a due hold first.
    let h3 = hold(&ts, "e", json!({"amount": 5, "expires_in_secs": 1})).await["hold"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    clock.advance_ms(1_000);
    let r = post(
        &ts,
        &format!("/v1/accounts/e/holds/{h3}/capture"),
        &key(),
        &json!({}),
    )
    .await;
    assert_problem(&r, 409, "hold_not_open");
    assert!(r.json()["detail"].as_str().unwrap().contains("expired"));
    let a = account(&ts, "e").await;
    assert_eq!((&a["held"], &a["seq"]), (&json!(20), &json!(6)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_expire_during_downtime() {
    // Goal: a hold whose deadline passed while the server was down is expired by recovery before the restarted server serves.
    let clock = Arc::new(ManualClock::new(T0_MS));
    let c = clock.clone();
    let mut ts = TestServer::start_with(|config| config.clock = c).await;
    open(&ts, "d").await;
    credit(&ts, "d", 100).await;
    let h = hold(&ts, "d", json!({"amount": 40, "expires_in_secs": 60})).await["hold"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    ts.stop().await;
    clock.advance_ms(120_000);
    ts.resume().await;
    let r = get(&ts, &format!("/v1/accounts/d/holds/{h}")).await;
    assert_eq!(r.json()["status"], "expired", "{}", r.text());
    let a = account(&ts, "d").await;
    assert_eq!(
        (&a["held"], &a["available"], &a["open_holds"], &a["seq"]),
        (&json!(0), &json!(100), &json!(0), &json!(3))
    );
    let r = get(&ts, "/v1/accounts/d/transactions?limit=1").await;
    let latest = &r.json()["transactions"][0];
    assert_eq!(
        (&latest["kind"], &latest["hold_id"], &latest["amount"]),
        (&json!("expire"), &json!(h), &json!(40))
    );
}

// ---------------------------------------------------------------------------------------
// Operations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_openapi() {
    // Goal: /healthz, /readyz, /metrics and /openapi.json answer 200 with the documented content.
    let ts = TestServer::start().await;
    open(&ts, "ops").await;
    credit(&ts, "ops", 1).await;
    let r = get(&ts, "/healthz").await;
    assert_eq!(r.status, 200);
    let r = get(&ts, "/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&ts, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let text = r.text();
    for name in ["coffer_wal_records_total", "coffer_http_requests_total"] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    let records: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("coffer_wal_records_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("coffer_wal_records_total has a value");
    assert!(records >= 2, "{text}");
    let r = get(&ts, "/openapi.json").await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_debits_never_overdraw() {
    // Goal: of 200 concurrent debits of 1 on a balance of 150 exactly 150 succeed, 50 are refused, and seq numbers every change once.
    let ts = TestServer::start().await;
    open(&ts, "hot").await;
    credit(&ts, "hot", 150).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let request = ts
            .client
            .post(ts.url("/v1/accounts/hot/debits"))
            .header("idempotency-key", key())
            .body(r#"{"amount":1}"#);
        tasks.spawn(send(request));
    }
    let answers: Vec<Resp> = tasks.join_all().await;
    let mut seqs = BTreeSet::new();
    let mut refused = 0;
    for r in &answers {
        match r.status {
            201 => {
                let seq = r.json()["transaction"]["seq"].as_u64().unwrap();
                assert!(seqs.insert(seq), "seq {seq} answered twice");
            }
            _ => {
                assert_problem(r, 409, "insufficient_funds");
                refused += 1;
            }
        }
    }
    assert_eq!((seqs.len(), refused), (150, 50));
    assert_eq!(seqs, (2..=151).collect::<BTreeSet<u64>>());
    let a = account(&ts, "hot").await;
    assert_eq!(
        (&a["balance"], &a["available"], &a["seq"]),
        (&json!(0), &json!(0), &json!(151))
    );
    let r = get(&ts, "/v1/accounts/hot/transactions?limit=1000").await;
    let body = r.json();
    let listed: Vec<u64> = body["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, (1..=151).rev().collect::<Vec<u64>>());
    assert_eq!(body["next"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_before_recovery() {
    // Goal: while no engine is recovered yet, /healthz answers 200 and /readyz and the API answer 503 not_ready.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let app = coffer::http::router(coffer::http::AppState::new());
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client");
    let r = send(client.get(format!("{base}/healthz"))).await;
    assert_eq!(r.status, 200);
    let r = send(client.get(format!("{base}/readyz"))).await;
    assert_problem(&r, 503, "not_ready");
    let r = send(client.get(format!("{base}/v1/accounts/a"))).await;
    assert_problem(&r, 503, "not_ready");
    let r = send(
        client
            .post(format!("{base}/v1/accounts/a/credits"))
            .header("idempotency-key", "k")
            .body(r#"{"amount":1}"#),
    )
    .await;
    assert_problem(&r, 503, "not_ready");
    serving.abort();
}

// ---------------------------------------------------------------------------------------
// Where a refusal's fault is: `field`, and the numbers of insufficient_funds

#[tokio::test]
async fn validation_problems_name_the_offending_field() {
    // Goal: every 400/422 about one value says where it is: a JSON pointer into the body,
    // `header:Idempotency-Key`, `query:NAME` or `path:NAME`.
    let ts = TestServer::start().await;
    open(&ts, "f-1").await;
    credit(&ts, "f-1", 100).await;
    let credits = "/v1/accounts/f-1/credits";
    let cases: Vec<(Resp, u16, &str, &str)> = vec![
        (
            post(&ts, credits, &key(), &json!({"amount": "5"})).await,
            400,
            "invalid_request",
            "/amount",
        ),
        (
            post(&ts, credits, &key(), &json!({"amount": 5.5})).await,
            400,
            "invalid_request",
            "/amount",
        ),
        (
            post(&ts, credits, &key(), &json!({})).await,
            400,
            "invalid_request",
            "/amount",
        ),
        (
            post(&ts, credits, &key(), &json!({"amont": 5})).await,
            400,
            "invalid_request",
            "/amont",
        ),
        (
            post(
                &ts,
                credits,
                &key(),
                &json!({"amount": 5, "metadata": {"k": 1}}),
            )
            .await,
            400,
            "invalid_request",
            "/metadata/k",
        ),
        (
            post_raw(&ts, credits, Some(&key()), "[5]").await,
            400,
            "invalid_request",
            "",
        ),
        (
            post(&ts, credits, &key(), &json!({"amount": 0})).await,
            422,
            "validation_failed",
            "/amount",
        ),
        (
            post(
                &ts,
                credits,
                &key(),
                &json!({"amount": 5, "metadata": {"k": "v".repeat(501)}}),
            )
            .await,
            422,
            "validation_failed",
            "/metadata",
        ),
        (
            post(
                &ts,
                "/v1/accounts/f-1/holds",
                &key(),
                &json!({"amount": 5, "expires_in_secs": 0}),
            )
            .await,
            422,
            "validation_failed",
            "/expires_in_secs",
        ),
        (
            post_raw(&ts, credits, None, json!({"amount": 5}).to_string()).await,
            400,
            "idempotency_key_missing",
            "header:Idempotency-Key",
        ),
        (
            post_raw(
                &ts,
                credits,
                Some(&"k".repeat(256)),
                json!({"amount": 5}).to_string(),
            )
            .await,
            400,
            "invalid_request",
            "header:Idempotency-Key",
        ),
        (
            post(
                &ts,
                "/v1/accounts/bad%20id/credits",
                &key(),
                &json!({"amount": 5}),
            )
            .await,
            400,
            "invalid_request",
            "path:id",
        ),
        (
            post(
                &ts,
                "/v1/accounts/f-1/holds/nope/capture",
                &key(),
                &json!({}),
            )
            .await,
            400,
            "invalid_request",
            "path:hold_id",
        ),
        (
            put(
                &ts,
                "/v1/accounts/f-2",
                json!({"currency": "gem"}).to_string(),
            )
            .await,
            422,
            "validation_failed",
            "/currency",
        ),
        (
            put(
                &ts,
                "/v1/accounts/f-2",
                json!({"currency": "GEM", "overdraft_limit": -1}).to_string(),
            )
            .await,
            422,
            "validation_failed",
            "/overdraft_limit",
        ),
        (
            get(&ts, "/v1/accounts/f-1/holds?limit=0").await,
            400,
            "invalid_request",
            "query:limit",
        ),
        (
            get(&ts, "/v1/accounts/f-1/holds?status=gone").await,
            400,
            "invalid_request",
            "query:status",
        ),
        (
            get(&ts, "/v1/accounts/f-1/holds?color=red").await,
            400,
            "invalid_request",
            "query:color",
        ),
        (
            get(&ts, "/v1/accounts/f-1/transactions?before_seq=x").await,
            400,
            "invalid_request",
            "query:before_seq",
        ),
        (
            get(&ts, "/v1/accounts/f-1/idempotency-keys/%20").await,
            400,
            "invalid_request",
            "path:key",
        ),
        (
            get(&ts, "/v1/transfers/nope").await,
            400,
            "invalid_request",
            "path:id",
        ),
        (
            post(
                &ts,
                "/v1/transfers",
                &key(),
                &json!({"from": "f-1", "to": "f 2", "amount": 5}),
            )
            .await,
            400,
            "invalid_request",
            "/to",
        ),
        (
            post(
                &ts,
                "/v1/transfers",
                &key(),
                &json!({"from": "f-1", "to": "f-1", "amount": 5}),
            )
            .await,
            422,
            "validation_failed",
            "/to",
        ),
        (
            get(&ts, "/v1/events?wait_ms=30001").await,
            400,
            "invalid_request",
            "query:wait_ms",
        ),
        (
            get(&ts, "/v1/events?after=e00000000ffffffff").await,
            400,
            "invalid_request",
            "query:after",
        ),
    ];
    for (r, status, code, field) in &cases {
        assert_problem_at(r, *status, code, field);
    }
    // Nothing of it was applied.
    assert_untouched(&ts, "f-1", 1, 100).await;
}

#[tokio::test]
async fn insufficient_funds_carries_available_and_requested() {
    // Goal: a client can tell how much was missing without parsing the detail, with and
    // without an overdraft, for debits, holds and transfers alike.
    let ts = TestServer::start().await;
    open(&ts, "n-1").await;
    open_account(
        &ts,
        "n-2",
        json!({"currency": "GEM", "overdraft_limit": 50}),
    )
    .await;
    credit(&ts, "n-1", 100).await;
    hold(&ts, "n-1", json!({"amount": 30})).await;
    let debit = post(
        &ts,
        "/v1/accounts/n-1/debits",
        &key(),
        &json!({"amount": 71}),
    )
    .await;
    assert_problem(&debit, 409, "insufficient_funds");
    assert_eq!(
        (
            debit.json()["available"].clone(),
            debit.json()["requested"].clone()
        ),
        (json!(70), json!(71))
    );
    let held = post(
        &ts,
        "/v1/accounts/n-2/holds",
        &key(),
        &json!({"amount": 51}),
    )
    .await;
    assert_problem(&held, 409, "insufficient_funds");
    assert_eq!(
        (
            held.json()["available"].clone(),
            held.json()["requested"].clone()
        ),
        (json!(0), json!(51))
    );
    let transfer = post(
        &ts,
        "/v1/transfers",
        &key(),
        &json!({"from": "n-1", "to": "n-2", "amount": 500}),
    )
    .await;
    assert_problem(&transfer, 409, "insufficient_funds");
    assert_eq!(
        (
            transfer.json()["available"].clone(),
            transfer.json()["requested"].clone()
        ),
        (json!(70), json!(500))
    );
}

#[tokio::test]
async fn requests_after_the_stop_are_503_shutting_down() {
    // Goal: once the server has begun to stop, a request that still reaches the router is
    // answered 503 `shutting_down` with `Connection: close` (never `overloaded`, which means
    // load); `/healthz` still says the process runs.
    let state = coffer::http::AppState::new();
    let mut router = coffer::http::router(state.clone());
    state.begin_stop();
    for path in ["/v1/accounts/x", "/readyz", "/openapi.json", "/nowhere"] {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .expect("a request");
        let response = tower::Service::call(&mut router, request)
            .await
            .expect("the router answers");
        assert_eq!(response.status(), 503, "{path}");
        assert_eq!(response.headers()["connection"], "close", "{path}");
        assert_eq!(response.headers()["retry-after"], "1", "{path}");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("the body");
        let problem: Value = serde_json::from_slice(&body).expect("a problem");
        assert_eq!(problem["code"], "shutting_down", "{path}: {problem}");
    }
    let request = axum::http::Request::get("/healthz")
        .body(axum::body::Body::empty())
        .expect("a request");
    let response = tower::Service::call(&mut router, request)
        .await
        .expect("the router answers");
    assert_eq!(response.status(), 200);
}
