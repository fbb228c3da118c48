//! Unit tests of the account state machine: every operation and every refusal.
