//! End-to-end tests of the `capstan` binary and runtime.
