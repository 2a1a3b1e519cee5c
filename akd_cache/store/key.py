"""The content address of a teacher cache.

Two experiments share a cache exactly when every ingredient below matches. Local model folders
are identified by a checksum of their weights, so a re-converted or copied folder still matches;
hub models by id and revision (pin a commit: a branch name such as `main` can move). The dataset
enters by a sha256 of its rows and of the exact examples that were cached, never by file mtimes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from akd_cache.config import TeacherConfig
from akd_cache.data.tokenize import tokenizer_fingerprint
from akd_cache.errors import ModelNotFoundError
from akd_cache.store.format import CODE_MAX, FORMAT_VERSION

KEY_HEX_CHARS = 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class CacheIngredients:
    teacher: str
    teacher_revision: str | None
    teacher_weights_sha256: str | None
    teacher_dtype: str
    tokenizer_sha256: str
    dataset_sha256: str
    samples_sha256: str
    split: str
    heldout: int
    split_seed: int
    max_train_samples: int | None
    template: str
    max_length: int
    truncation: str
    k: int
    temperature: float
    value_code_max: int = CODE_MAX
    format_version: int = FORMAT_VERSION

    def key(self) -> str:
        return hash_key(asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)


def hash_key(ingredients: dict) -> str:
    canonical = json.dumps(ingredients, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_HEX_CHARS]


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
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def samples_sha256(samples: list) -> str:
    """Over the tokenised samples that go into the cache, ids and prompt lengths included."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.sample_id, s.prompt_len, s.input_ids]).encode())
    return digest.hexdigest()
