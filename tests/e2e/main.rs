//! End-to-end tests of the `capstan` runtime and binary: one test binary, a module per capability.

mod tidy;
mod support;
mod timeouts;
mod crash;
mod cli;
