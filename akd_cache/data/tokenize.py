"""Prompt + response (+ EOS) token ids, with the loss on response positions only.

Prompt and response are tokenised separately and concatenated, so the boundary between them is
exact whatever the tokenizer merges. Row j of a teacher or student output predicts token j + 1,
so a sample of length L with prompt length P has L - P loss rows, at positions P - 1 .. L - 2:
every response token and the EOS.

Truncation policies, applied when prompt + response + EOS exceeds `max_length`:
- `truncate_response` (default): keep the whole prompt and cut the response from the right (the
  EOS goes with it); a prompt that leaves fewer than `MIN_RESPONSE_TOKENS` is dropped.
- `drop`: the sample is dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from akd_cache.config import TruncationPolicy
from akd_cache.data.instructions import BadRow, Example
from akd_cache.data.templates import render_prompt
from akd_cache.errors import ModelError

MIN_RESPONSE_TOKENS = 1


@dataclass(frozen=True)
class TokenizedSample:
    sample_id: str
    input_ids: list[int]
    prompt_len: int

    @property
    def n_loss_rows(self) -> int:
        return len(self.input_ids) - self.prompt_len


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    template: str,
    max_length: int,
    truncation: TruncationPolicy,
) -> TokenizedSample:
    prompt = render_prompt(template, example.instruction, example.input)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")
    ids = prompt_ids + response_ids + [tokenizer.eos_token_id]
    if len(ids) > max_length:
        if truncation == "drop":
            raise BadRow(f"too long: {len(ids)} tokens > max_length {max_length}")
        if max_length - len(prompt_ids) < MIN_RESPONSE_TOKENS:
            raise BadRow(
                f"too long: the prompt alone has {len(prompt_ids)} tokens, "
                f"max_length is {max_length}"
            )
        ids = ids[:max_length]
    return TokenizedSample(example.sample_id, ids, len(prompt_ids))


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
