//! Fuzzes the SLO parser and, for a file it accepts, the evaluation (alone and against a previous
//! result, with and without values) and its table: none may panic, whatever the thresholds,
//! weights and comparison rules say.
#![no_main]

use std::collections::BTreeMap;

use capstan_engine::slo::{self, PreviousResult};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = slo::parse(text) else { return };
    // Values derived from the input so that the fuzzer steers them too.
    let seed = data.iter().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(*b)));
    let values: BTreeMap<String, f64> = file
        .objectives
        .iter()
        .enumerate()
        .map(|(i, o)| (o.sli.clone(), f64::from(seed >> (i % 24)) - 1000.0))
        .collect();
    let first = slo::evaluate(&file, &values, &[]);
    let _ = slo::render_table(&first);
    let previous = [PreviousResult::from(&first)];
    let second = slo::evaluate(&file, &BTreeMap::new(), &previous);
    let _ = slo::render_table(&second);
    let _ = slo::evaluate(&file, &values, &previous);
});
