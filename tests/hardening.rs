//! Production hardening over real servers on 127.0.0.1: bearer-token authentication, the
//! refusal to serve a public address without it, the separate metrics listener, the
//! header-read timeout (slowloris), the rate limit, the request timeout, request ids and
//! TLS.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use coffer::http::{GuardConfig, RateLimit, Tokens};
use coffer::server::{load_tls, ServerConfig};
use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PLAIN: &str = "alpha-token";
const HASHED: &str = "beta-token";

fn tokens() -> Tokens {
    let hashed: String = coffer::http::guard::digest(HASHED)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut tokens = Tokens::default();
    tokens
        .add_file(&format!("# test tokens\n\nsha256:{hashed}\n"))
        .expect("a good tokens file");
    tokens.add_list(PLAIN).expect("a good list");
    tokens
}

fn secured() -> ServerConfig {
    let mut config = ServerConfig::new("127.0.0.1:0");
    config.guard = GuardConfig {
        tokens: tokens(),
        ..GuardConfig::default()
    };
    config
}

async fn code_of(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("a JSON body");
    body["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn tokens_are_required_except_on_health_endpoints() {
    // Goal: no token or a wrong one is 401 with WWW-Authenticate; plain and hashed tokens
    // pass; /healthz and /readyz stay open; /metrics is behind auth.
    let mut server = TestServer::start_configured(secured(), |_| {}).await;
    let url = server.url("/v1/accounts/acct-1");
    let missing = server.client.get(&url).send().await.expect("send");
    assert_eq!(missing.status(), 401);
    assert!(missing
        .headers()
        .get("www-authenticate")
        .is_some_and(|v| v.as_bytes().starts_with(b"Bearer")));
    assert!(missing.headers().get("x-request-id").is_some());
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(code_of(missing).await, "unauthorized");
    for wrong in [
        "Bearer nope",
        "Bearer alpha-token2",
        "Basic alpha-token",
        "Bearer ",
    ] {
        let response = server
            .client
            .get(&url)
            .header("authorization", wrong)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 401, "{wrong}");
    }
    for token in [PLAIN, HASHED] {
        let response = server
            .client
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .expect("send");
        assert_eq!(
            response.status(),
            404,
            "{token}: past auth, no such account"
        );
    }
    for open in ["/healthz", "/readyz"] {
        let response = server.client.get(server.url(open)).send().await;
        assert_eq!(response.expect("send").status(), 200, "{open}");
    }
    let metrics = server.client.get(server.url("/metrics")).send().await;
    assert_eq!(metrics.expect("send").status(), 401);
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth(PLAIN)
        .send()
        .await;
    assert_eq!(metrics.expect("send").status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn unauthorized_comes_before_payload_too_large_and_invalid_request() {
    // Goal: the API's error order puts 401 before 413 and 400.
    let mut server = TestServer::start_configured(secured(), |_| {}).await;
    let url = server.url("/v1/accounts/acct-1/credits");
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let response = server.client.post(&url).body(huge).send().await;
    assert_eq!(response.expect("send").status(), 401);
    let response = server
        .client
        .put(server.url("/v1/accounts/bad id!"))
        .body("{")
        .send();
    assert_eq!(response.await.expect("send").status(), 401);
    let response = server
        .client
        .put(server.url("/v1/accounts/acct-1"))
        .bearer_auth(PLAIN)
        .body("{")
        .send()
        .await;
    assert_eq!(response.expect("send").status(), 400);
    server.stop().await;
}

#[tokio::test]
async fn metrics_listen_serves_metrics_alone_and_without_auth() {
    // Goal: with --metrics-listen, /metrics is on that listener only, without a token.
    let mut config = secured();
    config.metrics_listen = Some("127.0.0.1:0".to_string());
    let mut server = TestServer::start_configured(config, |_| {}).await;
    let metrics_addr = server.metrics_addr().expect("a metrics listener");
    let response = server
        .client
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert!(response
        .text()
        .await
        .expect("body")
        .contains("coffer_http_requests_total"));
    let other = server
        .client
        .get(format!("http://{metrics_addr}/v1/accounts/acct-1"))
        .send()
        .await;
    assert_eq!(other.expect("send").status(), 404);
    let main = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth(PLAIN)
        .send()
        .await;
    assert_eq!(main.expect("send").status(), 404);
    server.stop().await;
}

fn coffer_serve(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coffer"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("COFFER_AUTH_TOKENS")
        .env_remove("COFFER_AUTH_TOKENS_FILE")
        .env_remove("COFFER_INSECURE_NO_AUTH")
        .env_remove("COFFER_LISTEN")
        .env("NO_COLOR", "1")
        .output()
        .expect("run coffer")
}

#[test]
fn refuses_a_public_address_without_tokens_and_a_bad_tokens_file() {
    // Goal: startup fails clearly, with a non-zero exit, rather than serving money to anyone.
    let dir = tempfile::tempdir().expect("temp dir");
    let output = coffer_serve(&["--listen", "0.0.0.0:0"], dir.path());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
    assert!(stderr.contains("non-loopback"), "{stderr}");

    let file = dir.path().join("tokens");
    std::fs::write(&file, "good\nsha256:1234\n").expect("write tokens");
    let file_arg = file.to_str().expect("a UTF-8 temp path");
    let output = coffer_serve(
        &["--listen", "127.0.0.1:0", "--auth-tokens-file", file_arg],
        dir.path(),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");

    let missing = dir.path().join("no-such-file");
    let missing_arg = missing.to_str().expect("a UTF-8 temp path");
    let output = coffer_serve(
        &["--listen", "127.0.0.1:0", "--auth-tokens-file", missing_arg],
        dir.path(),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read the tokens file"), "{stderr}");
}

#[tokio::test]
async fn a_client_sending_headers_too_slowly_is_cut_off() {
    // Goal: slowloris. Headers dribbled one byte every 50 ms never complete within the
    // 300 ms header-read timeout: the server closes the connection, and serves others.
    let mut config = ServerConfig::new("127.0.0.1:0");
    config.header_read_timeout = Duration::from_millis(300);
    let mut server = TestServer::start_configured(config, |_| {}).await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let header = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut write_failed = false;
    for byte in header {
        if stream.write_all(&[*byte]).await.is_err() {
            write_failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection within 5 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        write_failed || read.is_err() || !text.contains(" 200 "),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let ok = server.client.get(server.url("/healthz")).send().await;
    assert_eq!(ok.expect("send").status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a_flood_over_the_rate_limit_gets_429_with_retry_after() {
    // Goal: past the burst, a token's requests get 429 rate_limited with Retry-After, while
    // another token is not affected.
    let mut config = secured();
    config.guard.rate_limit = Some(RateLimit {
        per_second: 2,
        burst: 3,
    });
    let mut server = TestServer::start_configured(config, |_| {}).await;
    let url = server.url("/v1/accounts/acct-1");
    let mut limited = None;
    for _ in 0..20 {
        let response = server
            .client
            .get(&url)
            .bearer_auth(PLAIN)
            .send()
            .await
            .expect("send");
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), 404);
    }
    let limited = limited.expect("a 429 within 20 requests");
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after));
    assert!(limited.headers().get("x-request-id").is_some());
    assert_eq!(code_of(limited).await, "rate_limited");
    let other = server.client.get(&url).bearer_auth(HASHED).send().await;
    assert_eq!(other.expect("send").status(), 404);
    let health = server.client.get(server.url("/healthz")).send().await;
    assert_eq!(health.expect("send").status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a_request_over_the_timeout_is_503_overloaded() {
    // Goal: a request that outlives the request timeout is answered 503 with Retry-After.
    let mut config = ServerConfig::new("127.0.0.1:0");
    config.guard.request_timeout = Duration::from_nanos(1);
    let mut server = TestServer::start_configured(config, |_| {}).await;
    let response = server
        .client
        .put(server.url("/v1/accounts/acct-1"))
        .json(&serde_json::json!({"currency": "EUR"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(code_of(response).await, "overloaded");
    server.stop().await;
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    // Goal: a sane X-Request-Id comes back as sent; a missing or insane one is replaced by
    // a UUID v7; errors (401 included) carry it too.
    let mut server = TestServer::start_configured(secured(), |_| {}).await;
    let sent = server
        .client
        .get(server.url("/healthz"))
        .header("x-request-id", "req-42.abc")
        .send()
        .await
        .expect("send");
    assert_eq!(sent.headers()["x-request-id"], "req-42.abc");
    let long = "a".repeat(201);
    for bad in [None, Some("has space"), Some(long.as_str())] {
        let mut request = server.client.get(server.url("/v1/accounts/acct-1"));
        if let Some(bad) = bad {
            request = request.header("x-request-id", bad);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status(), 401);
        let id = response.headers()["x-request-id"].to_str().expect("ASCII");
        let uuid = uuid::Uuid::parse_str(id).expect("a generated UUID");
        assert_eq!(uuid.get_version_num(), 7);
    }
    server.stop().await;
}

#[tokio::test]
async fn tls_serves_https_to_a_client_trusting_the_certificate_only() {
    // Goal: with a generated certificate, a trusting client gets answers over HTTPS; plain
    // HTTP to the TLS port and a client not trusting the certificate both fail.
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("generate a certificate");
    let dir = tempfile::tempdir().expect("temp dir");
    let cert_pem = certified.cert.pem();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
    let mut config = secured();
    config.tls = Some(load_tls(&cert, &key).expect("load the certificate"));
    let mut server = TestServer::start_configured(config, |_| {}).await;
    assert!(server.base.starts_with("https://"));
    let trusting = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("pem"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let health = trusting.get(server.url("/healthz")).send().await;
    assert_eq!(health.expect("HTTPS works").status(), 200);
    let create = trusting
        .put(server.url("/v1/accounts/acct-1"))
        .bearer_auth(PLAIN)
        .json(&serde_json::json!({"currency": "EUR"}))
        .send()
        .await;
    assert_eq!(create.expect("send").status(), 201);
    let load = coffer::load::LoadArgs {
        target: server.addr(),
        workload: coffer::load::Workload::Uniform,
        accounts: 4,
        connections: 2,
        duration: Duration::from_millis(300),
        rate: None,
        batch: 1,
        prefix: "tls-load".to_string(),
        json: false,
        quiet: true,
        token: Some(PLAIN.to_string()),
        tls_ca: Some(cert.clone()),
        tls_server_name: None,
        consumers: 0,
        tls: None,
    };
    let report = tokio::time::timeout(Duration::from_secs(60), coffer::load::run(load))
        .await
        .expect("the load run ends in time")
        .expect("coffer load speaks HTTPS with a token");
    assert!(report.flows > 0);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.mismatched_accounts, 0);
    let plain = server.base.replacen("https://", "http://", 1) + "/healthz";
    assert!(server.client.get(&plain).send().await.is_err());
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    assert!(untrusting.get(server.url("/healthz")).send().await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    // Goal: with --max-connections 1, a second connection is not served while the first is
    // open, and is served once it closes.
    let mut config = ServerConfig::new("127.0.0.1:0");
    config.connections_max = 1;
    let mut server = TestServer::start_configured(config, |_| {}).await;
    let addr = server.addr();
    let first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // Give the accept loop time to take the only permit for the first connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(300), second.read_to_end(&mut answer)).await;
    assert!(waited.is_err(), "answered past the cap: {answer:?}");
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut answer))
        .await
        .expect("served once the first connection closed")
        .expect("read");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    server.stop().await;
}

/// One HTTP/1.1 answer read from a raw connection: its status line and headers (lower
/// case), after reading its whole `Content-Length` body.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> (u16, Vec<(String, String)>) {
    let mut buffer = Vec::new();
    let mut byte = [0u8; 1];
    while !buffer.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("an answer within 5 s")
            .expect("read");
        assert_eq!(
            read, 1,
            "the connection closed before an answer: {buffer:?}"
        );
        buffer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buffer).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_lowercase()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .expect("a Content-Length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("the body");
    (status, headers)
}

fn closes(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(name, value)| name == "connection" && value == "close")
}

#[tokio::test]
async fn a_post_refused_before_its_body_is_read_keeps_or_closes_its_connection_explicitly() {
    // Goal: a POST refused before its body is needed (401, 429) leaves the connection usable:
    // a small body is read and discarded, and the next request on the same connection is
    // answered. A body that is not read (too large, or not sent) is answered with
    // `Connection: close`, so a client pool does not reuse a connection the server closes.
    let mut config = secured();
    config.guard.rate_limit = Some(RateLimit {
        per_second: 1,
        burst: 1,
    });
    let mut server = TestServer::start_configured(config, |_| {}).await;
    let addr = server.addr();
    let body = r#"{"amount": 5}"#;
    let post = |auth: &str, length: usize| {
        format!(
            "POST /v1/accounts/a-1/credits HTTP/1.1\r\nHost: x\r\n{auth}Idempotency-Key: k\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    let next = "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // 401 with a small body, then the next request on the same connection.
    let request = format!("{}{body}", post("", body.len()));
    stream.write_all(request.as_bytes()).await.expect("write");
    let (status, headers) = read_answer(&mut stream).await;
    assert_eq!(status, 401);
    assert!(!closes(&headers), "{headers:?}");
    stream.write_all(next.as_bytes()).await.expect("write");
    assert_eq!(read_answer(&mut stream).await.0, 200);
    // 429 with a small body: the first request takes the burst, the second is refused.
    let auth = format!("Authorization: Bearer {PLAIN}\r\n");
    for expected in [404, 429] {
        let request = format!("{}{body}", post(&auth, body.len()));
        stream.write_all(request.as_bytes()).await.expect("write");
        let (status, headers) = read_answer(&mut stream).await;
        assert_eq!(status, expected);
        assert!(!closes(&headers), "{headers:?}");
    }
    stream.write_all(next.as_bytes()).await.expect("write");
    assert_eq!(read_answer(&mut stream).await.0, 200);
    // A body too large to discard, announced but not sent: refused with Connection: close.
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(post("", 1 << 20).as_bytes())
        .await
        .expect("write");
    let (status, headers) = read_answer(&mut stream).await;
    assert_eq!(status, 401);
    assert!(closes(&headers), "{headers:?}");
    // 413: the body is not read past its limit.
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("{}{}", post(&auth, 70_000), "x".repeat(70_000));
    let _ = stream.write_all(request.as_bytes()).await;
    let (status, headers) = read_answer(&mut stream).await;
    assert!(status == 413 || status == 429, "{status}");
    assert!(closes(&headers), "{headers:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_pooled_client_keeps_working_after_refused_posts() {
    // Goal: a keep-alive pool of one connection sends POSTs with bodies that are refused
    // (401, then 413 with a token) and a request after each: none of those is lost to a
    // connection the server closed under it.
    let mut server = TestServer::start_configured(secured(), |_| {}).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let credit = server.url("/v1/accounts/p-1/credits");
    let big = "x".repeat(70_000);
    for round in 0..30 {
        let refused = if round % 2 == 0 {
            client
                .post(&credit)
                .header("idempotency-key", format!("k{round}"))
                .body(r#"{"amount": 5}"#)
                .send()
                .await
        } else {
            client
                .post(&credit)
                .bearer_auth(PLAIN)
                .header("idempotency-key", format!("k{round}"))
                .body(big.clone())
                .send()
                .await
        };
        let refused = refused.expect("the refused POST is answered");
        assert!([401, 413].contains(&refused.status().as_u16()));
        let _ = refused.bytes().await;
        let next = client.get(server.url("/readyz")).send().await;
        assert_eq!(next.expect("the next request on the pool").status(), 200);
    }
    server.stop().await;
}
