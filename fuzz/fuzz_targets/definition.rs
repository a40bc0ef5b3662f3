//! Fuzzes the definition parser (Capstan's and Keptn's shipyard formats, parse and validate):
//! any text must yield a definition or diagnostics that render, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = capstan_engine::definition::file_kind(text);
    if let Err(problems) = capstan_engine::parse(text) {
        for p in problems.iter() {
            let _ = p.to_string();
        }
    }
});
