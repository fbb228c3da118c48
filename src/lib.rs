//! coffer: a durable, in-memory account engine for wallet and game backends.
//!
//! Accounts, credits, debits and holds over HTTP (`docs/API.md`), with every acknowledged
//! change on stable storage through a group-committed write-ahead log. See ARCHITECTURE.md
//! for the map: `domain` (pure state machine) ← `engine` (registry, actors, recovery,
//! expiry) ← `http` (routes, JSON, errors); `wal` holds the bytes on disk.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod clock;
pub mod config;
pub mod domain;
pub mod engine;
pub mod http;
pub mod load;
mod parallel;
pub mod server;
pub mod sim;
pub mod snapshot;
pub mod storage;
pub mod wal;

pub use engine::{Engine, EngineConfig};
pub use server::Server;
