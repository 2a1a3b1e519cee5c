"""SeqKD's Stage 2 data: the teacher's generated responses as cross-entropy targets.

SeqKD learns from text, not from teacher distributions, so the student need not share the
teacher's tokenizer: responses are tokenised here with the student's, exactly as the logit cache
tokenises references (prompt + response + EOS, the loss on the response and the EOS, the same
max_length and truncation policy). A response that ran out of max_new_tokens never ended, so it
gets no EOS, as `truncate_response` treats a cut reference. Each sample is a `CachedSample`
whose teacher rows are k = 1 placeholders (all mass on token 0, an empty tail), so the logit
cache's `collate` and the trainer take it unchanged. The `seqkd` loss is the cross-entropy alone;
the FKL and RKL it logs (bucket tail mode) are against these placeholders and mean nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from akd_cache.config import CacheConfig
from akd_cache.data.instructions import DroppedRow, Example
from akd_cache.data.tokenize import tokenize_split
from akd_cache.store.generations import read_generations, truncated_sample_ids
from akd_cache.store.reader import CachedSample
from akd_cache.store.rows import TokenizedSample

PLACEHOLDER_K = 1
TOKENIZATION_FIELDS = frozenset({"template", "max_length", "truncation"})
"""The `CacheConfig` settings that decide the samples' tokens (what `tokenize_split` reads)."""
EMPTY_RESPONSE = "empty teacher response"


def _without_eos(sample: TokenizedSample, eos_id: int) -> TokenizedSample:
    if sample.input_ids[-1] != eos_id:  # max_length already cut it off
        return sample
    return TokenizedSample(sample.sample_id, sample.input_ids[:-1], sample.prompt_len)


class SeqKDDataset(torch.utils.data.Dataset):
    """`examples` hold the teacher's responses as `output`; `truncated` names those that ran
    out of max_new_tokens. Samples that cannot be used are listed in `dropped`: empty
    responses, and what tokenising drops."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: PreTrainedTokenizerBase,
        cache: CacheConfig,
        truncated: Collection[str] = (),
    ) -> None:
        usable = [e for e in examples if e.output.strip()]
        # An empty response would only teach the student to stop at once.
        empty = [DroppedRow(e.sample_id, "seqkd", EMPTY_RESPONSE)
                 for e in examples if not e.output.strip()]
        split = tokenize_split(tokenizer, usable, cache)
        self.samples = [
            _without_eos(s, tokenizer.eos_token_id) if s.sample_id in truncated else s
            for s in split.samples
        ]
        self.dropped: list[DroppedRow] = empty + split.dropped

    @classmethod
    def from_generations(
        cls, location: str | Path, tokenizer: PreTrainedTokenizerBase, cache: CacheConfig
    ) -> SeqKDDataset:
        """Over a complete folder written by `generate_responses`."""
        examples = [Example(g.sample_id, g.instruction, g.input, g.output)
                    for g in read_generations(location)]
        return cls(examples, tokenizer, cache, truncated_sample_ids(location))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> CachedSample:
        s = self.samples[index]
        n = s.n_loss_rows
        return CachedSample(
            sample_id=s.sample_id,
            input_ids=np.asarray(s.input_ids, dtype=np.int64),
            prompt_len=s.prompt_len,
            topk_ids=np.zeros((n, PLACEHOLDER_K), dtype=np.int64),
            topk_logprobs=np.zeros((n, PLACEHOLDER_K), dtype=np.float32),
            tail_logmass=np.full(n, -np.inf, dtype=np.float32),
            target_logprob=np.zeros(n, dtype=np.float32),
        )
