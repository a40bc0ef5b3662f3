//! End-to-end tests of the `capstan` runtime and binary: one test binary, a module per capability.

mod api;
mod bench;
mod brokers;
mod cli;
mod crash;
mod delivery;
mod faults;
mod fleet;
mod foreign;
mod lanes;
mod packing;
mod pipeline;
mod retention;
mod runbook;
mod support;
mod tidy;
mod timeouts;
