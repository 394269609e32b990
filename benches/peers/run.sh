#!/usr/bin/env bash
# Side-by-side CPU benchmark: fastkv vs PyTorch (HF transformers) vs llama.cpp, one command.
# See --help. Preparation steps are skipped when their output exists; the measurements always run.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: benches/peers/run.sh [OPTIONS]

Benchmarks fastkv against HF transformers (PyTorch CPU, sdpa, bf16 and f32) and llama.cpp
(llama-cpp-python 0.3.36 built from source for this CPU; BF16 GGUF and the original quantized GGUF,
flash attention on and off) on one model, then the bf16 GEMM of both models' projection shapes
against torch. Writes table.md, results.json, prefill.png and decode.png into --out and prints the
table (benches/peers/emulate-avx2.sh runs it all as on an AVX2-only CPU). Safe to re-run: the
venv, llama.cpp build, HF checkpoint, BF16 GGUF and fastkv engine are made once (delete them to
redo); the measurements run every time.

Options:
  --model smollm2|qwen   Model (default smollm2): smollm2 = target/models/SmolLM2-135M-Instruct.Q4_1.gguf
                         (scripts/models.sh), qwen = target/models/Qwen2.5-Coder-0.5B-Instruct.gguf
                         (scripts/models.sh --with-qwen)
  --lengths LIST         Prompt lengths in tokens, comma-separated (default 1024,2048,4096,8192)
  --repeats N            Timed repeats per length; every system runs once per repeat, interleaved;
                         the table shows medians (default 3)
  --warmup N             Untimed rounds of every system on a 128-token prompt first (default 1)
  --threads N            Threads for every system: RAYON_NUM_THREADS, torch.set_num_threads,
                         llama.cpp n_threads and n_threads_batch (default 2)
  --new-tokens N         Tokens greedy-decoded after each prompt, for decode speed (default 32)
  --kv-bytes B           Bytes per element of fastkv's KV cache, for decode GB/s (default 2)
  --n-batch N            llama.cpp n_batch (default 512; n_ubatch stays llama.cpp's default)
  --gemm-m LIST          GEMM rows M for the GEMM table (default 512,2048)
  --gemm-repeats N       GEMM repeats, best of (default 5)
  --no-gemm              Skip the GEMM table
  --out DIR              Output folder (default target/peers/<model>); also holds the prepared
                         hf/ checkpoint, model-bf16.gguf and engine/
  -h, --help             This help

Environment: PY_VENV (default target/peers-py/venv), FASTKV (target/release/fastkv),
FASTKV_BUILD (target/release/fastkv-build), GEMM_BIN (newest target/release/deps/gemm-*, not .d),
LLAMA_CMAKE_ARGS (llama.cpp's build options, default -DGGML_NATIVE=ON), LLAMA_DIR (a folder to
build llama-cpp-python into and import it from, instead of the venv).
EOF
}

cd "$(dirname "$0")/../.."
MODEL=smollm2 LENGTHS=1024,2048,4096,8192 REPEATS=3 WARMUP=1 THREADS=2 NEW=32 KVB=2 NBATCH=512
GEMM_M=512,2048 GEMM_REPEATS=5 NO_GEMM=0 OUT=
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --lengths) LENGTHS=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --new-tokens) NEW=$2; shift 2 ;;
        --kv-bytes) KVB=$2; shift 2 ;;
        --n-batch) NBATCH=$2; shift 2 ;;
        --gemm-m) GEMM_M=$2; shift 2 ;;
        --gemm-repeats) GEMM_REPEATS=$2; shift 2 ;;
        --no-gemm) NO_GEMM=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$MODEL" in
    smollm2) GGUF=target/models/SmolLM2-135M-Instruct.Q4_1.gguf; GET="scripts/models.sh" ;;
    qwen) GGUF=target/models/Qwen2.5-Coder-0.5B-Instruct.gguf; GET="scripts/models.sh --with-qwen" ;;
    *) echo "--model must be smollm2 or qwen" >&2; exit 2 ;;
esac
OUT=${OUT:-target/peers/$MODEL}
VENV=${PY_VENV:-target/peers-py/venv}
FASTKV=${FASTKV:-target/release/fastkv}
FASTKV_BUILD=${FASTKV_BUILD:-target/release/fastkv-build}
GEMM_BIN=${GEMM_BIN:-$(ls -t target/release/deps/gemm-* 2>/dev/null | grep -v '\.d$' | head -1 || true)}
PY=$VENV/bin/python
LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=ON} LLAMA_DIR=${LLAMA_DIR:-}
[ -z "$LLAMA_DIR" ] || { LLAMA_DIR=$(realpath -m "$LLAMA_DIR"); export PYTHONPATH=$LLAMA_DIR${PYTHONPATH:+:$PYTHONPATH}; }
step() { echo "== $*" >&2; }

[ -f "$GGUF" ] || { echo "$GGUF missing: run $GET" >&2; exit 1; }
for b in "$FASTKV" "$FASTKV_BUILD"; do
    [ -x "$b" ] || { echo "$b missing: cargo build --release" >&2; exit 1; }
done

# ---- 1. Python environment (once)
if [ ! -x "$PY" ]; then
    step "creating $VENV"
    python3 -m venv "$VENV"
fi
if ! "$PY" -c "import torch, transformers, gguf, numpy, matplotlib, accelerate" 2>/dev/null; then
    step "installing torch transformers gguf numpy matplotlib accelerate into $VENV"
    "$PY" -m pip install -q torch transformers gguf numpy matplotlib accelerate
fi
# llama-cpp-python 0.3.36, imported from LLAMA_DIR where that is set (not the venv's), built once.
if ! "$PY" -c 'import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36" or not llama_cpp.__file__.startswith(sys.argv[1]))' \
    "${LLAMA_DIR:-/}" 2>/dev/null; then
    command -v cmake >/dev/null || [ -x "$VENV/bin/cmake" ] || "$PY" -m pip install -q cmake
    step "building llama-cpp-python 0.3.36 (llama.cpp from source, $LLAMA_CMAKE_ARGS${LLAMA_DIR:+, into $LLAMA_DIR}; several minutes)"
    start=$(date +%s)
    PATH="$PWD/$VENV/bin:$PATH" CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PY" -m pip install --no-cache-dir --force-reinstall --no-deps ${LLAMA_DIR:+--target "$LLAMA_DIR"} llama-cpp-python==0.3.36
    "$PY" -m pip install -q llama-cpp-python==0.3.36  # its pure-Python dependencies (pip sees LLAMA_DIR's build)
    echo "llama-cpp-python 0.3.36 built in $(( $(date +%s) - start )) s" | tee -a "$(dirname "$VENV")/llama_build.log" >&2
fi

# ---- 2. Inputs from the same GGUF (once each)
mkdir -p "$OUT"
if [ ! -f "$OUT/hf/config.json" ]; then
    step "HF checkpoint (bf16) from $GGUF -> $OUT/hf"
    "$PY" benches/peers/prepare.py hf "$GGUF" "$OUT/hf"
fi
if [ ! -f "$OUT/model-bf16.verified" ]; then
    [ -f "$OUT/model-bf16.gguf" ] || { step "BF16 GGUF -> $OUT/model-bf16.gguf"; "$PY" benches/peers/prepare.py bf16 "$GGUF" "$OUT/model-bf16.gguf"; }
    step "verifying the BF16 GGUF with llama.cpp"
    "$PY" benches/peers/prepare.py verify "$GGUF" "$OUT/model-bf16.gguf" | tee "$OUT/model-bf16.verify.txt"
    touch "$OUT/model-bf16.verified"
fi
if [ ! -f "$OUT/engine/engine.json" ] || [ "$FASTKV_BUILD" -nt "$OUT/engine/engine.json" ]; then
    step "fastkv bf16 engine -> $OUT/engine"
    "$FASTKV_BUILD" --checkpoint "$GGUF" --output "$OUT/engine" --dtype bf16 --no-calibrate --force --quiet
fi

# ---- 3. Measurements (every run)
step "side-by-side: $MODEL, lengths $LENGTHS, $REPEATS repeat(s), $THREADS threads"
"$PY" benches/peers/peers.py --fastkv "$FASTKV" --engine "$OUT/engine" --hf "$OUT/hf" --gguf "$GGUF" \
    --gguf-bf16 "$OUT/model-bf16.gguf" --lengths "$LENGTHS" --repeats "$REPEATS" --warmup "$WARMUP" \
    --threads "$THREADS" --new-tokens "$NEW" --kv-bytes "$KVB" --n-batch "$NBATCH" \
    ${GEMM_BIN:+--gemm-bin "$GEMM_BIN"} --out "$OUT"
rm -f "$OUT/gemm.md" "$OUT/gemm.json"
if [ "$NO_GEMM" = 0 ]; then
    if [ -n "$GEMM_BIN" ]; then
        step "GEMM vs torch ($GEMM_BIN)"
        "$PY" benches/peers/gemm_vs_torch.py "$GEMM_BIN" --m "$GEMM_M" --repeats "$GEMM_REPEATS" \
            --threads "$THREADS" --md "$OUT/gemm.md" --json "$OUT/gemm.json" >/dev/null
    else
        echo "no target/release/deps/gemm-* binary (cargo bench --bench gemm --no-run): GEMM table skipped" >&2
    fi
fi

# ---- 4. table.md + results.json
{
    echo "# fastkv vs PyTorch vs llama.cpp: $MODEL ($(basename "$GGUF")), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Command: benches/peers/run.sh --model $MODEL --lengths $LENGTHS --repeats $REPEATS --threads $THREADS --new-tokens $NEW"
    echo
    cat "$OUT/peers.md"
    [ -f "$OUT/model-bf16.verify.txt" ] && { echo; echo "BF16 GGUF check (llama.cpp, original vs BF16):"; echo; sed 's/^/    /' "$OUT/model-bf16.verify.txt"; }
    [ -f "$OUT/gemm.md" ] && { echo; cat "$OUT/gemm.md"; }
    echo
    echo "Charts: prefill.png, decode.png"
} > "$OUT/table.md"
"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
r = {"peers": json.load(open(os.path.join(out, "peers.json")))}
g = os.path.join(out, "gemm.json")
if os.path.exists(g):
    r["gemm"] = json.load(open(g))
json.dump(r, open(os.path.join(out, "results.json"), "w"), indent=1)
EOF
echo
cat "$OUT/table.md"
echo
echo "wrote $OUT/table.md $OUT/results.json $OUT/prefill.png $OUT/decode.png" >&2
