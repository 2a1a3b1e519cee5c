"""The teacher's vocabulary size, and the top-k settings it rules out before any work starts."""

from __future__ import annotations

from transformers import AutoConfig

from akd_cache.errors import ConfigError


def model_vocab_size(model: str, revision: str | None = None) -> int:
    """The width of the model's logits, from its config.json (no weights are loaded)."""
    config = AutoConfig.from_pretrained(model, revision=revision)
    return config.get_text_config().vocab_size


def check_top_k(k: int, vocab_size: int, model: str) -> None:
    """A top-k wider than the logits cannot be taken; say so before any data is read."""
    if k > vocab_size:
        raise ConfigError(f"cache.k={k} is larger than the teacher's vocabulary ({vocab_size} "
                          f"tokens in {model}); set cache.k to at most {vocab_size}")
