#!/usr/bin/env bash
# Installs what fastkv's Dynamo worker and its tests need, all under target/, and says what it did:
#   target/dynamo-py   a Python venv with ai-dynamo 1.6.1 (the frontend, the runtime, the backend
#                      SDK the worker uses), every package pinned in dynamo/requirements.txt,
#                      installed with --no-deps (ai-dynamo's aisimulate dependency downloads from
#                      outside PyPI at install time; nothing here needs it);
#   target/server-py   the official openai client 3.63.0 the tests drive the frontend with (the
#                      folder server/run-tests.sh makes; reused when it already has it);
#   target/aiperf-py   with --bench only: NVIDIA's load generator aiperf 0.13.0 for dynamo/bench.py,
#                      every package pinned in dynamo/requirements-bench.txt (~1.2 GB, no torch).
#   etcd, nats-server  with --etcd only: Debian's etcd-server and nats-server (apt-get), for the
#                      tests' FASTKV_DYNAMO_DISCOVERY=etcd. By default the tests use Dynamo's file
#                      discovery (one host: nothing to install or run); docs/distributed.md says
#                      what several hosts need. On a host with systemd, the Debian packages also
#                      start system-wide etcd and NATS services; the tests start their own.
# Idempotent: a venv whose pins match is left as it is. Needs python3 (3.10+) with venv.
# Usage: dynamo/install.sh [--bench] [--etcd]
set -euo pipefail
cd "$(dirname "$0")/.."

# venv VENV REQUIREMENTS CHECK: the venv with exactly those pins, unless it already has them.
venv() {
  local venv=$1 req=$2 check=$3 stamp=$1/.fastkv-requirements
  if [ -f "$stamp" ] && cmp -s "$req" "$stamp" && "$venv/bin/python" -c "$check" 2>/dev/null; then
    echo "install.sh: $venv already has the pins of $req"
    return
  fi
  [ -x "$venv/bin/python" ] || { echo "install.sh: creating the venv $venv"; python3 -m venv "$venv"; }
  echo "install.sh: installing the $(grep -c '==' "$req") pinned packages of $req into $venv (--no-deps)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$req"
  "$venv/bin/python" -c "$check"
  cp "$req" "$stamp"
  echo "install.sh: $venv ready ($(du -sh "$venv" | cut -f1))"
}

venv target/dynamo-py dynamo/requirements.txt 'import dynamo.frontend, dynamo.common.backend, aiohttp'
for flag in "$@"; do
  case $flag in
    --bench) venv target/aiperf-py dynamo/requirements-bench.txt 'import aiperf' ;;
    --etcd)
      if command -v etcd >/dev/null && command -v nats-server >/dev/null; then
        echo "install.sh: etcd $(etcd --version | sed -n 's/etcd Version: //p') and $(nats-server --version) already installed"
      else
        echo "install.sh: apt-get install etcd-server nats-server"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server nats-server >/dev/null
      fi ;;
    *) echo "install.sh: unknown flag $flag (--bench, --etcd)" >&2; exit 2 ;;
  esac
done
CLIENT=target/server-py

if [ -d "$CLIENT/openai-3.63.0.dist-info" ]; then
  echo "install.sh: $CLIENT already has openai 3.63.0"
else
  echo "install.sh: installing openai==3.63.0 into $CLIENT"
  python3 -m pip install --quiet --disable-pip-version-check --target "$CLIENT" openai==3.63.0
fi
