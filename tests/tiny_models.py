"""Tiny random models and a tokenizer trained offline: the tests' stand-ins for hub models.

Both real architectures of the paper's families are covered (GPTBigCode for StarCoder, Llama for
TinyLlama/CodeLlama/SmolLM2) so every code path meets the layer names it will meet in real use.
The head size is 32 because vLLM's CPU attention has no kernel for smaller heads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPTBigCodeConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

Arch = Literal["gpt_bigcode", "llama"]
WEIGHT_STD = 0.2  # wider than the usual 0.02, so the random models have peaked distributions
SPECIAL_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<pad>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the given texts, with the FIM specials StarCoder uses."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>"
    )


def build_tiny_model(arch: Arch, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    if arch == "gpt_bigcode":
        config = GPTBigCodeConfig(
            vocab_size=vocab_size, n_positions=1024, n_embd=64, n_layer=2, n_head=2,
            multi_query=True, bos_token_id=0, eos_token_id=0,
        )
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
        )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, WEIGHT_STD)
    return model.eval()


def save_tiny(arch: Arch, texts: Iterable[str], out: Path, vocab_size: int = 512) -> Path:
    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_tiny_model(arch, len(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def fill_tiny_cache(teacher: str, rows: list[dict], cache_cfg, location: str,
                    vocab_size: int | None = None) -> None:
    """A complete Stage 1 cache of `rows` (CodeAlpaca dicts) from the hf backend, for tests."""
    from transformers import AutoTokenizer

    from akd_cache.config import DataConfig, TeacherConfig
    from akd_cache.data.instructions import Example
    from akd_cache.data.tokenize import tokenize_split
    from akd_cache.store.writer import fill
    from akd_cache.teacher.build import make_ingredients
    from akd_cache.teacher.hf_backend import HFTeacher

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    examples = [Example(f"row-{i}", r["instruction"], r["input"], r["output"])
                for i, r in enumerate(rows)]
    split = tokenize_split(tokenizer, examples, cache_cfg)
    ingredients = make_ingredients(
        teacher=TeacherConfig(model=teacher), teacher_path=teacher, tokenizer=tokenizer,
        data=DataConfig(dataset="x.json"), dataset_sha256="0" * 64, samples=split.samples,
        cache=cache_cfg,
    )
    backend = lambda: HFTeacher(teacher, k=cache_cfg.k, temperature=cache_cfg.temperature)
    assert fill(location, split.samples, ingredients, vocab_size or len(tokenizer), backend,
                shard_rows=1024)
