//! `coffer load`: an HTTP load generator for a running coffer, with keep-alive connections
//! (one hyper HTTP/1.1 connection per worker, so the generator itself stays cheap on a
//! 2-core machine), closed- or open-loop, latency histograms and a final check that every
//! balance equals what the acknowledged operations imply.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

/// Balance given to each load account when it is created.
const LOAD_ACCOUNT_BALANCE: u64 = 1_000_000_000_000;

/// What the load consists of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Debits of 1 on accounts chosen uniformly.
    Uniform,
    /// Debits of 1, all on one account.
    Hot,
    /// Hold 2 then capture 1 (partial capture), on uniform accounts. One flow = 2 requests.
    HoldCapture,
    /// Hold 1 then release, on uniform accounts. One flow = 2 requests.
    HoldRelease,
    /// 40% debits, 30% credits, 20% hold+capture, 10% hold+release.
    Mixed,
    /// Transfers of 1 (`POST /v1/transfers`) between random pairs of distinct accounts.
    /// Every account starts with a balance no run can spend, so a refusal is a finding.
    Transfer,
    /// Transfers of 1 from a random account to one hot destination (account 0).
    TransferHot,
}

impl Workload {
    fn is_transfer(self) -> bool {
        matches!(self, Workload::Transfer | Workload::TransferHot)
    }
}

/// Flags of `coffer load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Address of the server.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: SocketAddr,
    /// What to send.
    #[arg(long, value_enum, default_value = "uniform")]
    pub workload: Workload,
    /// Number of accounts (created with a large balance if missing).
    #[arg(long, default_value_t = 1000)]
    pub accounts: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: u64,
    /// How long to send (e.g. 20s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Open loop: flows per second over all connections (default: closed loop, as fast as answers come).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Send debits in batches of this many operations per request (`POST /v1/batch`);
    /// 1 sends single requests. Applies to the uniform and hot workloads.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Prefix of the load accounts' ids.
    #[arg(long, default_value = "load")]
    pub prefix: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Bearer token sent with every request (for a server with authentication).
    #[arg(long, env = "COFFER_LOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Speak HTTPS, trusting the CA certificate(s) in this PEM file.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Server name to check the certificate against with --tls-ca (default: the target IP).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Event-stream consumers that long-poll `GET /v1/events` from the end of the log while
    /// the load runs (each on its own connection); the report gives the events they got.
    #[arg(long, default_value_t = 0)]
    pub consumers: u64,
    /// The TLS client configuration built from --tls-ca (by `run`).
    #[arg(skip)]
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl LoadArgs {
    /// Builds the TLS client configuration from `--tls-ca`, once.
    fn prepare_tls(&mut self) -> Result<(), LoadError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let (Some(ca), None) = (&self.tls_ca, &self.tls) else {
            return Ok(());
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| err("--tls-ca", e))?;
        for cert in certs {
            let cert = cert.map_err(|e| err("--tls-ca", e))?;
            roots.add(cert).map_err(|e| err("--tls-ca", e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err("tls", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        self.tls = Some(Arc::new(config));
        Ok(())
    }
}

/// The result of a run.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    /// The workload.
    pub workload: Workload,
    /// Connections.
    pub connections: u64,
    /// Accounts.
    pub accounts: u64,
    /// Seconds of load.
    pub seconds: f64,
    /// Operations per request (1 without `--batch`).
    pub batch: usize,
    /// Completed flows (one operation, or two for hold flows).
    pub flows: u64,
    /// Flows per second.
    pub flows_per_sec: f64,
    /// HTTP requests per second.
    pub requests_per_sec: f64,
    /// Request latency percentiles in milliseconds.
    pub latency_ms: Percentiles,
    /// Failed requests by error code (or transport error).
    pub errors: HashMap<String, u64>,
    /// Accounts whose balance did not match the acknowledged operations.
    pub mismatched_accounts: u64,
    /// Accounts checked.
    pub verified_accounts: u64,
    /// Event-stream consumers that ran (`--consumers`).
    pub consumers: u64,
    /// Events they received during the load, all together.
    pub events_delivered: u64,
    /// Events per second received by one consumer (the mean over the consumers).
    pub events_per_sec_per_consumer: f64,
}

/// Latency percentiles (ms).
#[derive(Debug, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

/// A load failure (setup could not reach the server, etc.).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(String);

fn err(context: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError(format!("{context}: {e}"))
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    authorization: Option<hyper::header::HeaderValue>,
}

impl Conn {
    async fn open(args: &LoadArgs) -> Result<Conn, LoadError> {
        let addr = args.target;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| err("connect", e))?;
        stream.set_nodelay(true).map_err(|e| err("nodelay", e))?;
        let sender = match &args.tls {
            None => handshake(stream).await?,
            Some(config) => {
                let name = match &args.tls_server_name {
                    Some(name) => rustls_pki_types::ServerName::try_from(name.clone())
                        .map_err(|e| err("--tls-server-name", e))?,
                    None => rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
                };
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| err("TLS handshake", e))?;
                handshake(tls).await?
            }
        };
        let authorization = match &args.token {
            Some(token) => Some(
                hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|e| err("--token", e))?,
            ),
            None => None,
        };
        Ok(Conn {
            sender,
            host: addr.to_string(),
            authorization,
        })
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: String,
    ) -> Result<(u16, Bytes), LoadError> {
        self.sender
            .ready()
            .await
            .map_err(|e| err("connection", e))?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| err("request", e))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| err("send", e))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| err("body", e))?
            .to_bytes();
        Ok((status, body))
    }
}

async fn handshake<I>(io: I) -> Result<SendRequest<Full<Bytes>>, LoadError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| err("handshake", e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// What one worker saw.
struct WorkerResult {
    histogram: Histogram<u64>,
    flows: u64,
    requests: u64,
    errors: HashMap<String, u64>,
    /// Expected change of balance per account index, from acknowledged operations.
    balance_delta: HashMap<u64, i64>,
    /// Keys whose outcome is unknown (transport error), with the account and balance effect
    /// if they happened.
    unknown: Vec<(u64, String, i64)>,
    /// Transfers whose outcome is unknown (transport error, 5xx, or 202 still in flight).
    unknown_transfers: Vec<UnknownTransfer>,
}

/// A transfer of 1 whose outcome the worker did not learn; the check looks its key up on
/// the source account.
struct UnknownTransfer {
    from: u64,
    to: u64,
    key: String,
}

/// Runs the load and the final balance check.
pub async fn run(mut args: LoadArgs) -> Result<LoadReport, LoadError> {
    args.prepare_tls()?;
    let accounts = if args.workload == Workload::Hot {
        1
    } else {
        args.accounts.max(1)
    };
    if args.workload.is_transfer() {
        if accounts < 2 {
            return Err(LoadError(
                "the transfer workloads need at least 2 accounts".into(),
            ));
        }
        if args.batch > 1 {
            return Err(LoadError(
                "--batch applies to debits only (POST /v1/batch has no transfers)".into(),
            ));
        }
    }
    let before = setup(&args, accounts).await?;
    let run_id = format!(
        "{:x}",
        crate::clock::Clock::now_ms(&crate::clock::SystemClock)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..args.connections.max(1) {
        let conn = Conn::open(&args).await?;
        let ctx = WorkerCtx {
            args: args.clone(),
            accounts,
            worker,
            run_id: run_id.clone(),
            stop: stop.clone(),
            done: done.clone(),
            started,
        };
        workers.push(tokio::spawn(worker_loop(ctx, conn)));
    }
    let mut consumers = Vec::new();
    if args.consumers > 0 {
        let mut conn = Conn::open(&args).await?;
        let from = durable_cursor(&mut conn).await?;
        for _ in 0..args.consumers {
            let conn = Conn::open(&args).await?;
            consumers.push(tokio::spawn(consumer_loop(
                conn,
                from.clone(),
                stop.clone(),
            )));
        }
    }
    let progress = progress_bar(&args);
    while started.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(bar) = &progress {
            let secs = started.elapsed().as_secs_f64();
            bar.set_position(started.elapsed().as_millis().min(u128::from(u64::MAX)) as u64);
            bar.set_message(format!(
                "{:.0} flows/s",
                done.load(Ordering::Relaxed) as f64 / secs.max(0.001)
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for handle in workers {
        results.push(handle.await.map_err(|e| err("worker", e))?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut events_delivered = 0;
    for handle in consumers {
        events_delivered += handle.await.map_err(|e| err("consumer", e))??;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let mut histogram = Histogram::<u64>::new(3).map_err(|e| err("histogram", e))?;
    let (mut flows, mut requests) = (0, 0);
    let mut errors: HashMap<String, u64> = HashMap::new();
    let mut delta: HashMap<u64, i64> = HashMap::new();
    let mut unknown = Vec::new();
    let mut unknown_transfers = Vec::new();
    for r in results {
        histogram
            .add(&r.histogram)
            .map_err(|e| err("histogram", e))?;
        flows += r.flows;
        requests += r.requests;
        for (code, n) in r.errors {
            *errors.entry(code).or_default() += n;
        }
        for (account, d) in r.balance_delta {
            *delta.entry(account).or_default() += d;
        }
        unknown.extend(r.unknown);
        unknown_transfers.extend(r.unknown_transfers);
    }
    let (verified, mismatched) =
        verify(&args, &before, &delta, &unknown, &unknown_transfers).await?;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(LoadReport {
        workload: args.workload,
        connections: args.connections,
        accounts,
        batch: args.batch.max(1),
        seconds,
        flows,
        flows_per_sec: flows as f64 / seconds,
        requests_per_sec: requests as f64 / seconds,
        latency_ms: Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        },
        errors,
        mismatched_accounts: mismatched,
        verified_accounts: verified,
        consumers: args.consumers,
        events_delivered,
        events_per_sec_per_consumer: if args.consumers == 0 {
            0.0
        } else {
            events_delivered as f64 / args.consumers as f64 / seconds
        },
    })
}

/// The cursor of the durable end of the log now, from `/metrics` (the load tool knows that a
/// cursor is `e` and the LSN in 16 hex digits; clients should treat cursors as opaque).
async fn durable_cursor(conn: &mut Conn) -> Result<String, LoadError> {
    let (status, body) = conn
        .call(Method::GET, "/metrics", None, String::new())
        .await?;
    let text = String::from_utf8_lossy(&body);
    let lsn = text
        .lines()
        .find_map(|l| l.strip_prefix("coffer_wal_durable_lsn "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| LoadError(format!("GET /metrics: {status}: no coffer_wal_durable_lsn")))?;
    Ok(format!("e{lsn:016x}"))
}

/// One consumer: long polls from `from` until the load stops; returns the events received.
async fn consumer_loop(
    mut conn: Conn,
    from: String,
    stop: Arc<AtomicBool>,
) -> Result<u64, LoadError> {
    #[derive(serde::Deserialize)]
    struct Page {
        events: Vec<serde::de::IgnoredAny>,
        next: String,
    }
    let mut after = from;
    let mut received = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let path = format!("/v1/events?after={after}&limit=1000&wait_ms=200");
        let (status, body) = conn.call(Method::GET, &path, None, String::new()).await?;
        if status != 200 {
            return Err(LoadError(format!("GET /v1/events: {status}")));
        }
        let page: Page = serde_json::from_slice(&body).map_err(|e| err("events page", e))?;
        received += page.events.len() as u64;
        after = page.next;
    }
    Ok(received)
}

impl LoadReport {
    /// A human summary.
    pub fn text(&self) -> String {
        let mut errors: Vec<_> = self.errors.iter().collect();
        errors.sort();
        format!(
            "workload {:?}, {} connections, {} accounts, batch {}, {:.1}s\n\
             flows: {} ({:.0}/s), requests {:.0}/s\n\
             latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}\n\
             errors: {:?}\n\
             verified {} accounts: {} mismatched\n\
             event consumers: {}, {} events delivered ({:.0}/s per consumer)",
            self.workload,
            self.connections,
            self.accounts,
            self.batch,
            self.seconds,
            self.flows,
            self.flows_per_sec,
            self.requests_per_sec,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.p999,
            self.latency_ms.max,
            errors,
            self.verified_accounts,
            self.mismatched_accounts,
            self.consumers,
            self.events_delivered,
            self.events_per_sec_per_consumer
        )
    }
}

fn progress_bar(args: &LoadArgs) -> Option<indicatif::ProgressBar> {
    if args.quiet || args.json {
        return None;
    }
    let bar =
        indicatif::ProgressBar::new(args.duration.as_millis().min(u128::from(u64::MAX)) as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {msg}")
    {
        bar.set_style(style);
    }
    Some(bar)
}

fn account_path(prefix: &str, index: u64) -> String {
    format!("/v1/accounts/{prefix}-{index}")
}

/// Creates missing accounts (crediting them) and returns each account's balance before.
async fn setup(args: &LoadArgs, accounts: u64) -> Result<Vec<i64>, LoadError> {
    let parallel = args.connections.clamp(1, 32);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let next = next.clone();
        let prefix = args.prefix.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&args).await?;
            let mut found = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= accounts {
                    return Ok::<_, LoadError>(found);
                }
                let path = account_path(&prefix, i);
                let (status, body) = conn
                    .call(
                        Method::PUT,
                        &path,
                        None,
                        r#"{"currency":"LOAD"}"#.to_string(),
                    )
                    .await?;
                let balance = match status {
                    201 => {
                        let key = format!("load-setup-{i}");
                        let body = format!(r#"{{"amount":{LOAD_ACCOUNT_BALANCE}}}"#);
                        let (status, body) = conn
                            .call(Method::POST, &format!("{path}/credits"), Some(&key), body)
                            .await?;
                        if status != 201 {
                            return Err(LoadError(format!("setup credit {path}: {status}")));
                        }
                        json_i64(&body, &["account", "balance"])
                    }
                    200 => json_i64(&body, &["balance"]),
                    _ => {
                        return Err(LoadError(format!(
                            "setup {path}: {status} {}",
                            String::from_utf8_lossy(&body)
                        )))
                    }
                };
                found.push((
                    i,
                    balance.ok_or_else(|| LoadError("setup: no balance".into()))?,
                ));
            }
        }));
    }
    let mut before = vec![0i64; usize::try_from(accounts).map_err(|e| err("accounts", e))?];
    for task in tasks {
        for (i, balance) in task.await.map_err(|e| err("setup", e))?? {
            before[i as usize] = balance;
        }
    }
    Ok(before)
}

fn json_i64(body: &[u8], path: &[&str]) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut v = &value;
    for p in path {
        v = v.get(p)?;
    }
    v.as_i64()
}

fn json_str(body: &[u8], path: &[&str]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut v = &value;
    for p in path {
        v = v.get(p)?;
    }
    v.as_str().map(str::to_string)
}

struct WorkerCtx {
    args: LoadArgs,
    accounts: u64,
    worker: u64,
    run_id: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    started: Instant,
}

/// A small, fast, seedable random generator (xorshift64*): the load needs spread, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

async fn worker_loop(ctx: WorkerCtx, mut conn: Conn) -> WorkerResult {
    let mut result = WorkerResult {
        histogram: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .expect("static histogram bounds are valid"),
        flows: 0,
        requests: 0,
        errors: HashMap::new(),
        balance_delta: HashMap::new(),
        unknown: Vec::new(),
        unknown_transfers: Vec::new(),
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (ctx.worker + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let interval = ctx.args.rate.map(|rate| {
        Duration::from_secs_f64(ctx.args.connections.max(1) as f64 / rate.max(1) as f64)
    });
    let mut counter = 0u64;
    let mut flow_index = 0u64;
    while !ctx.stop.load(Ordering::Relaxed) {
        // Open loop: latency counts from the intended start, so a slow server cannot hide
        // its queueing (no coordinated omission).
        let intended = match interval {
            Some(every) => {
                let at = ctx.started + every.mul_f64(flow_index as f64);
                flow_index += 1;
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        let account = match ctx.args.workload {
            Workload::Hot => 0,
            // The source; the destination is drawn below.
            Workload::TransferHot => 1 + rng.below(ctx.accounts - 1),
            _ => rng.below(ctx.accounts),
        };
        let path = account_path(&ctx.args.prefix, account);
        let kind = match ctx.args.workload {
            Workload::Uniform | Workload::Hot => 0,
            Workload::HoldCapture => 2,
            Workload::HoldRelease => 3,
            Workload::Transfer | Workload::TransferHot => 4,
            Workload::Mixed => match rng.below(10) {
                0..=3 => 0,
                4..=6 => 1,
                7 | 8 => 2,
                _ => 3,
            },
        };
        let mut key = || {
            counter += 1;
            format!("{}-{}-{}", ctx.run_id, ctx.worker, counter)
        };
        if ctx.args.batch > 1 && kind == 0 {
            let ops: Vec<(u64, String)> = (0..ctx.args.batch)
                .map(|_| {
                    let account = match ctx.args.workload {
                        Workload::Hot => 0,
                        _ => rng.below(ctx.accounts),
                    };
                    (account, key())
                })
                .collect();
            let ok = debit_batch(&mut conn, &mut result, &ctx.args.prefix, &ops, intended).await;
            result.flows += ok;
            ctx.done.fetch_add(ok, Ordering::Relaxed);
            if conn.sender.is_closed() {
                match Conn::open(&ctx.args).await {
                    Ok(c) => conn = c,
                    Err(_) => break,
                }
            }
            continue;
        }
        let ok = match kind {
            0 => {
                move_money(
                    &mut conn,
                    &mut result,
                    &path,
                    account,
                    "debits",
                    -1,
                    key(),
                    intended,
                )
                .await
            }
            1 => {
                move_money(
                    &mut conn,
                    &mut result,
                    &path,
                    account,
                    "credits",
                    1,
                    key(),
                    intended,
                )
                .await
            }
            4 => {
                let to = match ctx.args.workload {
                    Workload::TransferHot => 0,
                    // Uniform over the other accounts: draw among n - 1 and skip the source.
                    _ => {
                        let to = rng.below(ctx.accounts - 1);
                        if to >= account {
                            to + 1
                        } else {
                            to
                        }
                    }
                };
                transfer(
                    &mut conn,
                    &mut result,
                    &ctx.args.prefix,
                    account,
                    to,
                    key(),
                    intended,
                )
                .await
            }
            _ => {
                let capture = kind == 2;
                let (k1, k2) = (key(), key());
                hold_flow(
                    &mut conn,
                    &mut result,
                    &path,
                    account,
                    capture,
                    k1,
                    k2,
                    intended,
                )
                .await
            }
        };
        if ok {
            result.flows += 1;
            ctx.done.fetch_add(1, Ordering::Relaxed);
        }
        if conn.sender.is_closed() {
            match Conn::open(&ctx.args).await {
                Ok(c) => conn = c,
                Err(_) => break,
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn move_money(
    conn: &mut Conn,
    result: &mut WorkerResult,
    path: &str,
    account: u64,
    endpoint: &str,
    sign: i64,
    key: String,
    started: Instant,
) -> bool {
    let outcome = conn
        .call(
            Method::POST,
            &format!("{path}/{endpoint}"),
            Some(&key),
            r#"{"amount":1}"#.into(),
        )
        .await;
    record(result, started, &outcome);
    match outcome {
        Ok((201, _)) => {
            *result.balance_delta.entry(account).or_default() += sign;
            true
        }
        Ok((status, _)) if status >= 500 => {
            result.unknown.push((account, key, sign));
            false
        }
        Ok(_) => false,
        Err(_) => {
            result.unknown.push((account, key, sign));
            false
        }
    }
}

/// Sends one transfer of 1 from `from` to `to`; true when it completed (201).
async fn transfer(
    conn: &mut Conn,
    result: &mut WorkerResult,
    prefix: &str,
    from: u64,
    to: u64,
    key: String,
    started: Instant,
) -> bool {
    let body = format!(r#"{{"from":"{prefix}-{from}","to":"{prefix}-{to}","amount":1}}"#);
    let outcome = conn
        .call(Method::POST, "/v1/transfers", Some(&key), body)
        .await;
    record(result, started, &outcome);
    match outcome {
        Ok((201, _)) => {
            *result.balance_delta.entry(from).or_default() -= 1;
            *result.balance_delta.entry(to).or_default() += 1;
            true
        }
        // 202: accepted but its credit is still in flight (the server finishes it); the
        // check looks it up like an unanswered one.
        Ok((status, _)) if status == 202 || status >= 500 => {
            if status == 202 {
                *result
                    .errors
                    .entry("transfer_in_flight".to_string())
                    .or_default() += 1;
            }
            result
                .unknown_transfers
                .push(UnknownTransfer { from, to, key });
            false
        }
        // A refusal (409 insufficient_funds, ...) moved nothing; `record` counted its code.
        Ok(_) => false,
        Err(_) => {
            result
                .unknown_transfers
                .push(UnknownTransfer { from, to, key });
            false
        }
    }
}

/// Sends one batch of debits of 1; returns how many were acknowledged.
async fn debit_batch(
    conn: &mut Conn,
    result: &mut WorkerResult,
    prefix: &str,
    ops: &[(u64, String)],
    started: Instant,
) -> u64 {
    let mut body = String::with_capacity(ops.len() * 96 + 32);
    body.push_str(r#"{"operations":["#);
    for (i, (account, key)) in ops.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#"{{"op":"debit","account":"{prefix}-{account}","amount":1,"idempotency_key":"{key}"}}"#
        ));
    }
    body.push_str("]}");
    let outcome = conn.call(Method::POST, "/v1/batch", None, body).await;
    record(result, started, &outcome);
    #[derive(serde::Deserialize)]
    struct Item {
        status: u16,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        results: Vec<Item>,
    }
    let parsed = match &outcome {
        Ok((200, bytes)) => serde_json::from_slice::<Answer>(bytes).ok(),
        _ => None,
    };
    let Some(answer) = parsed.filter(|a| a.results.len() == ops.len()) else {
        for (account, key) in ops {
            result.unknown.push((*account, key.clone(), -1));
        }
        return 0;
    };
    let mut ok = 0;
    for ((account, key), item) in ops.iter().zip(answer.results) {
        match item.status {
            201 => {
                *result.balance_delta.entry(*account).or_default() -= 1;
                ok += 1;
            }
            status if status >= 500 => result.unknown.push((*account, key.clone(), -1)),
            status => {
                *result
                    .errors
                    .entry(format!("op_http_{status}"))
                    .or_default() += 1;
            }
        }
    }
    ok
}

#[allow(clippy::too_many_arguments)]
async fn hold_flow(
    conn: &mut Conn,
    result: &mut WorkerResult,
    path: &str,
    account: u64,
    capture: bool,
    hold_key: String,
    end_key: String,
    started: Instant,
) -> bool {
    let amount = if capture { 2 } else { 1 };
    let outcome = conn
        .call(
            Method::POST,
            &format!("{path}/holds"),
            Some(&hold_key),
            format!(r#"{{"amount":{amount}}}"#),
        )
        .await;
    record(result, started, &outcome);
    let hold_id = match &outcome {
        Ok((201, body)) => json_str(body, &["hold", "id"]),
        _ => None,
    };
    let Some(hold_id) = hold_id else {
        // An unanswered hold that did happen is left open; it only affects `held`,
        // which the check ignores, and expires by itself.
        return false;
    };
    let second = Instant::now();
    let (endpoint, body, delta) = if capture {
        ("capture", r#"{"amount":1}"#, -1)
    } else {
        ("release", "{}", 0)
    };
    let outcome = conn
        .call(
            Method::POST,
            &format!("{path}/holds/{hold_id}/{endpoint}"),
            Some(&end_key),
            body.to_string(),
        )
        .await;
    record(result, second, &outcome);
    match outcome {
        Ok((200, _)) => {
            *result.balance_delta.entry(account).or_default() += delta;
            true
        }
        Ok((status, _)) if status < 500 => false,
        _ => {
            result.unknown.push((account, end_key, delta));
            false
        }
    }
}

fn record(result: &mut WorkerResult, started: Instant, outcome: &Result<(u16, Bytes), LoadError>) {
    result.requests += 1;
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let _ = result.histogram.record(micros.max(1));
    let code = match outcome {
        Ok((status, _)) if (200..300).contains(status) => return,
        Ok((status, body)) => json_str(body, &["code"]).unwrap_or_else(|| format!("http_{status}")),
        Err(_) => "transport".to_string(),
    };
    *result.errors.entry(code).or_default() += 1;
}

/// Checks each touched account's balance against `before + acknowledged deltas`, counting
/// unknown outcomes that the idempotency lookup says did happen.
async fn verify(
    args: &LoadArgs,
    before: &[i64],
    delta: &HashMap<u64, i64>,
    unknown: &[(u64, String, i64)],
    unknown_transfers: &[UnknownTransfer],
) -> Result<(u64, u64), LoadError> {
    let mut conn = Conn::open(args).await?;
    let mut expected: HashMap<u64, i64> = HashMap::new();
    for (&account, &d) in delta {
        expected.insert(account, before[account as usize] + d);
    }
    for (account, key, d) in unknown {
        let path = format!(
            "{}/idempotency-keys/{key}",
            account_path(&args.prefix, *account)
        );
        let (status, _) = conn.call(Method::GET, &path, None, String::new()).await?;
        let entry = expected
            .entry(*account)
            .or_insert(before[*account as usize]);
        if status == 200 {
            *entry += d;
        }
    }
    for t in unknown_transfers {
        // A transfer's key belongs to its source; the stored answer's status says whether
        // it completed (201), is still crediting the destination (202) or was refunded.
        let path = format!(
            "{}/idempotency-keys/{}",
            account_path(&args.prefix, t.from),
            t.key
        );
        let (status, body) = conn.call(Method::GET, &path, None, String::new()).await?;
        let stored = if status == 200 {
            json_i64(&body, &["status"])
        } else {
            None
        };
        let (from_delta, to_delta) = match stored {
            Some(201) => (-1, 1),
            Some(202) => (-1, 0),
            _ => (0, 0),
        };
        *expected.entry(t.from).or_insert(before[t.from as usize]) += from_delta;
        *expected.entry(t.to).or_insert(before[t.to as usize]) += to_delta;
    }
    let mut mismatched = 0;
    for (&account, &want) in &expected {
        let (status, body) = conn
            .call(
                Method::GET,
                &account_path(&args.prefix, account),
                None,
                String::new(),
            )
            .await?;
        let got = json_i64(&body, &["balance"]);
        if status != 200 || got != Some(want) {
            mismatched += 1;
            if mismatched <= 5 {
                eprintln!("account {account}: balance {got:?}, expected {want}");
            }
        }
    }
    Ok((expected.len() as u64, mismatched))
}
