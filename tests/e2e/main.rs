//! End-to-end tests of the `capstan` runtime and binary: one test binary, a module per capability.

mod bench;
mod cli;
mod crash;
mod support;
mod tidy;
mod timeouts;
