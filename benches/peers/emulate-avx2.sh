#!/usr/bin/env bash
# benches/peers/run.sh as on an AVX2-only CPU (AMD Zen 2/3 class), run on a CPU with AVX-512.
# Usage: benches/peers/emulate-avx2.sh [run.sh options]   (--out defaults to target/peers/<model>-avx2)
#
# Every system is kept off AVX-512 (and AMX, AVX512-BF16, AVX-VNNI):
# - fastkv: this working tree copied to target/avx2-emulation/tree and built with the `gemm` crate
#   without its x86-v4 (AVX-512) kernels, the multiversioned loops without their AVX-512 version,
#   and isa.rs reporting no AVX-512 (so the decode kernels take AVX2 and the path is f32);
# - llama.cpp: llama-cpp-python 0.3.36 built by run.sh with GGML_NATIVE=OFF and AVX2/FMA/F16C only,
#   into target/peers-py/llama-avx2 (LLAMA_DIR, LLAMA_CMAKE_ARGS);
# - PyTorch: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2.
# What it cannot emulate: the other CPU's caches, memory and clock. `benches/peers/run.sh --help`
# lists the options.
set -euo pipefail
case " $* " in *" -h "* | *" --help "*) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/../.."
EMU=target/avx2-emulation

echo "== fastkv without AVX-512 -> $EMU" >&2
rm -rf "$EMU/tree" && mkdir -p "$EMU/tree"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$EMU/tree"
(
    cd "$EMU/tree"
    sed -i 's/features = \["std", "rayon", "x86-v4"\]/features = ["std", "rayon"]/' Cargo.toml
    find src -name '*.rs' -exec sed -i -e 's/targets("x86_64+avx512f+avx512vl", /targets(/' \
        -e 's/std::is_x86_feature_detected!("avx512\(f\|bf16\)")/false/' {} +
    # A pattern that no longer matches must stop the run, not measure AVX-512 under an AVX2 label.
    if grep -q x86-v4 Cargo.toml || grep -rq 'x86_64+avx512' src || grep -rEq '_detected!\("avx512(f|bf16)"\)' src; then
        echo "emulate-avx2.sh: the AVX-512 switches moved; update its sed patterns" >&2
        exit 1
    fi
)
CARGO_TARGET_DIR=$PWD/$EMU/target cargo build --release --bins --manifest-path "$EMU/tree/Cargo.toml"
CARGO_TARGET_DIR=$PWD/$EMU/target cargo bench --no-run --bench gemm --manifest-path "$EMU/tree/Cargo.toml"

model=smollm2 out=
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --model) model=${args[i + 1]:-} ;;
        --out) out=${args[i + 1]:-} ;;
    esac
done
[ -n "$out" ] || args+=(--out "target/peers/$model-avx2")
llama_avx2="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
llama_avx2+=" -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
FASTKV=$EMU/target/release/fastkv FASTKV_BUILD=$EMU/target/release/fastkv-build \
    GEMM_BIN=$(ls -t "$EMU"/target/release/deps/gemm-* | grep -v '\.d$' | head -1) \
    FASTKV_CPU=f32 LLAMA_DIR=target/peers-py/llama-avx2 LLAMA_CMAKE_ARGS="$llama_avx2" \
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    benches/peers/run.sh "${args[@]}"
