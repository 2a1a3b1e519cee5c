#!/usr/bin/env bash
# Wheels for the GPU machine (device tool), whose image has torch, transformers, triton, numpy,
# fsspec, pyyaml and tqdm but not zarr, its codecs, pydantic or the loss peers. Downloaded here
# (the GPU machine reaches no registry) into .whl/ for Python 3.12 on x86-64 Linux, without
# dependencies: the list is the whole closure that `benchmarks/gpu_stage1.py` and
# `benchmarks/loss_peers.py` import beyond that image. On the machine, with `.whl` carried:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  liger-kernel==0.8.5 axolotl==0.19.0 torchtune==0.6.1
)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
du -sh .whl
