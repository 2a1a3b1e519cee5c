"""Shared fixtures: the real CodeAlpaca file from ../shared, tiny models, the SmolLM2 teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import save_tiny

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CODEALPACA = SHARED_DATA / "codealpaca" / "code_alpaca_2k.json"
TINY_VOCAB = 512


@pytest.fixture(scope="session")
def codealpaca_path() -> Path:
    return CODEALPACA


@pytest.fixture(scope="session")
def codealpaca_rows() -> list[dict]:
    return json.loads(CODEALPACA.read_text())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, codealpaca_rows) -> dict[str, Path]:
    """A tiny random GPTBigCode and Llama sharing one BPE tokenizer trained on CodeAlpaca."""
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in codealpaca_rows]
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, texts, root / arch, TINY_VOCAB)
            for arch in ("gpt_bigcode", "llama")}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2 teacher, converted once into the repository's storage/ and reused."""
    from akd_cache.models.smollm2 import ensure_smollm2

    return ensure_smollm2(REPO / "storage" / "models" / "smollm2-135m-instruct")
