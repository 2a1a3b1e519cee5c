"""The transformers teacher backend: one forward pass per length-bucketed batch, then the lm head
applied to the loss rows only, a chunk of rows at a time.

Only the hidden states of the loss rows go through the lm head, so [batch, seq, vocab] is never
held: a chunk's float32 logits take `LOGIT_CHUNK_BYTES`, and with the copy that masks the top-k
and logsumexp's temporary beside them the peak is about three times that. The tail mass is a
logsumexp over the logits outside the top-k, which keeps full precision even when the tail is far
below float32's resolution near 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from akd_cache.config import TEACHER_BATCH_TOKENS
from akd_cache.errors import ModelError
from akd_cache.store import format as fmt
from akd_cache.store.rows import Calibration, TeacherRows, TokenizedSample
from akd_cache.teacher.tail_code_fit import fit_tail_code

LOGIT_CHUNK_BYTES = 256 * 2**20
FLOAT32_BYTES = 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def length_buckets(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length so that batch size x longest length <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class HFTeacher:
    def __init__(
        self,
        model: str | PreTrainedModel,
        k: int,
        temperature: float = 1.0,
        dtype: str = "float32",
        device: str = "cpu",
        batch_tokens: int = TEACHER_BATCH_TOKENS,
        revision: str | None = None,
    ) -> None:
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(
                model, revision=revision, dtype=DTYPES[dtype]
            )
        if getattr(model.config, "final_logit_softcapping", None):
            raise ModelError(
                f"{model.config.name_or_path}: final logit soft-capping is not supported by the "
                "hf teacher backend"
            )
        self.model = model.to(device).eval()
        self.device = device
        self.k = k
        self.logit_scale = getattr(model.config, "logit_scale", None) or 1.0
        self.temperature = temperature
        self.batch_tokens = batch_tokens
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.rows_per_chunk = max(1, LOGIT_CHUNK_BYTES // (self.vocab_size * FLOAT32_BYTES))
        self.tail_code: fmt.TailCode | None = None

    def score(self, samples: Sequence[TokenizedSample]) -> list[TeacherRows]:
        return self._score(samples)

    def calibrate(self, samples: Sequence[TokenizedSample], tail_shape: bool,
                  tail_rank: int) -> Calibration:
        """`store.rows.TailModelBackend`: the shape and the code at the cache's temperature, the
        code fitted to the lm head (`teacher.tail_code_fit`), both from the one pass that scores
        the samples."""
        hidden_size = self.model.get_output_embeddings().weight.shape[1]
        if tail_rank and not 0 < tail_rank <= hidden_size:
            raise ModelError(f"tail_rank {tail_rank} is not in [1, {hidden_size}], the "
                             "teacher's hidden size")
        if (tail_shape or tail_rank) and self.k >= self.vocab_size:
            raise ModelError(f"k = {self.k} covers the whole vocabulary: there is no tail to "
                             "model")
        tail_total = torch.zeros(self.vocab_size, dtype=torch.float64) if tail_shape else None
        hidden: list[torch.Tensor] = []
        rows = self._score(samples, tail_total, hidden if tail_rank else None)
        mean_tail = None
        if tail_total is not None:
            mean_tail = (tail_total / sum(len(r) for r in rows)).numpy()
        code = self._fit_tail_code(torch.cat(hidden), tail_rank) if tail_rank else None
        return Calibration(rows, mean_tail, code)

    @torch.inference_mode()
    def _score(self, samples: Sequence[TokenizedSample], tail_total: torch.Tensor | None = None,
               hidden: list[torch.Tensor] | None = None) -> list[TeacherRows]:
        """`tail_total` [V], if given, gains each row's normalised tail; `hidden`, if given,
        gains each batch's loss-row hidden states (float32, batches in length order)."""
        results: list[TeacherRows | None] = [None] * len(samples)
        lengths = [len(s.input_ids) for s in samples]
        for batch in length_buckets(lengths, self.batch_tokens):
            scored = self._score_batch([samples[i] for i in batch], tail_total, hidden)
            for index, rows in zip(batch, scored):
                results[index] = rows
        return results  # type: ignore[return-value]

    def _fit_tail_code(self, hidden: torch.Tensor, rank: int) -> fmt.TailCode:
        if len(hidden) < rank:
            raise ModelError(f"tail_rank {rank} needs at least as many calibration rows, and "
                             f"there are {len(hidden)}")
        head = self.model.get_output_embeddings()
        scale = self.logit_scale / self.temperature
        bias = None if head.bias is None else head.bias.detach().float() * scale
        # a clone outside inference mode: the fit differentiates through products with the rows
        return fit_tail_code(hidden.clone(), head.weight.detach().float() * scale, bias, self.k,
                             rank)

    def use_tail_code(self, code: fmt.TailCode | None) -> None:
        self.tail_code = code

    def _row_hidden(self, samples: list[TokenizedSample]) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states at every loss row of the batch, and the rows' next tokens."""
        width = max(len(s.input_ids) for s in samples)
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for b, s in enumerate(samples):
            ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids)
            mask[b, : len(s.input_ids)] = 1
        hidden = self.model.base_model(  # one forward: no key/value cache to build
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        ).last_hidden_state
        row_hidden = torch.cat(
            [hidden[b, s.prompt_len - 1 : len(s.input_ids) - 1] for b, s in enumerate(samples)]
        )
        targets = torch.cat(
            [torch.tensor(s.input_ids[s.prompt_len :]) for s in samples]
        ).to(self.device)
        return row_hidden, targets

    def _logits(self, row_hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits at the cache's temperature (and the model's own logit scale)."""
        head = self.model.get_output_embeddings()
        return head(row_hidden).float() * (self.logit_scale / self.temperature)

    def _score_batch(self, samples: list[TokenizedSample], tail_total: torch.Tensor | None,
                     hidden: list[torch.Tensor] | None) -> list[TeacherRows]:
        row_hidden, targets = self._row_hidden(samples)
        if hidden is not None:
            hidden.append(row_hidden.float())
        topk_ids, topk_lp, tail, target_lp = self._lm_head_topk(row_hidden, targets, tail_total)
        codes = (None if self.tail_code is None
                 else self.tail_code.encode(row_hidden.float().cpu().numpy()))
        out, start = [], 0
        for s in samples:
            end = start + s.n_loss_rows
            out.append(
                TeacherRows(topk_ids[start:end], topk_lp[start:end], tail[start:end],
                            target_lp[start:end], None if codes is None else codes[start:end])
            )
            start = end
        return out

    def _lm_head_topk(
        self, row_hidden: torch.Tensor, targets: torch.Tensor, tail_total: torch.Tensor | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for start in range(0, len(row_hidden), self.rows_per_chunk):
            h = row_hidden[start : start + self.rows_per_chunk]
            logits = self._logits(h)
            log_norm = logits.logsumexp(-1)
            values, ids = logits.topk(self.k, dim=-1)
            tail = _tail_logmass(logits, ids, tail_total) - log_norm
            target = logits.gather(-1, targets[start : start + len(h), None]).squeeze(-1)
            for part, value in zip(
                parts, (ids, values - log_norm[:, None], tail, target - log_norm)
            ):
                part.append(value.cpu())
        ids, lp, tail, target = (torch.cat(p) for p in parts)
        return ids.numpy(), lp.numpy(), tail.numpy(), target.numpy()


def _tail_logmass(logits: torch.Tensor, ids: torch.Tensor,
                  tail_total: torch.Tensor | None) -> torch.Tensor:
    """The log of each row's unnormalised mass outside its top-k `ids`; `tail_total` [V], if
    given, gains each row's tail normalised to 1. The masked copy of the chunk dies here, before
    the next chunk's logits exist."""
    tail_logits = logits.scatter(-1, ids, float("-inf"))
    tail_lognorm = tail_logits.logsumexp(-1, keepdim=True)
    if tail_total is not None:
        tail_total += tail_logits.sub_(tail_lognorm).exp_().sum(0).cpu()
    return tail_lognorm[:, 0]
