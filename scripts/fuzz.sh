#!/usr/bin/env bash
# Long coverage-guided fuzz run of one target of tests/fuzz/targets.rs under libFuzzer (the fuzz/ crate):
#   scripts/fuzz.sh TARGET [SECONDS]    TARGET: gguf, hf_config, safetensors, engine or tokenizer; default 600 s
# Writes the seed corpus if missing (scripts/fuzz-corpus.sh), installs cargo-fuzz into target/cargo-fuzz, builds the
# targets optimised with debug assertions, overflow checks and AddressSanitizer, and fuzzes in fork mode, so each
# crash, timeout (> 10 s) or OOM (> 4 GiB) is saved to target/fuzz/artifacts/TARGET/ and the run goes on. Inputs
# that reach new code go to target/fuzz/grown/TARGET (the seed corpus stays as generated); the log is
# target/fuzz/TARGET.log. At the end it prints the last status line (executions, findings) and replays each finding
# for where it stopped. Minimise one with `cargo fuzz tmin -O -a TARGET ARTIFACT`.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:?usage: scripts/fuzz.sh TARGET [SECONDS]}
DURATION=${2:-600}
FUZZ=$PWD/target/fuzz
[ -d "$FUZZ/corpus/$TARGET" ] || scripts/fuzz-corpus.sh
[ -x target/cargo-fuzz/bin/cargo-fuzz ] || cargo install --locked cargo-fuzz --root target/cargo-fuzz
export RUSTC_BOOTSTRAP=1 # cargo-fuzz passes -Z flags; this lets the stable toolchain take them
mkdir -p "$FUZZ/grown/$TARGET" "$FUZZ/artifacts/$TARGET"
LIMITS=(-timeout=10 -rss_limit_mb=4096 -malloc_limit_mb=4096)
status=0
target/cargo-fuzz/bin/cargo-fuzz fuzz run -O -a --target-dir "$FUZZ/build" "$TARGET" \
  "$FUZZ/grown/$TARGET" "$FUZZ/corpus/$TARGET" -- -max_total_time="$DURATION" "${LIMITS[@]}" \
  -fork=1 -ignore_crashes=1 -artifact_prefix="$FUZZ/artifacts/$TARGET/" 2>&1 | tee "$FUZZ/$TARGET.log" || status=$?
echo "last status: $(grep -E '^#[0-9]+' "$FUZZ/$TARGET.log" | tail -1)"
echo "findings in $FUZZ/artifacts/$TARGET, by where each stops:"
BIN=$FUZZ/build/$(rustc -vV | sed -n 's/^host: //p')/release/$TARGET
for artifact in "$FUZZ/artifacts/$TARGET"/*; do
  [ -f "$artifact" ] && "$BIN" "${LIMITS[@]}" "$artifact" 2>&1 | grep -m1 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)'
done | sed -E 's/\(([0-9]+)\) //; s/==[0-9]+== //' | sort | uniq -c
exit "$status"
