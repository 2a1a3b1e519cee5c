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

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from akd_cache.config import CacheConfig, TruncationPolicy
from akd_cache.data.instructions import BadRow, DroppedRow, Example
from akd_cache.data.templates import render_prompt
from akd_cache.errors import ModelError
from akd_cache.store.rows import TokenizedSample

MIN_RESPONSE_TOKENS = 1


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


@dataclass(frozen=True)
class TokenizedSplit:
    samples: list[TokenizedSample]
    dropped: list[DroppedRow]


def tokenize_split(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], cache: CacheConfig
) -> TokenizedSplit:
    """Every example that fits; the others are listed in `dropped` with the reason."""
    samples, dropped = [], []
    for example in examples:
        try:
            samples.append(
                tokenize_example(tokenizer, example, cache.template, cache.max_length,
                                 cache.truncation)
            )
        except BadRow as err:
            dropped.append(DroppedRow(example.sample_id, "tokenize", str(err)))
    return TokenizedSplit(samples, dropped)
