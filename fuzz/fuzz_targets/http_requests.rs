//! Arbitrary requests (method, path, query, headers, body) through the real router, in
//! process, against one engine on the simulated disk that lives for the whole run.
//!
//! Checked after every request:
//! - nothing panics;
//! - no 5xx but 503 `storage_failure`, `overloaded` or `not_ready`;
//! - every error (but on HEAD, which has no body) is problem+json whose `status` is the
//!   HTTP status and whose `code` is a string;
//! - a 4xx, and any GET or HEAD, leaves the WAL as it was (`wal_records`, `durable_lsn`);
//! - after a 2xx everything appended is durable (`durable_lsn == wal_records`).
//!
//! Input, one of two encodings:
//! - **Text**, when it starts with `>`: requests separated by `\n>`, each
//!   `METHOD TARGET\nName: value\n...\n\nBODY` (the seed corpus is written this way, so it
//!   reads as HTTP). `{hold}` anywhere is replaced by the id of the last hold created by
//!   this input (before any, an open hold made at start-up).
//! - **Structured** otherwise: [`Input`] decoded with `arbitrary`, which reaches valid
//!   JSON bodies, known accounts, hold ids and idempotency keys quickly.
//!
//! `COFFER_FUZZ_TRACE=1` prints each request and its answer, e.g. to replay one input:
//! `COFFER_FUZZ_TRACE=1 cargo +nightly fuzz run http_requests FILE`.
//!
//! The engine keeps its state across inputs (accounts, holds, keys), as a server does;
//! a crash found late in a run may need the inputs before it to reproduce.

#![no_main]

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use axum::Router;
use coffer::clock::ManualClock;
use coffer::domain::{AccountId, Currency, IdempotencyKey, Metadata, Request as Op};
use coffer::storage::sim::SimStorage;
use coffer::{Engine, EngineConfig};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// 2026-01-01T00:00:00Z: the clock never moves, so no hold ever expires.
const NOW_MS: u64 = 1_767_225_600_000;
/// Requests per input, at most.
const REQUESTS_MAX: usize = 8;
/// Bodies up to a little over the 64 KiB limit, to reach 413 and the exact boundary.
const BODY_BYTES_MAX: usize = 70 * 1024;

struct World {
    runtime: tokio::runtime::Runtime,
    engine: Engine,
    router: Router,
    /// Holds made at start-up: two open, one captured, one released.
    holds: Vec<String>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut config = EngineConfig::new("/data");
        config.storage = Arc::new(SimStorage::new());
        config.clock = Arc::new(ManualClock::new(NOW_MS));
        config.expiry_sweep = None;
        config.actors = 2;
        config.id_seed = Some(1);
        // Small segments: the simulated disk copies a file on every sync, and a segment is
        // zero-filled ahead by min(4 MiB, this).
        config.segment_bytes_max = 64 * 1024;
        let (engine, _) = Engine::open(config).expect("open on an empty disk");
        let holds = runtime.block_on(async {
            engine.finish_recovery().await.expect("recovery");
            setup(&engine).await
        });
        let state = coffer::http::AppState::new();
        state.set_engine(engine.clone());
        let router = coffer::http::router(state);
        World {
            runtime,
            engine,
            router,
            holds,
        }
    })
}

/// Accounts and holds for the fuzzer to reach deep paths from the first input on.
async fn setup(engine: &Engine) -> Vec<String> {
    let id = |s: &str| AccountId::parse(s).expect("id");
    let key = |s: &str| Some(IdempotencyKey::parse(s).expect("key"));
    for (name, currency, overdraft) in [
        ("alice", "USD", 0),
        ("bob", "GEM", 500),
        ("carol", "USD", 0),
    ] {
        engine
            .open_account(
                id(name),
                Currency::parse(currency).expect("currency"),
                overdraft,
                Metadata::empty(),
            )
            .await
            .expect("open account");
    }
    let run = |account: &'static str, k: &'static str, op: Op| {
        let engine = engine.clone();
        async move {
            engine
                .execute(&id(account), key(k), op)
                .await
                .expect("setup operation")
        }
    };
    let credit = |amount| Op::Credit {
        amount,
        metadata: Default::default(),
    };
    let hold = || Op::Hold {
        amount: 100,
        expires_in_secs: Some(3600),
        metadata: Default::default(),
    };
    run("alice", "k-0", credit(1_000_000)).await;
    run("bob", "k-0", credit(50)).await;
    // Near the balance limit, so that a transfer from alice can be refused after its debit
    // (and refunded).
    run("carol", "k-0", credit(9_007_199_254_740_991 - 1000)).await;
    let mut holds = Vec::new();
    for k in ["k-1", "k-2", "k-3", "k-4"] {
        let receipt = run("alice", k, hold()).await.receipt;
        let hold_id = receipt
            .hold
            .as_ref()
            .expect("a hold receipt names its hold")
            .id;
        holds.push(hold_id);
    }
    run(
        "alice",
        "k-5",
        Op::Capture {
            hold_id: holds[2],
            amount: Some(40),
            metadata: Default::default(),
        },
    )
    .await;
    run(
        "alice",
        "k-6",
        Op::Release {
            hold_id: holds[3],
            metadata: Default::default(),
        },
    )
    .await;
    holds.iter().map(|h| h.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// The structured input.

#[derive(Arbitrary, Debug)]
struct Input {
    requests: Vec<Req>,
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: MethodChoice,
    target: Target,
    query: Option<Vec<(QueryKey, Value)>>,
    headers: Vec<HeaderChoice>,
    body: BodyChoice,
}

#[derive(Arbitrary, Debug)]
enum MethodChoice {
    Get,
    Post,
    Put,
    Delete,
    Patch,
    Head,
    Options,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum AccountRef {
    Alice,
    Bob,
    Carol,
    Missing,
    Raw(String),
    /// Percent-encoded, to reach the path decoding.
    Encoded(String),
}

#[derive(Arbitrary, Debug)]
enum HoldRef {
    Last,
    Setup(u8),
    Nil,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum KeyRef {
    Fixed(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Target {
    Account(AccountRef),
    Credits(AccountRef),
    Debits(AccountRef),
    Holds(AccountRef),
    Hold(AccountRef, HoldRef),
    Capture(AccountRef, HoldRef),
    Release(AccountRef, HoldRef),
    Transactions(AccountRef),
    IdempotencyKey(AccountRef, KeyRef),
    Batch,
    Transfers,
    Transfer(HoldRef),
    Metrics,
    Healthz,
    Readyz,
    OpenApi,
    Raw(String),
    RawBytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum QueryKey {
    Limit,
    After,
    Status,
    BeforeSeq,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum HeaderChoice {
    Json,
    ContentType(String),
    Key(KeyRef),
    RawKey(Vec<u8>),
    ContentLength(u64),
    Other(String, Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum BodyChoice {
    Empty,
    Object(Vec<(Field, Value)>),
    Json(Value),
    Raw(Vec<u8>),
    /// `n` bytes of an object padded with spaces (n around the 64 KiB limit).
    Padded(u16, Vec<(Field, Value)>),
}

#[derive(Arbitrary, Debug)]
enum Field {
    Amount,
    Currency,
    OverdraftLimit,
    Metadata,
    ExpiresInSecs,
    Operations,
    Op,
    Account,
    HoldId,
    IdempotencyKey,
    From,
    To,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Small(u8),
    Int(i64),
    Wide(i128),
    Max,
    MaxPlusOne,
    Float(f64),
    Text(Str),
    Null,
    Bool(bool),
    Object(Vec<(Field, Value)>),
    Array(Vec<Value>),
    /// Bytes written into the JSON as they are.
    Verbatim(String),
}

#[derive(Arbitrary, Debug)]
enum Str {
    Alice,
    Bob,
    Carol,
    Usd,
    Gem,
    Hold(HoldRef),
    Key(KeyRef),
    OpName(u8),
    Raw(String),
}

/// What one input's requests share: the last hold created.
struct Ctx<'a> {
    world: &'a World,
    last_hold: Option<String>,
}

impl Ctx<'_> {
    fn hold(&self, hold: &HoldRef) -> String {
        match hold {
            HoldRef::Last => self
                .last_hold
                .clone()
                .unwrap_or_else(|| self.world.holds[0].clone()),
            HoldRef::Setup(i) => self.world.holds[*i as usize % self.world.holds.len()].clone(),
            HoldRef::Nil => "00000000-0000-0000-0000-000000000000".to_string(),
            HoldRef::Raw(s) => s.clone(),
        }
    }
}

fn key_text(key: &KeyRef) -> String {
    match key {
        KeyRef::Fixed(n) => format!("k-{}", n % 16),
        KeyRef::Raw(s) => s.clone(),
    }
}

fn account_segment(account: &AccountRef) -> String {
    match account {
        AccountRef::Alice => "alice".to_string(),
        AccountRef::Bob => "bob".to_string(),
        AccountRef::Carol => "carol".to_string(),
        AccountRef::Missing => "nobody".to_string(),
        AccountRef::Raw(s) => s.clone(),
        AccountRef::Encoded(s) => percent_encode(s.as_bytes()),
    }
}

fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn field_name(field: &Field) -> &str {
    match field {
        Field::Amount => "amount",
        Field::Currency => "currency",
        Field::OverdraftLimit => "overdraft_limit",
        Field::Metadata => "metadata",
        Field::ExpiresInSecs => "expires_in_secs",
        Field::Operations => "operations",
        Field::Op => "op",
        Field::Account => "account",
        Field::HoldId => "hold_id",
        Field::IdempotencyKey => "idempotency_key",
        Field::From => "from",
        Field::To => "to",
        Field::Raw(s) => s,
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

fn write_object(ctx: &Ctx, out: &mut String, fields: &[(Field, Value)], depth: usize) {
    out.push('{');
    for (i, (field, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(out, field_name(field));
        out.push(':');
        write_value(ctx, out, value, depth + 1);
    }
    out.push('}');
}

fn write_value(ctx: &Ctx, out: &mut String, value: &Value, depth: usize) {
    if depth > 6 {
        out.push_str("null");
        return;
    }
    match value {
        Value::Small(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Wide(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Max => out.push_str("9007199254740991"),
        Value::MaxPlusOne => out.push_str("9007199254740992"),
        Value::Float(f) => {
            let _ = write!(out, "{f:?}");
        }
        Value::Text(s) => {
            let text = match s {
                Str::Alice => "alice".to_string(),
                Str::Bob => "bob".to_string(),
                Str::Carol => "carol".to_string(),
                Str::Usd => "USD".to_string(),
                Str::Gem => "GEM".to_string(),
                Str::Hold(h) => ctx.hold(h),
                Str::Key(k) => key_text(k),
                Str::OpName(n) => ["credit", "debit", "hold", "capture", "release", "transfer"]
                    [*n as usize % 6]
                    .to_string(),
                Str::Raw(s) => s.clone(),
            };
            json_string(out, &text);
        }
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Object(fields) => write_object(ctx, out, fields, depth),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(ctx, out, item, depth + 1);
            }
            out.push(']');
        }
        Value::Verbatim(s) => out.push_str(s),
    }
}

/// One request as bytes on the wire would give it: method, target, headers, body.
struct Wire {
    method: Vec<u8>,
    target: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
}

fn wire_of(ctx: &Ctx, req: &Req) -> Wire {
    let method = match &req.method {
        MethodChoice::Get => "GET".to_string(),
        MethodChoice::Post => "POST".to_string(),
        MethodChoice::Put => "PUT".to_string(),
        MethodChoice::Delete => "DELETE".to_string(),
        MethodChoice::Patch => "PATCH".to_string(),
        MethodChoice::Head => "HEAD".to_string(),
        MethodChoice::Options => "OPTIONS".to_string(),
        MethodChoice::Other(s) => s.clone(),
    };
    let accounts =
        |a: &AccountRef, rest: &str| format!("/v1/accounts/{}{rest}", account_segment(a));
    let mut target = match &req.target {
        Target::Account(a) => accounts(a, ""),
        Target::Credits(a) => accounts(a, "/credits"),
        Target::Debits(a) => accounts(a, "/debits"),
        Target::Holds(a) => accounts(a, "/holds"),
        Target::Hold(a, h) => accounts(a, &format!("/holds/{}", ctx.hold(h))),
        Target::Capture(a, h) => accounts(a, &format!("/holds/{}/capture", ctx.hold(h))),
        Target::Release(a, h) => accounts(a, &format!("/holds/{}/release", ctx.hold(h))),
        Target::Transactions(a) => accounts(a, "/transactions"),
        Target::IdempotencyKey(a, k) => accounts(a, &format!("/idempotency-keys/{}", key_text(k))),
        Target::Batch => "/v1/batch".to_string(),
        Target::Transfers => "/v1/transfers".to_string(),
        Target::Transfer(h) => format!("/v1/transfers/{}", ctx.hold(h)),
        Target::Metrics => "/metrics".to_string(),
        Target::Healthz => "/healthz".to_string(),
        Target::Readyz => "/readyz".to_string(),
        Target::OpenApi => "/openapi.json".to_string(),
        Target::Raw(s) => s.clone(),
        Target::RawBytes(_) => String::new(),
    }
    .into_bytes();
    if let Target::RawBytes(bytes) = &req.target {
        target = bytes.clone();
    }
    if let Some(pairs) = &req.query {
        target.push(b'?');
        for (i, (key, value)) in pairs.iter().enumerate() {
            if i > 0 {
                target.push(b'&');
            }
            let key = match key {
                QueryKey::Limit => "limit",
                QueryKey::After => "after",
                QueryKey::Status => "status",
                QueryKey::BeforeSeq => "before_seq",
                QueryKey::Raw(s) => s,
            };
            let mut text = String::new();
            match value {
                Value::Text(Str::Raw(s)) | Value::Verbatim(s) => text.push_str(s),
                Value::Text(Str::OpName(n)) => text
                    .push_str(["open", "captured", "released", "expired", "all"][*n as usize % 5]),
                other => {
                    write_value(ctx, &mut text, other, 5);
                    if text.starts_with('"') {
                        text = serde_json::from_str::<String>(&text).unwrap_or(text);
                    }
                }
            }
            target.extend_from_slice(key.as_bytes());
            target.push(b'=');
            target.extend_from_slice(percent_encode(text.as_bytes()).as_bytes());
        }
    }
    let headers = req
        .headers
        .iter()
        .map(|h| match h {
            HeaderChoice::Json => (b"content-type".to_vec(), b"application/json".to_vec()),
            HeaderChoice::ContentType(s) => (b"content-type".to_vec(), s.clone().into_bytes()),
            HeaderChoice::Key(k) => (b"idempotency-key".to_vec(), key_text(k).into_bytes()),
            HeaderChoice::RawKey(v) => (b"idempotency-key".to_vec(), v.clone()),
            HeaderChoice::ContentLength(n) => {
                (b"content-length".to_vec(), n.to_string().into_bytes())
            }
            HeaderChoice::Other(name, value) => (name.clone().into_bytes(), value.clone()),
        })
        .collect();
    let body = match &req.body {
        BodyChoice::Empty => Vec::new(),
        BodyChoice::Object(fields) => {
            let mut out = String::new();
            write_object(ctx, &mut out, fields, 0);
            out.into_bytes()
        }
        BodyChoice::Json(value) => {
            let mut out = String::new();
            write_value(ctx, &mut out, value, 0);
            out.into_bytes()
        }
        BodyChoice::Raw(bytes) => bytes.clone(),
        BodyChoice::Padded(extra, fields) => {
            let mut out = String::new();
            write_object(ctx, &mut out, fields, 0);
            // Around the limit: 64 KiB - 32 .. 64 KiB + 32, by the low bits of `extra`.
            let target = 64 * 1024 - 32 + usize::from(*extra % 65);
            while out.len() < target {
                out.push(' ');
            }
            out.into_bytes()
        }
    };
    Wire {
        method: method.into_bytes(),
        target,
        headers,
        body,
    }
}

/// The text encoding: `>METHOD TARGET\nName: value\n\nBODY`, requests separated by `\n>`.
fn wires_of_text(text: &[u8]) -> Vec<Wire> {
    let mut wires = Vec::new();
    let mut rest = text;
    while let Some(stripped) = rest.strip_prefix(b">") {
        let end = find(stripped, b"\n>").unwrap_or(stripped.len());
        let one = &stripped[..end];
        rest = &stripped[(end + 1).min(stripped.len())..];
        let (head, body) = match find(one, b"\n\n") {
            Some(at) => (&one[..at], &one[at + 2..]),
            None => (one, &b""[..]),
        };
        let mut lines = head
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let first = lines.next().unwrap_or_default();
        let (method, target) = match find(first, b" ") {
            Some(at) => (&first[..at], &first[at + 1..]),
            None => (first, &b"/"[..]),
        };
        let headers = lines
            .filter_map(|line| {
                let at = find(line, b":")?;
                let value = &line[at + 1..];
                let value = value.strip_prefix(b" ").unwrap_or(value);
                Some((line[..at].to_vec(), value.to_vec()))
            })
            .collect();
        wires.push(Wire {
            method: method.to_vec(),
            target: target.to_vec(),
            headers,
            body: body.to_vec(),
        });
    }
    wires
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Replaces `{hold}` by the last hold's id.
fn ctx_replace(ctx: &Ctx, bytes: &[u8]) -> Vec<u8> {
    const PLACEHOLDER: &[u8] = b"{hold}";
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(at) = find(rest, PLACEHOLDER) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(ctx.hold(&HoldRef::Last).as_bytes());
        rest = &rest[at + PLACEHOLDER.len()..];
    }
    out.extend_from_slice(rest);
    out
}

// ---------------------------------------------------------------------------------------
// Sending and checking.

fn build(wire: &Wire) -> Option<Request<Body>> {
    let method = Method::from_bytes(&wire.method).ok()?;
    let uri = Uri::try_from(wire.target.as_slice()).ok()?;
    let mut builder = Request::builder().method(method.clone()).uri(uri);
    for (name, value) in &wire.headers {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        builder = builder.header(name, value);
    }
    let mut body = wire.body.clone();
    body.truncate(BODY_BYTES_MAX);
    builder.body(Body::from(body)).ok()
}

fn send(ctx: &mut Ctx, wire: &Wire) {
    let Some(request) = build(wire) else {
        return;
    };
    let world = ctx.world;
    let method = request.method().clone();
    let description = format!("{} {}", method, request.uri());
    let before = world.engine.stats();
    let (status, content_type, body) = world.runtime.block_on(async {
        let response = world
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a response body reads");
        (status, content_type, body)
    });
    let after = world.engine.stats();
    let wrote = (after.wal_records, after.durable_lsn) != (before.wal_records, before.durable_lsn);
    // Only errors must be parsed; successes are parsed for hold ids, unless large (the
    // OpenAPI document, long lists): parsing 100 KB under the sanitizer costs ~20 ms.
    let parse = !status.is_success() || body.len() <= 16 * 1024;
    let json: Option<serde_json::Value> =
        parse.then(|| serde_json::from_slice(&body).ok()).flatten();
    let code = json
        .as_ref()
        .and_then(|j| j.get("code"))
        .and_then(|c| c.as_str())
        .map(str::to_string);
    let show = || {
        format!(
            "{description} -> {status} {:?} {}",
            content_type,
            String::from_utf8_lossy(&body[..body.len().min(400)])
        )
    };
    if trace() {
        eprintln!("{}", show());
    }
    if status.is_server_error() {
        assert!(
            status == StatusCode::SERVICE_UNAVAILABLE
                && matches!(
                    code.as_deref(),
                    Some("storage_failure" | "overloaded" | "not_ready")
                ),
            "a 5xx: {}",
            show()
        );
    }
    if (status.is_client_error() || status.is_server_error()) && method != Method::HEAD {
        assert_eq!(
            content_type.as_ref().map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..]),
            "an error that is not problem+json: {}",
            show()
        );
        let json = json.as_ref().expect("an error body is JSON");
        assert_eq!(
            json.get("status").and_then(|s| s.as_u64()),
            Some(u64::from(status.as_u16())),
            "problem status: {}",
            show()
        );
        assert!(code.is_some(), "problem without code: {}", show());
    }
    // A transfer the destination refused after the debit is answered with the refusal, and
    // its debit and refund are written: the one 4xx that moves money out and back.
    let refunded = status == StatusCode::CONFLICT
        && code.as_deref() == Some("balance_limit_exceeded")
        && description.contains("/v1/transfers");
    if status.is_client_error() && !refunded {
        assert!(!wrote, "a 4xx wrote to the WAL: {}", show());
    }
    if method == Method::GET || method == Method::HEAD {
        assert!(!wrote, "a read wrote to the WAL: {}", show());
    }
    if status.is_success() {
        assert_eq!(
            after.durable_lsn,
            after.wal_records,
            "answered before durable: {}",
            show()
        );
    }
    if let Some(json) = &json {
        remember_holds(ctx, json);
    }
}

/// `COFFER_FUZZ_TRACE=1` prints every request and its answer (to read a reproduction).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("COFFER_FUZZ_TRACE").is_some())
}

/// Remembers the id of the last hold a response shows (single or batched).
fn remember_holds(ctx: &mut Ctx, json: &serde_json::Value) {
    for pointer in ["/hold/id", "/transfer/id"] {
        if let Some(id) = json.pointer(pointer).and_then(|v| v.as_str()) {
            ctx.last_hold = Some(id.to_string());
        }
    }
    if let Some(results) = json.get("results").and_then(|r| r.as_array()) {
        for result in results {
            if let Some(id) = result.pointer("/body/hold/id").and_then(|v| v.as_str()) {
                ctx.last_hold = Some(id.to_string());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let mut ctx = Ctx {
        world,
        last_hold: None,
    };
    if data.first() == Some(&b'>') {
        let wires = wires_of_text(data);
        for wire in wires.iter().take(REQUESTS_MAX) {
            // Placeholders are resolved per request, after the ones before it ran.
            let wire = Wire {
                method: wire.method.clone(),
                target: ctx_replace(&ctx, &wire.target),
                headers: wire
                    .headers
                    .iter()
                    .map(|(name, value)| (name.clone(), ctx_replace(&ctx, value)))
                    .collect(),
                body: ctx_replace(&ctx, &wire.body),
            };
            send(&mut ctx, &wire);
        }
        return;
    }
    let u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary_take_rest(u) else {
        return;
    };
    for req in input.requests.iter().take(REQUESTS_MAX) {
        let wire = wire_of(&ctx, req);
        send(&mut ctx, &wire);
    }
});
