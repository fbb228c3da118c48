//! A small consumer of coffer's event stream: it posts every committed transaction to a
//! webhook URL, in commit order, retrying until the webhook accepts it, and stores its cursor
//! durably after each delivery (write a temporary file, fsync it, rename it over the old one,
//! fsync the directory). Killed at any moment, it resumes after the last event it stored: no
//! event is lost, and at most the one in flight is posted again (the webhook de-duplicates by
//! the `Idempotency-Key` header, the transaction id).
//!
//! ```text
//! cargo run --example webhook_relay -- \
//!     --coffer http://127.0.0.1:8080 --target http://127.0.0.1:9000/hook \
//!     --state ./relay.cursor [--token TOKEN] [--account ID] [--kind credit]
//! ```
//!
//! A 410 `cursor_expired` (the relay was away longer than the server's `--event-retention`)
//! stops the relay with a non-zero exit: events were lost to it, and only an operator can
//! decide what to do (reconcile, then start from the `oldest_cursor` the error names).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Longest pause between two attempts at the same delivery.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long one long poll of the stream waits for news.
const WAIT_MS: u64 = 25_000;

struct Args {
    coffer: String,
    target: String,
    state: PathBuf,
    token: Option<String>,
    filters: String,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut coffer, mut target, mut state, mut token) = (None, None, None, None);
    let mut filters = String::new();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--coffer" => coffer = Some(value),
            "--target" => target = Some(value),
            "--state" => state = Some(PathBuf::from(value)),
            "--token" => token = Some(value),
            "--account" => filters.push_str(&format!("&account={value}")),
            "--kind" => filters.push_str(&format!("&kind={value}")),
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(Args {
        coffer: coffer.context("--coffer URL is required")?,
        target: target.context("--target URL is required")?,
        state: state.context("--state FILE is required")?,
        token: token.or_else(|| std::env::var("COFFER_TOKEN").ok()),
        filters,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(WAIT_MS) + Duration::from_secs(10))
        .build()?;
    let mut after = load_cursor(&args.state)?;
    eprintln!("relaying from {} after {:?}", args.coffer, after);
    loop {
        let page = match fetch(&client, &args, after.as_deref()).await {
            Ok(page) => page,
            Err(error) => {
                eprintln!("reading the stream failed: {error:#}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for event in page["events"].as_array().into_iter().flatten() {
            deliver(&client, &args.target, event).await;
            let cursor = event["cursor"]
                .as_str()
                .context("an event without a cursor")?;
            store_cursor(&args.state, cursor)?;
            after = Some(cursor.to_string());
        }
        // With filters the server may have looked past events we did not want: remember that.
        if let Some(next) = page["next"].as_str() {
            if after.as_deref() != Some(next) {
                store_cursor(&args.state, next)?;
                after = Some(next.to_string());
            }
        }
    }
}

/// One long poll of `GET /v1/events`. A 410 ends the relay (see the module docs).
async fn fetch(client: &reqwest::Client, args: &Args, after: Option<&str>) -> Result<Value> {
    let mut url = format!(
        "{}/v1/events?limit=100&wait_ms={WAIT_MS}{}",
        args.coffer, args.filters
    );
    if let Some(after) = after {
        url.push_str(&format!("&after={after}"));
    }
    let mut request = client.get(&url);
    if let Some(token) = &args.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.as_u16() == 410 {
        eprintln!("cursor expired: {body}");
        eprintln!(
            "events were lost to this relay; reconcile, then restart it from the oldest_cursor"
        );
        std::process::exit(2);
    }
    if !status.is_success() {
        bail!("GET /v1/events: {status}: {body}");
    }
    Ok(body)
}

/// Posts one event until the webhook answers 2xx, backing off exponentially.
async fn deliver(client: &reqwest::Client, target: &str, event: &Value) {
    let id = event["transaction"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut backoff = Duration::from_millis(100);
    loop {
        let answer = client
            .post(target)
            .header("Idempotency-Key", &id)
            .json(event)
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => eprintln!("webhook answered {} for {id}; retrying", response.status()),
            Err(error) => eprintln!("webhook failed for {id}: {error}; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn load_cursor(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_string()).filter(|c| !c.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Replaces the cursor file atomically and durably: a crash leaves the old or the new one.
fn store_cursor(path: &Path, cursor: &str) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(cursor.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(())
}
