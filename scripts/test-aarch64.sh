#!/usr/bin/env bash
# Builds fastkv for aarch64 (Linux) and runs its CPU tests under qemu-user: the unit tests (every CPU
# kernel against its f64 reference) and the engine tests against transformers (parity, fastkv,
# select, gguf). Not part of CI (a second build of the crate); run it after changing src/cpu/.
# Installs, once: the Rust aarch64 target (rustup), qemu-user and Debian's aarch64 cross gcc (apt,
# as root). Tests that start the fastkv binaries are left out: the host cannot execute them.
# Under emulation the tests take 10–15 minutes on 2 cores; timings mean nothing there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/models.sh >/dev/null
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu >&2
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++ \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --locked --no-fail-fast --target aarch64-unknown-linux-gnu --target-dir target/aarch64 \
    --lib --test parity --test fastkv --test select --test gguf --test baselines -- --skip cli_
