"""Which teacher produced an output: the ingredients every teacher cache and generation share.

A teacher is named as the params name it (`teacher.model`: a hub id, or a local folder's path as
written) and, for a local folder, also by a checksum of its weights, so a folder re-converted to
other weights gets a new key. The name stays in the key because Stage 2 checks a cache against
the params without the teacher (`build.check_cache_settings`): a folder moved to another path
therefore gets a new key too. Hub models are named by id and revision (pin a commit: a branch
name such as `main` can move).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from akd_cache.config import TeacherConfig
from akd_cache.errors import ModelNotFoundError
from akd_cache.store.key import tokenizer_fingerprint

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
READ_BLOCK_BYTES = 1 << 22


def teacher_identity(
    teacher: TeacherConfig, teacher_path: str, tokenizer: PreTrainedTokenizerBase
) -> dict:
    """The ingredients every teacher output shares: which weights, in which dtype, which vocab."""
    return {
        "teacher": teacher.model,
        "teacher_revision": teacher.revision,
        "teacher_weights_sha256": weights_sha256(teacher_path),
        "teacher_dtype": teacher.dtype,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
    }


def weights_sha256(model: str) -> str | None:
    """A checksum over a local folder's config and weight files; None for a hub id."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted(
        p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"
    )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ModelNotFoundError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK_BYTES):
                digest.update(block)
    return digest.hexdigest()
