//! The command line: `coffer serve` and its flags, each also read from a `COFFER_*`
//! environment variable.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::{BoolishValueParser, RangedU64ValueParser};
use clap::{ArgAction, Args, Parser, Subcommand};

use crate::domain::Retention;
use crate::engine::{EngineConfig, ACTORS_MAX, ACTOR_MAILBOX_CAPACITY, ACTOR_MAILBOX_CAPACITY_MAX};
use crate::http::guard::TokensError;
use crate::http::{GuardConfig, RateLimit, Tokens};
use crate::server::{load_tls, ServerConfig, ServerError};

/// Bounds of `--wal-segment-bytes`: below 4 KiB a segment holds a handful of records and the
/// log becomes a directory of tiny files; above 1 GiB a segment no longer fits comfortably in
/// memory, where recovery and the offline tools read one segment at a time.
pub const WAL_SEGMENT_BYTES_RANGE: RangeInclusive<u64> = 4096..=1 << 30;
/// Bounds of `--workers`: a runtime needs one thread; past 1024 threads only contend.
pub const WORKERS_RANGE: RangeInclusive<usize> = 1..=1024;
/// Bounds of `--max-connections`: at least one, and no more than the file descriptors a
/// Linux process can have by default (`fs.nr_open`).
pub const MAX_CONNECTIONS_RANGE: RangeInclusive<usize> = 1..=1 << 20;

/// coffer: a durable, in-memory account engine for wallet and game backends.
#[derive(Debug, Parser)]
#[command(name = "coffer", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Load a running server over HTTP and check every balance afterwards.
    Load(crate::load::LoadArgs),
    /// Offline tools for the write-ahead log (the server need not run; nothing is written).
    #[command(subcommand)]
    Wal(WalCommand),
}

/// `coffer wal ...`
#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Recover as the server would (snapshot, then the log after it) with every checksum
    /// and invariant checked, then check every segment left (archived ones too with
    /// --archive); print accounts, records and the LSN ranges. Exits non-zero on any damage.
    Verify(DataDirArg),
    /// Print every record still in a segment (archived ones first with --archive) as one
    /// JSON object per line, in LSN order from the first one kept (for audits); stderr says
    /// which LSNs it covered.
    Dump(DataDirArg),
}

/// The data directory of an offline command, and the server's WAL archive.
#[derive(Debug, Clone, Args)]
pub struct DataDirArg {
    /// The server's data directory (the one given to `coffer serve --data-dir`).
    #[arg(long, env = "COFFER_DATA_DIR", default_value = "./coffer-data")]
    pub data_dir: PathBuf,
    /// The server's WAL archive (`coffer serve --wal-archive`): its segments are read
    /// before the log's, and must continue into them with no gap.
    #[arg(long, visible_alias = "wal-archive", env = "COFFER_WAL_ARCHIVE")]
    pub archive: Option<PathBuf>,
}

/// Flags of `coffer serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory of the write-ahead log (created if missing).
    #[arg(long, env = "COFFER_DATA_DIR", default_value = "./coffer-data")]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "COFFER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// How long idempotency keys, and holds that ended, are remembered at least (e.g. 24h,
    /// 90m); they are forgotten at the account's first change after that.
    #[arg(long, env = "COFFER_IDEMPOTENCY_TTL", default_value = "24h", value_parser = duration_ms)]
    pub idempotency_ttl: Duration,
    /// Transactions of each account kept in memory for `GET .../transactions` (the newest;
    /// older ones stay in the WAL, see `coffer wal dump`). At least 1.
    #[arg(long, env = "COFFER_HISTORY_LIMIT", default_value_t = crate::engine::RETENTION_DEFAULT.history, value_parser = count_in(1..=usize::MAX))]
    pub history_limit: usize,
    /// Take a snapshot after this many new WAL records (0: never by count).
    #[arg(long, env = "COFFER_SNAPSHOT_EVERY_RECORDS", default_value_t = crate::engine::SNAPSHOT_EVERY_RECORDS_DEFAULT)]
    pub snapshot_every_records: u64,
    /// Take a snapshot after this long when anything was written (e.g. 10m; 0s: never by
    /// time). With both at 0 there are no snapshots, and recovery replays the whole WAL.
    #[arg(long, env = "COFFER_SNAPSHOT_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub snapshot_interval: Duration,
    /// Move WAL segments that no kept snapshot needs into this directory (on the same file
    /// system) instead of deleting them: the complete journal, for audits.
    #[arg(long, env = "COFFER_WAL_ARCHIVE")]
    pub wal_archive: Option<PathBuf>,
    /// Keep WAL segments at least this long after the kept snapshots cover them, so that
    /// `GET /v1/events` can still serve their transactions to a consumer that fell behind
    /// (e.g. 1h, 7d; 0s: remove them at the first snapshot that covers them). A consumer
    /// whose cursor is older than what is kept gets 410 `cursor_expired`.
    #[arg(long, env = "COFFER_EVENT_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub event_retention: Duration,
    /// Size in bytes at which the WAL starts a new segment file (4096 to 1073741824).
    #[arg(long, env = "COFFER_WAL_SEGMENT_BYTES", default_value_t = crate::wal::SEGMENT_BYTES_DEFAULT, value_parser = clap::value_parser!(u64).range(WAL_SEGMENT_BYTES_RANGE))]
    pub wal_segment_bytes: u64,
    /// Capacity of each actor's mailbox (commands queued before senders wait; 1 to 1048576).
    #[arg(long, env = "COFFER_MAILBOX_CAPACITY", default_value_t = ACTOR_MAILBOX_CAPACITY, value_parser = count_in(1..=ACTOR_MAILBOX_CAPACITY_MAX))]
    pub mailbox_capacity: usize,
    /// Number of account actors, each owning the accounts whose id hashes to it
    /// (default: one per core; 1 to 1024).
    #[arg(long, env = "COFFER_ACTORS", value_parser = count_in(1..=ACTORS_MAX))]
    pub actors: Option<usize>,
    /// Tokio worker threads serving HTTP and running actors (default: one per core; 1 to
    /// 1024). The WAL writer has its own thread besides these.
    #[arg(long, env = "COFFER_WORKERS", value_parser = count_in(WORKERS_RANGE))]
    pub workers: Option<usize>,
    /// File of bearer tokens, one per line (blank lines and `#` comments ignored; a line
    /// `sha256:<64 hex>` is the SHA-256 of a token). With any token configured, every
    /// endpoint but /healthz and /readyz needs `Authorization: Bearer TOKEN`.
    #[arg(long, env = "COFFER_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// Bearer tokens, comma-separated (better given by the environment than on the command
    /// line, where other users can see it).
    #[arg(long, env = "COFFER_AUTH_TOKENS", hide_env_values = true)]
    pub auth_tokens: Option<String>,
    /// Allow listening on a non-loopback address without tokens. The environment variable
    /// takes 1/0, true/false (also yes/no, on/off).
    #[arg(long, env = "COFFER_INSECURE_NO_AUTH", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub insecure_no_auth: bool,
    /// Serve /metrics (plain HTTP, no authentication) only on this address instead of on
    /// the main listener behind authentication.
    #[arg(long, env = "COFFER_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// PEM certificate chain: serve HTTPS on the main listener (needs --tls-key).
    #[arg(long, env = "COFFER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "COFFER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Time a request may take before 503 `overloaded` with Retry-After (more than 0).
    #[arg(long, env = "COFFER_REQUEST_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub request_timeout: Duration,
    /// Time a client has to send a request's headers (and its TLS handshake) before the
    /// connection is closed (slowloris; more than 0).
    #[arg(long, env = "COFFER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,
    /// Open connections at most; more wait in the listen backlog until one closes (1 to
    /// 1048576).
    #[arg(long, env = "COFFER_MAX_CONNECTIONS", default_value_t = crate::server::CONNECTIONS_MAX_DEFAULT, value_parser = count_in(MAX_CONNECTIONS_RANGE))]
    pub max_connections: usize,
    /// Requests per second per token (per client IP without tokens); more get 429
    /// `rate_limited` with Retry-After. 0: no limit.
    #[arg(long, env = "COFFER_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit: u32,
    /// Requests a client may make at once after being idle (default: --rate-limit; at
    /// least 1).
    #[arg(long, env = "COFFER_RATE_LIMIT_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: Option<u32>,
    /// Log format: text or json.
    #[arg(long, env = "COFFER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Why the serve flags cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The tokens file could not be read.
    #[error("cannot read the tokens file {path}: {source}")]
    TokensFileRead {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The tokens file has a bad line.
    #[error("bad tokens file {path}: {source}")]
    TokensFile {
        /// The file.
        path: PathBuf,
        /// The bad line.
        source: TokensError,
    },
    /// `COFFER_AUTH_TOKENS` has a bad item.
    #[error("bad COFFER_AUTH_TOKENS / --auth-tokens: item {}: {}", .0.line, .0.reason)]
    TokensList(TokensError),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] ServerError),
}

impl ServeArgs {
    /// The server configuration these flags describe (reads the tokens file and the TLS
    /// certificate and key).
    pub fn server_config(&self) -> Result<ServerConfig, ConfigError> {
        let mut tokens = Tokens::default();
        if let Some(path) = &self.auth_tokens_file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::TokensFileRead {
                    path: path.clone(),
                    source,
                })?;
            tokens
                .add_file(&text)
                .map_err(|source| ConfigError::TokensFile {
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(list) = self.auth_tokens.as_deref().filter(|l| !l.trim().is_empty()) {
            tokens.add_list(list).map_err(ConfigError::TokensList)?;
        }
        let mut config = ServerConfig::new(&self.listen);
        config.guard = GuardConfig {
            tokens,
            // The flag's parser refuses a burst of 0, and the default is the rate, which is
            // more than 0 here.
            rate_limit: (self.rate_limit > 0).then(|| RateLimit {
                per_second: self.rate_limit,
                burst: self.rate_limit_burst.unwrap_or(self.rate_limit),
            }),
            request_timeout: self.request_timeout,
        };
        config.metrics_listen = self.metrics_listen.clone();
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls = Some(load_tls(cert, key)?);
        }
        config.header_read_timeout = self.header_read_timeout;
        config.connections_max = self.max_connections;
        config.insecure_no_auth = self.insecure_no_auth;
        Ok(config)
    }

    /// The engine configuration these flags describe.
    pub fn engine_config(&self) -> EngineConfig {
        let mut config = EngineConfig::new(self.data_dir.clone());
        config.segment_bytes_max = self.wal_segment_bytes;
        config.mailbox_capacity = self.mailbox_capacity;
        if let Some(actors) = self.actors {
            config.actors = actors;
        }
        config.clock = Arc::new(crate::clock::SystemClock);
        config.snapshot_every_records =
            (self.snapshot_every_records > 0).then_some(self.snapshot_every_records);
        config.snapshot_interval =
            (!self.snapshot_interval.is_zero()).then_some(self.snapshot_interval);
        config.wal_archive = self.wal_archive.clone();
        config.event_retention = self.event_retention;
        config.retention = Retention {
            history: self.history_limit,
            // The flag's parser refuses a TTL whose milliseconds do not fit.
            ttl_ms: u64::try_from(self.idempotency_ttl.as_millis()).unwrap_or(u64::MAX),
        };
        #[cfg(debug_assertions)]
        {
            config.test_panic_on_credit_amount = test_panic_on_credit_amount();
        }
        config
    }
}

/// A parser for a count flag: a value outside `bounds` is refused with a message naming the
/// flag, never raised or lowered into them.
fn count_in(bounds: RangeInclusive<usize>) -> RangedU64ValueParser<usize> {
    // usize is 64 bits wide on every target coffer builds for, so these never saturate.
    let low = u64::try_from(*bounds.start()).unwrap_or(u64::MAX);
    let high = u64::try_from(*bounds.end()).unwrap_or(u64::MAX);
    RangedU64ValueParser::new().range(low..=high)
}

/// A duration (`30s`, `10m`, `24h`, ...) that is more than zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = duration_ms(text)?;
    if duration.is_zero() {
        return Err("must be more than 0".to_string());
    }
    Ok(duration)
}

/// A duration (`30s`, `10m`, `24h`, ...) whose milliseconds fit in 64 bits.
fn duration_ms(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if u64::try_from(duration.as_millis()).is_err() {
        return Err("too long (at most 2^64-1 milliseconds)".to_string());
    }
    Ok(duration)
}

/// Debug builds only, for tests: the amount of a credit that
/// `COFFER_TEST_PANIC_ON_CREDIT_AMOUNT` makes an invariant assertion fail on (see
/// `EngineConfig::test_panic_on_credit_amount`). Release builds have neither the variable
/// nor the assertion.
#[cfg(debug_assertions)]
fn test_panic_on_credit_amount() -> Option<u64> {
    let text = std::env::var("COFFER_TEST_PANIC_ON_CREDIT_AMOUNT").ok()?;
    match text.trim().parse() {
        Ok(amount) => Some(amount),
        Err(_) => {
            tracing::warn!(%text, "COFFER_TEST_PANIC_ON_CREDIT_AMOUNT is not an amount; ignored");
            None
        }
    }
}
