"""The content address of a teacher cache: a hash of the ingredients it is given.

Two experiments share a cache exactly when every ingredient below matches. Which ingredients
identify the teacher (its name in the params and revision, plus a weights checksum for a local
folder) is decided in `akd_cache.teacher.identity`; the dataset enters by a sha256 of its rows and
of the exact examples that were cached, never by file mtimes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase

from akd_cache.store.format import CODE_MAX, FORMAT_VERSION, TAIL_CODE_FIT
from akd_cache.store.rows import TokenizedSample

KEY_HEX_CHARS = 20


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
    tail_shape: bool
    tail_rank: int = 0
    tail_code_fit: int = TAIL_CODE_FIT
    value_code_max: int = CODE_MAX
    format_version: int = FORMAT_VERSION

    def key(self) -> str:
        return hash_key(asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)


def hash_key(ingredients: dict) -> str:
    canonical = json.dumps(ingredients, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_HEX_CHARS]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A checksum of what decides token ids: the vocabulary, merges, normaliser and specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items())
    )
    specials = json.dumps(
        {"specials": tokenizer.all_special_tokens, "eos": tokenizer.eos_token_id,
         "bos": tokenizer.bos_token_id},
        sort_keys=True,
    )
    return hashlib.sha256((body + specials).encode()).hexdigest()


def samples_sha256(samples: Sequence[TokenizedSample]) -> str:
    """Over the tokenised samples that go into the cache, ids and prompt lengths included."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.sample_id, s.prompt_len, s.input_ids]).encode())
    return digest.hexdigest()
