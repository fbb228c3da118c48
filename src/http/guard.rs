//! What stands in front of every route: the request id, bearer-token authentication, the
//! per-client rate limit and the request timeout. They run in that order, so a 401 comes
//! before every other error (the API's order: 401, then 413, then 400 ...), and every answer,
//! a 401 included, carries `X-Request-Id`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tracing::Instrument;

use super::ApiError;

/// The request id header, taken from the request when sane, else generated (UUID v7).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// A request id from the client is kept if it has at most this many visible ASCII bytes.
pub const REQUEST_ID_BYTES_MAX: usize = 200;
/// Rate-limit buckets kept before idle ones are dropped (bounds memory when keyed by IP).
pub const RATE_BUCKETS_MAX: usize = 100_000;

/// The SHA-256 digest of a bearer token.
pub type TokenDigest = [u8; 32];

/// The configured bearer tokens, kept only as SHA-256 digests.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    digests: Vec<TokenDigest>,
}

impl Tokens {
    /// Tokens from their digests.
    pub fn from_digests(digests: Vec<TokenDigest>) -> Tokens {
        Tokens { digests }
    }

    /// Whether no token is configured (authentication off).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The digest of `token` if it is one of the configured tokens. Constant time in the
    /// token: the presented token is hashed, and its digest is compared with every configured
    /// digest without stopping at a match.
    pub fn check(&self, token: &str) -> Option<TokenDigest> {
        let digest = digest(token);
        let mut found = Choice::from(0);
        for configured in &self.digests {
            found |= configured.ct_eq(&digest);
        }
        bool::from(found).then_some(digest)
    }
}

/// Why a tokens file or list is refused.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct TokensError {
    /// The 1-based line (or list item).
    pub line: usize,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Tokens {
    /// Adds the tokens of a tokens file: one per line, blank lines and `#` comments
    /// ignored, `sha256:<64 hex>` a stored SHA-256 hash of the token.
    pub fn add_file(&mut self, text: &str) -> Result<(), TokensError> {
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |reason| TokensError {
                line: index + 1,
                reason,
            };
            match line.strip_prefix("sha256:") {
                Some(hex) => {
                    self.digests.push(parse_hex_digest(hex).ok_or_else(|| {
                        error("a sha256: line needs exactly 64 hexadecimal digits")
                    })?)
                }
                None if line.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                    return Err(error("a token must not contain whitespace"))
                }
                None => self.digests.push(digest(line)),
            }
        }
        Ok(())
    }

    /// Adds comma-separated tokens (as in `COFFER_AUTH_TOKENS`); an empty item is an error.
    pub fn add_list(&mut self, list: &str) -> Result<(), TokensError> {
        for (index, token) in list.split(',').enumerate() {
            let token = token.trim();
            if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(TokensError {
                    line: index + 1,
                    reason: "an empty token or one with whitespace in the list",
                });
            }
            self.digests.push(digest(token));
        }
        Ok(())
    }
}

fn parse_hex_digest(hex: &str) -> Option<TokenDigest> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// SHA-256 of a token.
pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Rate limit: `per_second` requests a second per client, with bursts of `burst`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests allowed at once after an idle period.
    pub burst: u32,
}

/// The guards' configuration.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// Bearer tokens; empty: no authentication.
    pub tokens: Tokens,
    /// Per-client rate limit (by token, or by client IP without tokens).
    pub rate_limit: Option<RateLimit>,
    /// Time a request may take before 503 `overloaded`.
    pub request_timeout: Duration,
}

impl Default for GuardConfig {
    fn default() -> GuardConfig {
        GuardConfig {
            tokens: Tokens::default(),
            rate_limit: None,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The guards' shared state.
#[derive(Clone)]
pub(crate) struct Guard {
    config: Arc<GuardConfig>,
    buckets: Arc<Mutex<HashMap<RateKey, Instant>>>,
}

/// Who a rate limit counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RateKey {
    Token(TokenDigest),
    Ip(IpAddr),
}

impl Guard {
    pub(crate) fn new(config: GuardConfig) -> Guard {
        Guard {
            config: Arc::new(config),
            buckets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// GCRA: each key keeps its theoretical arrival time `tat`; a request is allowed while
    /// `tat` is at most `burst - 1` intervals ahead of now, and moves `tat` one interval on.
    /// Returns the wait before the next allowed request when refused.
    fn admit(&self, limit: RateLimit, key: RateKey, now: Instant) -> Result<(), Duration> {
        let interval = Duration::from_secs(1) / limit.per_second.max(1);
        let tolerance = interval * limit.burst.max(1).saturating_sub(1);
        let mut buckets = self.buckets.lock();
        if buckets.len() >= RATE_BUCKETS_MAX && !buckets.contains_key(&key) {
            // Keys whose tat passed are back to a full burst: forgetting them changes nothing.
            buckets.retain(|_, tat| *tat > now);
            if buckets.len() >= RATE_BUCKETS_MAX {
                return Err(interval);
            }
        }
        let tat = buckets.entry(key).or_insert(now);
        let start = (*tat).max(now);
        let ahead = start.duration_since(now);
        if ahead > tolerance {
            return Err(ahead - tolerance);
        }
        *tat = start + interval;
        Ok(())
    }
}

/// Outermost: names the request (from `X-Request-Id` or a new UUID v7), runs it in a span
/// carrying the id, method and path, and returns the id on the answer.
pub(crate) async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| sane_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
                .expect("a UUID is visible ASCII")
        });
    request.headers_mut().insert(REQUEST_ID, id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %String::from_utf8_lossy(id.as_bytes()),
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "answered"
        )
    });
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

fn sane_request_id(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len() <= REQUEST_ID_BYTES_MAX
        && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// When the request timeout will cut the request short: a long poll answers before it.
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub std::time::Instant);

/// Authentication (when tokens are configured; `/healthz` and `/readyz` stay open), then
/// the rate limit, then the request timeout.
pub(crate) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(request).await;
    }
    let key = if guard.config.tokens.is_empty() {
        let peer = request.extensions().get::<ConnectInfo<SocketAddr>>();
        peer.map(|ConnectInfo(addr)| RateKey::Ip(addr.ip()))
    } else {
        match bearer(&request).and_then(|token| guard.config.tokens.check(token)) {
            Some(digest) => Some(RateKey::Token(digest)),
            None => {
                super::conn::discard_body(request).await;
                return unauthorized();
            }
        }
    };
    if let (Some(limit), Some(key)) = (guard.config.rate_limit, key) {
        if let Err(wait) = guard.admit(limit, key, Instant::now()) {
            super::conn::discard_body(request).await;
            return ApiError::rate_limited(retry_after_secs(wait)).into_response();
        }
    }
    let timeout = guard.config.request_timeout;
    let mut request = request;
    request
        .extensions_mut()
        .insert(RequestDeadline(std::time::Instant::now() + timeout));
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "request timed out"
            );
            ApiError::timed_out(timeout).into_response()
        }
    }
}

/// The token of `Authorization: Bearer TOKEN` (the scheme is case-insensitive).
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized() -> Response {
    let mut response = ApiError::unauthorized().into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"coffer\""),
    );
    response
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
fn retry_after_secs(wait: Duration) -> u32 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_configured_ones() {
        let tokens = Tokens::from_digests(vec![digest("alpha"), digest("beta")]);
        assert!(tokens.check("alpha").is_some());
        assert!(tokens.check("beta").is_some());
        assert!(tokens.check("gamma").is_none());
        assert!(tokens.check("").is_none());
    }

    #[test]
    fn tokens_file_takes_plain_and_hashed_tokens_and_refuses_bad_lines() {
        let hashed: String = digest("secret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut tokens = Tokens::default();
        let file = format!("# ops\n\nplain-token\n  sha256:{hashed}  \n");
        tokens.add_file(&file).expect("a good file");
        assert!(tokens.check("plain-token").is_some());
        assert!(tokens.check("secret").is_some());
        assert!(tokens.check(&format!("sha256:{hashed}")).is_none());
        let bad = Tokens::default()
            .add_file("ok\nsha256:abc\n")
            .expect_err("short hash");
        assert_eq!(bad.line, 2);
        assert!(Tokens::default().add_file("sha256:").is_err());
        assert!(Tokens::default()
            .add_file(&format!("sha256:{}", "g".repeat(64)))
            .is_err());
        assert!(Tokens::default().add_list("a,,b").is_err());
        assert!(Tokens::default().add_list("a, b").is_ok());
    }

    #[test]
    fn rate_limit_allows_a_burst_then_refuses_until_refilled() {
        let guard = Guard::new(GuardConfig::default());
        let limit = RateLimit {
            per_second: 10,
            burst: 3,
        };
        let key = RateKey::Token(digest("t"));
        let now = Instant::now();
        for _ in 0..3 {
            assert!(guard.admit(limit, key, now).is_ok());
        }
        let wait = guard.admit(limit, key, now).expect_err("over the burst");
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(retry_after_secs(wait), 1);
        assert!(guard.admit(limit, key, now + wait).is_ok());
        let other = RateKey::Token(digest("u"));
        assert!(guard.admit(limit, other, now).is_ok());
    }

    #[test]
    fn request_ids_must_be_short_visible_ascii() {
        assert!(sane_request_id(b"abc-123"));
        assert!(!sane_request_id(b""));
        assert!(!sane_request_id(b"has space"));
        assert!(!sane_request_id(&[b'a'; REQUEST_ID_BYTES_MAX + 1]));
        assert!(sane_request_id(&[b'a'; REQUEST_ID_BYTES_MAX]));
    }
}
