//! The pure domain: value types and the account state machine. No I/O, no async, no serde,
//! no clock reads: time and fresh ids come in as arguments. Every invariant of DESIGN.md is
//! asserted here after every event, on the live path and in replay alike.

mod account;
mod transfer;
mod types;

pub use account::*;
pub use transfer::*;
pub use types::*;

#[cfg(test)]
mod tests;
