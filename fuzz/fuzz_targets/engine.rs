//! `targets::engine` (tests/fuzz/targets.rs) under libFuzzer: `scripts/fuzz.sh engine [SECONDS]`.
#![no_main]

#[path = "../../tests/fuzz/targets.rs"]
#[allow(dead_code)] // each binary runs one of the targets
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::engine(data));
