//! The command line: `coffer serve` and its flags, each also read from a `COFFER_*`
//! environment variable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::domain::Retention;
use crate::engine::{EngineConfig, ACTOR_MAILBOX_CAPACITY};

/// coffer: a durable, in-memory account engine for wallet and game backends.
#[derive(Debug, Parser)]
#[command(name = "coffer", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
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
    /// Check every record's checksum and replay the log with every invariant asserted;
    /// print accounts, records and the LSN range. Exits non-zero on any damage.
    Verify(DataDirArg),
    /// Print every record as one JSON object per line, in LSN order (for audits).
    Dump(DataDirArg),
}

/// The data directory of an offline command.
#[derive(Debug, Clone, Args)]
pub struct DataDirArg {
    /// The server's data directory (the one given to `coffer serve --data-dir`).
    #[arg(long, env = "COFFER_DATA_DIR", default_value = "./coffer-data")]
    pub data_dir: PathBuf,
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
    #[arg(long, env = "COFFER_IDEMPOTENCY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_ttl: Duration,
    /// Transactions of each account kept in memory for `GET .../transactions` (the newest;
    /// older ones stay in the WAL, see `coffer wal dump`).
    #[arg(long, env = "COFFER_HISTORY_LIMIT", default_value_t = crate::engine::RETENTION_DEFAULT.history, value_parser = clap::value_parser!(usize))]
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
    /// Size in bytes at which the WAL starts a new segment file.
    #[arg(long, env = "COFFER_WAL_SEGMENT_BYTES", default_value_t = crate::wal::SEGMENT_BYTES_DEFAULT)]
    pub wal_segment_bytes: u64,
    /// Capacity of each actor's mailbox (commands queued before senders wait).
    #[arg(long, env = "COFFER_MAILBOX_CAPACITY", default_value_t = ACTOR_MAILBOX_CAPACITY)]
    pub mailbox_capacity: usize,
    /// Number of account actors, each owning the accounts whose id hashes to it
    /// (default: one per core).
    #[arg(long, env = "COFFER_ACTORS")]
    pub actors: Option<usize>,
    /// Tokio worker threads serving HTTP and running actors (default: one per core). The WAL
    /// writer has its own thread besides these.
    #[arg(long, env = "COFFER_WORKERS")]
    pub workers: Option<usize>,
    /// Log format: text or json.
    #[arg(long, env = "COFFER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl ServeArgs {
    /// The engine configuration these flags describe.
    pub fn engine_config(&self) -> EngineConfig {
        let mut config = EngineConfig::new(self.data_dir.clone());
        config.segment_bytes_max = self.wal_segment_bytes.max(4096);
        config.mailbox_capacity = self.mailbox_capacity.max(1);
        if let Some(actors) = self.actors {
            config.actors = actors.max(1);
        }
        config.clock = Arc::new(crate::clock::SystemClock);
        config.snapshot_every_records =
            (self.snapshot_every_records > 0).then_some(self.snapshot_every_records);
        config.snapshot_interval =
            (!self.snapshot_interval.is_zero()).then_some(self.snapshot_interval);
        config.wal_archive = self.wal_archive.clone();
        config.retention = Retention {
            history: self.history_limit.max(1),
            ttl_ms: u64::try_from(self.idempotency_ttl.as_millis()).unwrap_or(u64::MAX),
        };
        config
    }
}
