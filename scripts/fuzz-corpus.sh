#!/usr/bin/env bash
# Writes the fuzz seed corpora to target/fuzz/corpus/TARGET/ (tests/fuzz/corpus.rs): from tests/fixtures/,
# engines/ presets, engines built from the fixtures, and the GGUF models in target/models/ shrunk to seeds
# under 2 MB. Run by scripts/test.sh before the fuzz smoke test (tests/fuzz.rs) and by scripts/fuzz.sh.
# Built as `cargo test --workspace` builds the examples (with FASTKV_FEATURES, scripts/test.sh's), so the tests
# compile nothing a second time.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet --workspace --examples ${FASTKV_FEATURES:+--features "$FASTKV_FEATURES"}
target/release/examples/fuzz_corpus target/fuzz/corpus
