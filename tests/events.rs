//! `GET /v1/events` against a real server on 127.0.0.1: commit order, the same Transaction
//! JSON as the transactions list, filters, validation, long polls, Server-Sent Events with
//! `Last-Event-ID`, and 410 `cursor_expired` once retention removed the segments.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::{json, Value};

async fn put_account(server: &TestServer, id: &str) {
    let response = server
        .client
        .put(server.url(&format!("/v1/accounts/{id}")))
        .json(&json!({"currency": "GEM"}))
        .send()
        .await
        .expect("PUT account");
    assert_eq!(response.status(), 201);
}

async fn post(server: &TestServer, path: &str, key: &str, body: Value) -> Value {
    let response = server
        .client
        .post(server.url(path))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.expect("JSON body")
}

async fn credit(server: &TestServer, id: &str, key: &str, amount: u64) -> Value {
    post(
        server,
        &format!("/v1/accounts/{id}/credits"),
        key,
        json!({"amount": amount}),
    )
    .await
}

async fn get(server: &TestServer, path_and_query: &str) -> (u16, Value) {
    let response = server
        .client
        .get(server.url(path_and_query))
        .send()
        .await
        .expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn events(page: &Value) -> Vec<Value> {
    page["events"].as_array().cloned().unwrap_or_default()
}

/// Two accounts with one of every kind of transaction between them.
async fn busy_server() -> TestServer {
    let server = TestServer::start().await;
    put_account(&server, "alice").await;
    put_account(&server, "bob").await;
    credit(&server, "alice", "c1", 1000).await;
    post(
        &server,
        "/v1/accounts/alice/debits",
        "d1",
        json!({"amount": 100}),
    )
    .await;
    let hold = post(
        &server,
        "/v1/accounts/alice/holds",
        "h1",
        json!({"amount": 50}),
    )
    .await;
    let hold_id = hold["hold"]["id"].as_str().expect("hold id").to_string();
    post(
        &server,
        &format!("/v1/accounts/alice/holds/{hold_id}/capture"),
        "cap1",
        json!({"amount": 20}),
    )
    .await;
    let hold = post(
        &server,
        "/v1/accounts/alice/holds",
        "h2",
        json!({"amount": 30}),
    )
    .await;
    let hold_id = hold["hold"]["id"].as_str().expect("hold id").to_string();
    post(
        &server,
        &format!("/v1/accounts/alice/holds/{hold_id}/release"),
        "rel1",
        json!({}),
    )
    .await;
    post(
        &server,
        "/v1/transfers",
        "t1",
        json!({"from": "alice", "to": "bob", "amount": 70}),
    )
    .await;
    credit(&server, "bob", "c2", 5).await;
    server
}

#[tokio::test]
async fn events_are_every_transaction_in_commit_order_as_the_transactions_list_shows_it() {
    // Goal: the stream holds each transaction once, in commit order, identical to the list.
    let server = busy_server().await;
    let (status, page) = get(&server, "/v1/events").await;
    assert_eq!(status, 200, "{page}");
    let all = events(&page);
    let kinds: Vec<&str> = all
        .iter()
        .map(|e| e["transaction"]["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "credit",
            "debit",
            "hold",
            "capture",
            "hold",
            "release",
            "transfer_out",
            "transfer_in",
            "credit"
        ],
        "account creation is not an event"
    );
    let cursors: Vec<&str> = all
        .iter()
        .map(|e| e["cursor"].as_str().unwrap_or(""))
        .collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "cursors grow: {cursors:?}"
    );
    assert_eq!(
        page["next"].as_str(),
        cursors.last().copied(),
        "next is the last cursor"
    );
    for id in ["alice", "bob"] {
        let (_, list) = get(&server, &format!("/v1/accounts/{id}/transactions")).await;
        let mut listed: Vec<Value> = list["transactions"].as_array().cloned().unwrap_or_default();
        listed.reverse();
        let streamed: Vec<Value> = all
            .iter()
            .map(|e| e["transaction"].clone())
            .filter(|t| t["account_id"] == id)
            .collect();
        assert_eq!(
            serde_json::to_string(&streamed).expect("json"),
            serde_json::to_string(&listed).expect("json"),
            "{id}: the stream shows the list's transactions"
        );
    }
    // Paging with a small limit gives the same sequence, and the end gives the cursor back.
    let mut after = String::new();
    let mut paged = Vec::new();
    for _ in 0..20 {
        let query = if after.is_empty() {
            "/v1/events?limit=2".to_string()
        } else {
            format!("/v1/events?limit=2&after={after}")
        };
        let (status, page) = get(&server, &query).await;
        assert_eq!(status, 200);
        let next = page["next"].as_str().expect("next").to_string();
        if events(&page).is_empty() {
            assert_eq!(next, after, "an empty page gives the same cursor back");
            break;
        }
        assert!(events(&page).len() <= 2);
        paged.extend(events(&page));
        after = next;
    }
    assert_eq!(paged, all);
}

#[tokio::test]
async fn filters_by_account_and_kind() {
    // Goal: `account` and `kind` narrow the stream, and `next` still moves past what they skip.
    let server = busy_server().await;
    let (_, page) = get(&server, "/v1/events?account=bob").await;
    let bob: Vec<String> = events(&page)
        .iter()
        .map(|e| e["transaction"]["kind"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(bob, ["transfer_in", "credit"]);
    assert!(events(&page)
        .iter()
        .all(|e| e["transaction"]["account_id"] == "bob"));
    let (_, all) = get(&server, "/v1/events").await;
    assert_eq!(
        page["next"], all["next"],
        "the filtered read looked at everything"
    );
    let (_, page) = get(&server, "/v1/events?kind=hold").await;
    assert_eq!(events(&page).len(), 2);
    assert!(events(&page)
        .iter()
        .all(|e| e["transaction"]["kind"] == "hold"));
    let (_, page) = get(&server, "/v1/events?kind=transfer_in&account=bob").await;
    assert_eq!(events(&page).len(), 1);
    let (_, page) = get(&server, "/v1/events?kind=expire").await;
    assert!(events(&page).is_empty());
    assert_eq!(page["next"], all["next"]);
}

#[tokio::test]
async fn malformed_queries_are_400_invalid_request() {
    // Goal: every bad parameter is refused before anything is read.
    let server = busy_server().await;
    let (_, all) = get(&server, "/v1/events").await;
    let last = all["next"].as_str().expect("next").to_string();
    let ahead = format!(
        "e{:016x}",
        u64::from_str_radix(&last[1..], 16).expect("hex") + 1000
    );
    for query in [
        "after=garbage",
        "after=e00000000000000FF",
        "after=00000000000000001",
        "limit=0",
        "limit=1001",
        "limit=ten",
        "wait_ms=30001",
        "wait_ms=-1",
        "wait_ms=1.5",
        "kind=refund",
        "account=no%20spaces",
        "cursor=e0000000000000001",
        &format!("after={ahead}"),
    ] {
        let (status, body) = get(&server, &format!("/v1/events?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["code"], "invalid_request", "{query}");
    }
    let response = server
        .client
        .get(server.url("/v1/events"))
        .header("Accept", "text/event-stream")
        .header("Last-Event-ID", "nope")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn a_long_poll_returns_when_an_event_commits_and_empty_when_the_wait_ends() {
    // Goal: wait_ms waits for the next commit, not for the whole wait; and gives up after it.
    let server = busy_server().await;
    let (_, all) = get(&server, "/v1/events").await;
    let next = all["next"].as_str().expect("next").to_string();

    let started = Instant::now();
    let (status, page) = get(&server, &format!("/v1/events?after={next}&wait_ms=300")).await;
    assert_eq!(status, 200);
    assert!(events(&page).is_empty());
    assert_eq!(page["next"], next.as_str());
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited");

    let client = server.client.clone();
    let url = server.url(&format!("/v1/events?after={next}&wait_ms=20000"));
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let page: Value = client
            .get(url)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON");
        (page, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = credit(&server, "bob", "late", 9).await;
    let (page, elapsed) = tokio::time::timeout(Duration::from_secs(25), poll)
        .await
        .expect("the poll ends")
        .expect("the poll task");
    assert!(
        elapsed < Duration::from_secs(19),
        "answered before the wait ended"
    );
    let got = events(&page);
    assert_eq!(got.len(), 1, "{page}");
    assert_eq!(got[0]["transaction"], answer["transaction"]);
}

/// Reads SSE events from a response until `count` arrived (bounded in time).
async fn read_sse(response: &mut reqwest::Response, count: usize) -> Vec<(String, Value)> {
    let mut text = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < count && Instant::now() < deadline {
        let chunk = tokio::time::timeout(Duration::from_secs(20), response.chunk())
            .await
            .expect("a chunk in time")
            .expect("read a chunk")
            .expect("the stream goes on");
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_string());
                }
                if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str::<Value>(v).expect("data is JSON"));
                }
            }
            if let (Some(id), Some(data)) = (id, data) {
                out.push((id, data));
            }
        }
    }
    out
}

#[tokio::test]
async fn server_sent_events_stream_live_and_resume_after_last_event_id() {
    // Goal: SSE delivers the stream (id = cursor) as it commits, and a reconnect with
    // Last-Event-ID continues right after it, with nothing lost or repeated.
    let server = busy_server().await;
    let mut response = server
        .client
        .get(server.url("/v1/events?limit=3"))
        .header("Accept", "text/event-stream")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let first = read_sse(&mut response, 9).await;
    assert_eq!(first.len(), 9);
    for (id, data) in &first {
        assert_eq!(data["cursor"].as_str(), Some(id.as_str()));
    }
    // A live event arrives on the open stream.
    let live = credit(&server, "alice", "live-1", 3).await;
    let more = read_sse(&mut response, 1).await;
    assert_eq!(more[0].1["transaction"], live["transaction"]);
    drop(response);

    credit(&server, "alice", "while-away", 4).await;
    let mut resumed = server
        .client
        .get(server.url("/v1/events"))
        .header("Accept", "text/event-stream")
        .header("Last-Event-ID", first[4].0.as_str())
        .send()
        .await
        .expect("GET");
    assert_eq!(resumed.status(), 200);
    let after = read_sse(&mut resumed, 6).await;
    let expected: Vec<&String> = first[5..]
        .iter()
        .chain(more.iter())
        .map(|(id, _)| id)
        .collect();
    let got: Vec<&String> = after.iter().take(5).map(|(id, _)| id).collect();
    assert_eq!(got, expected, "resumed right after Last-Event-ID");
    assert_eq!(after[5].1["transaction"]["metadata"], json!({}));
    assert_eq!(after[5].1["transaction"]["amount"], 4);
}

#[tokio::test]
async fn a_cursor_older_than_the_kept_segments_is_410_with_the_oldest_cursor() {
    // Goal: once snapshots and a zero retention removed segments, an old cursor is refused
    // with the oldest available one, never answered with a silent gap.
    let server = TestServer::start_with(|config| {
        config.segment_bytes_max = 4096;
        config.event_retention = Duration::ZERO;
        config.snapshot_every_records = None;
        config.snapshot_interval = None;
    })
    .await;
    put_account(&server, "alice").await;
    for i in 0..150 {
        credit(&server, "alice", &format!("k{i}"), 1).await;
    }
    server.engine().snapshot().await.expect("snapshot");
    credit(&server, "alice", "between", 1).await;
    let report = server.engine().snapshot().await.expect("snapshot");
    assert!(report.segments_removed > 0, "{report:?}");

    let (status, body) = get(&server, "/v1/events?after=e0000000000000000").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["code"], "cursor_expired");
    let oldest = body["oldest_cursor"]
        .as_str()
        .expect("oldest_cursor")
        .to_string();
    assert!(body["detail"].as_str().unwrap_or("").contains(&oldest));

    let (status, page) = get(&server, &format!("/v1/events?after={oldest}&limit=1000")).await;
    assert_eq!(status, 200, "{page}");
    let from_oldest = events(&page);
    assert!(!from_oldest.is_empty());
    let (_, default) = get(&server, "/v1/events?limit=1000").await;
    assert_eq!(
        events(&default),
        from_oldest,
        "no `after`: from the oldest kept"
    );
    // The kept events are contiguous up to the end: seqs run without a gap.
    let seqs: Vec<u64> = from_oldest
        .iter()
        .map(|e| e["transaction"]["seq"].as_u64().unwrap_or(0))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(seqs.last(), Some(&151));
}

#[tokio::test]
async fn event_retention_keeps_covered_segments_readable() {
    // Goal: with a retention, segments covered by snapshots stay and every event is served.
    let server = TestServer::start_with(|config| {
        config.segment_bytes_max = 4096;
        config.event_retention = Duration::from_secs(3600);
        config.snapshot_every_records = None;
        config.snapshot_interval = None;
    })
    .await;
    put_account(&server, "alice").await;
    for i in 0..150 {
        credit(&server, "alice", &format!("k{i}"), 1).await;
    }
    server.engine().snapshot().await.expect("snapshot");
    credit(&server, "alice", "between", 1).await;
    let report = server.engine().snapshot().await.expect("snapshot");
    assert_eq!(report.segments_removed, 0);
    let (status, page) = get(&server, "/v1/events?after=e0000000000000000&limit=1000").await;
    assert_eq!(status, 200);
    assert_eq!(events(&page).len(), 151);
}

#[tokio::test]
async fn events_after_a_restart_are_read_from_the_segments() {
    // Goal: with nothing in memory (a fresh process), the stream reads the log on disk,
    // and the metrics count what was delivered.
    let mut server = busy_server().await;
    let (_, before) = get(&server, "/v1/events").await;
    server.restart().await;
    let (status, after) = get(&server, "/v1/events").await;
    assert_eq!(status, 200);
    assert_eq!(before, after);
    let (_, page) = get(&server, "/v1/events?limit=4").await;
    let (_, rest) = get(
        &server,
        &format!("/v1/events?after={}", page["next"].as_str().unwrap_or("")),
    )
    .await;
    assert_eq!([events(&page), events(&rest)].concat(), events(&after));
    let metrics = server.get_text("/metrics").await;
    assert!(
        metrics.contains("coffer_events_delivered_total 18"),
        "{metrics}"
    );
    assert!(metrics.contains("coffer_event_consumers 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_measures_events_delivered_to_consumers() {
    // Goal: `coffer load --consumers N` reads the stream while it writes (the benchmark's tool).
    let server = TestServer::start().await;
    let args = coffer::load::LoadArgs {
        target: server.addr(),
        workload: coffer::load::Workload::Uniform,
        accounts: 8,
        connections: 4,
        duration: Duration::from_millis(800),
        rate: None,
        batch: 1,
        prefix: "ev".to_string(),
        json: false,
        quiet: true,
        token: None,
        tls_ca: None,
        tls_server_name: None,
        consumers: 2,
        tls: None,
    };
    let report = tokio::time::timeout(Duration::from_secs(60), coffer::load::run(args))
        .await
        .expect("the load run ends in time")
        .expect("the load run succeeds");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.mismatched_accounts, 0);
    assert!(report.events_delivered > 0, "{}", report.text());
    assert!(
        report.events_delivered <= 2 * report.flows + 16,
        "{}",
        report.text()
    );
}

#[tokio::test]
async fn a_stopping_server_ends_long_polls_and_streams_with_shutting_down() {
    // Goal: a consumer can tell a stop from load: a waiting long poll is answered 503
    // `shutting_down` (not `overloaded`), and an open SSE stream gets an `event: error` with
    // that problem before it ends.
    let mut server = busy_server().await;
    let (_, page) = get(&server, "/v1/events?limit=1000").await;
    let next = page["next"].as_str().expect("a cursor").to_string();
    let poll = tokio::spawn(
        server
            .client
            .get(server.url(&format!("/v1/events?after={next}&wait_ms=20000")))
            .send(),
    );
    let mut stream = server
        .client
        .get(server.url(&format!("/v1/events?after={next}")))
        .header("Accept", "text/event-stream")
        .send()
        .await
        .expect("GET");
    assert_eq!(stream.status(), 200);
    // Both consumers are waiting before the stop begins.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = server.get_text("/metrics").await;
        if metrics
            .lines()
            .any(|line| line == "coffer_event_consumers 2")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the consumers never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
    let poll = poll
        .await
        .expect("the task")
        .expect("the long poll is answered");
    assert_eq!(poll.status(), 503);
    assert_eq!(poll.headers()["retry-after"], "1");
    let problem: Value = poll.json().await.expect("a problem");
    assert_eq!(problem["code"], "shutting_down", "{problem}");
    let mut text = String::new();
    while let Ok(Some(chunk)) = stream.chunk().await {
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    let data = text
        .split("event: error\ndata: ")
        .nth(1)
        .and_then(|rest| rest.split('\n').next())
        .unwrap_or_else(|| panic!("no error event in {text:?}"));
    let problem: Value = serde_json::from_str(data).expect("the error event's data is JSON");
    assert_eq!(problem["code"], "shutting_down", "{problem}");
    assert_eq!(problem["status"], 503, "{problem}");
}
