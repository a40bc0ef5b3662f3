//! The `capstan` binary: CLI, configuration and the server runtime.

fn main() {}
