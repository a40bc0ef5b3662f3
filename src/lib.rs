//! The `capstan` package: the durable runtime that wires the pure engine to a store and a broker,
//! and the command line. The `capstan` binary (src/main.rs) is a thin wrapper; tests in tests/
//! drive the same code in process.

pub mod api;
pub mod backends;
pub mod cli;
pub mod config;
pub mod runtime;
