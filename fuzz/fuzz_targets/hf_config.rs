//! `targets::hf_config` (tests/fuzz/targets.rs) under libFuzzer: `scripts/fuzz.sh hf_config [SECONDS]`.
#![no_main]

#[path = "../../tests/fuzz/targets.rs"]
#[allow(dead_code)] // each binary runs one of the targets
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::hf_config(data));
