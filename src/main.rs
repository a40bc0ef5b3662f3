//! The `capstan` binary: CLI, configuration and the server runtime.

use std::process::ExitCode;

use capstan::cli;
use clap::Parser;

/// mimalloc instead of glibc's malloc: the engine allocates and frees many small strings, JSON
/// trees and buffers per message, and glibc's allocator was ~28 % of the server's CPU
/// (`_int_malloc`, `malloc_consolidate`, `_int_free`; docs/performance.md). Its v2 series (the
/// `v2` feature), not v3: v3 spent ~18 % of the cycles at 1,024 runs in flight, and v2 ran ~5 %
/// more tasks per second in interleaved pairs for the same instruction count.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(args.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
