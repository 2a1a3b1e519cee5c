"""The store: round trip, resume after a crash and after kill -9, sharded workers, locks, keys."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from shard_kill import kill_when_paused
from transformers import AutoModelForCausalLM, AutoTokenizer

from akd_cache.cli import main
from akd_cache.config import CacheConfig, DataConfig, TeacherConfig
from akd_cache.data.instructions import Example
from akd_cache.data.tokenize import tokenize_split
from akd_cache.errors import ConfigError, DamageError, DataError, ModelError
from akd_cache.store import format as fmt
from akd_cache.store.inspect import describe
from akd_cache.store.key import CacheIngredients
from akd_cache.store.lock import CacheLockedError, WriterLock
from akd_cache.store.reader import CacheDataset, CacheError, TeacherCache, collate
from akd_cache.store.writer import IncompatibleCacheError, calibration_samples, fill, plan_shards
from akd_cache.teacher.build import make_ingredients
from akd_cache.teacher.hf_backend import HFTeacher
from akd_cache.teacher.identity import teacher_identity

K = 16
SHARD_ROWS = 600
N_SAMPLES = 40
TINY_HIDDEN = 64  # the tiny Llama's hidden size
# a sqrt(p) step of 1/CODE_MAX moves p by <= sqrt(p)/CODE_MAX + 1/(4 CODE_MAX^2), plus the
# small rescaling that makes top-k + tail sum to one
MAX_PROB_ERROR = 1.5 / fmt.CODE_MAX


@pytest.fixture(scope="module")
def setup(tiny_models, codealpaca_rows):
    model = str(tiny_models["llama"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = [
        Example(f"row-{i:06d}", r["instruction"], r["input"], r["output"])
        for i, r in enumerate(codealpaca_rows[:N_SAMPLES])
    ]
    cache_cfg = CacheConfig(k=K, shard_tokens=1024)
    split = tokenize_split(tokenizer, examples, cache_cfg)
    teacher_cfg = TeacherConfig(model=model)
    ingredients = make_ingredients(
        teacher=teacher_cfg, teacher_path=model, tokenizer=tokenizer,
        data=DataConfig(dataset="x.json"), dataset_sha256="0" * 64, samples=split.samples,
        cache=cache_cfg,
    )
    teacher = HFTeacher(model, k=K, batch_tokens=2048)
    return {"model": model, "tokenizer": tokenizer, "samples": split.samples,
            "ingredients": ingredients, "teacher": teacher, "reference": {}}


def build(location, setup, backend=None, ingredients=None, **kwargs) -> bool:
    """Fill a cache of the setup's samples (its ingredients, or `ingredients`)."""
    return fill(
        str(location), setup["samples"], ingredients or setup["ingredients"],
        len(setup["tokenizer"]), backend or (lambda: setup["teacher"]), shard_rows=SHARD_ROWS,
        **kwargs,
    )


def row_arrays(location) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(location), mode="r")
    return {name: group[f"rows/{name}"][:] for name in
            ("ids", "codes", "tail_logmass", "target_logprob")}


@pytest.fixture(scope="module")
def reference_cache(setup, tmp_path_factory):
    """An uninterrupted build; `setup["reference"]` records exactly what the writer was given."""
    location = tmp_path_factory.mktemp("ref") / "cache"

    class Recording:
        def score(self, samples):
            rows = setup["teacher"].score(samples)
            setup["reference"].update((s.sample_id, r) for s, r in zip(samples, rows))
            return rows

    assert build(location, setup, backend=lambda: Recording())
    return location


def test_round_trip_is_exact_for_ids_tail_and_target(setup, reference_cache):
    cache = TeacherCache(str(reference_cache))
    assert len(cache) == len(setup["samples"])
    for i, sample in enumerate(setup["samples"]):
        got, rows = cache[i], setup["reference"][sample.sample_id]
        assert got.sample_id == sample.sample_id
        assert got.input_ids.tolist() == sample.input_ids and got.prompt_len == sample.prompt_len
        # ids come back sorted by vocabulary rank: compare as sets, row by row, with values
        order_got, order_ref = np.argsort(got.topk_ids, 1), np.argsort(rows.topk_ids, 1)
        ids_got = np.take_along_axis(got.topk_ids, order_got, 1)
        np.testing.assert_array_equal(ids_got, np.take_along_axis(rows.topk_ids, order_ref, 1))
        np.testing.assert_array_equal(got.tail_logmass, rows.tail_logmass)
        np.testing.assert_array_equal(got.target_logprob, rows.target_logprob)
        p_got = np.exp(np.take_along_axis(got.topk_logprobs, order_got, 1))
        p_ref = np.exp(np.take_along_axis(rows.topk_logprobs, order_ref, 1))
        assert np.abs(p_got - p_ref).max() < MAX_PROB_ERROR
        total = p_got.sum(1) + np.exp(got.tail_logmass.astype(np.float64))
        np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_stored_distribution_is_close_in_kl(setup, reference_cache):
    cache = TeacherCache(str(reference_cache))
    kls = []
    for i, sample in enumerate(setup["samples"]):
        got, rows = cache[i], setup["reference"][sample.sample_id]
        order_got, order_ref = np.argsort(got.topk_ids, 1), np.argsort(rows.topk_ids, 1)
        p = np.exp(np.take_along_axis(rows.topk_logprobs, order_ref, 1).astype(np.float64))
        q = np.exp(np.take_along_axis(got.topk_logprobs, order_got, 1).astype(np.float64))
        kls.append((p * (np.log(p) - np.log(q))).sum(1))  # tails are stored exactly
    assert np.concatenate(kls).mean() < 1e-3


def test_collate_aligns_rows_with_the_positions_that_predict_them(setup, reference_cache):
    """The packed teacher rows [R, ...] follow `x[loss_mask]`'s order: row r of the batch is the
    row of the r-th loss position, sample by sample."""
    cache = TeacherCache(str(reference_cache))
    batch = collate([cache[i] for i in (3, 0, 7)])
    start = 0
    for b, i in enumerate((3, 0, 7)):
        sample = setup["samples"][i]
        positions = torch.nonzero(batch["loss_mask"][b]).squeeze(-1).tolist()
        assert positions == list(range(sample.prompt_len - 1, len(sample.input_ids) - 1))
        # the label at position j is token j + 1: the token the teacher row predicts
        labels = batch["labels"][b][batch["loss_mask"][b]].tolist()
        assert labels == sample.input_ids[sample.prompt_len :]
        rows = slice(start, start + sample.n_loss_rows)
        reference = setup["reference"][sample.sample_id]
        assert batch["tail_logmass"][rows].tolist() == reference.tail_logmass.tolist()
        assert (np.sort(batch["topk_ids"][rows].numpy(), 1)
                == np.sort(reference.topk_ids, 1)).all()
        np.testing.assert_array_equal(batch["topk_logprobs"][rows].numpy(),
                                      cache[i].topk_logprobs)
        start += sample.n_loss_rows
    assert start == batch["loss_mask"].sum().item() == len(batch["topk_ids"])
    assert batch["topk_ids"].dtype == torch.int32
    assert batch["attention_mask"].sum().item() == sum(
        len(setup["samples"][i].input_ids) for i in (3, 0, 7))
    loader = torch.utils.data.DataLoader(CacheDataset(cache), batch_size=4, collate_fn=collate)
    assert sum(b["loss_mask"].sum().item() for b in loader) == sum(
        s.n_loss_rows for s in setup["samples"])


def test_shards_hold_whole_samples():
    plan = plan_shards([5, 4, 3, 6, 1], shard_rows=8)
    assert plan.shard_of.tolist() == [0, 1, 1, 2, 2]
    assert plan.row_start.tolist() == [0, 8, 12, 16, 22]
    with pytest.raises(ValueError, match="more than shard_rows"):
        plan_shards([9], shard_rows=8)


class Crash(Exception):
    pass


def crashing_backend(teacher, calls_before_crash: int):
    state = {"calls": 0}

    class Backend:
        def score(self, samples):
            state["calls"] += 1
            if state["calls"] > calls_before_crash:
                raise Crash
            return teacher.score(samples)

    return lambda: Backend()


def test_resume_after_crash_equals_an_uninterrupted_run(setup, reference_cache, tmp_path):
    location = tmp_path / "cache"
    with pytest.raises(Crash):
        build(location, setup, backend=crashing_backend(setup["teacher"], 2))
    group = zarr.open_group(str(location), mode="r")
    done = group["shard_done"][:]
    assert 0 < done.sum() < len(done)
    with pytest.raises(CacheError, match=rf"^{location}: incomplete cache \({done.sum()} of "
                                         rf"{len(done)} shards\); resume the cache stage"):
        TeacherCache(str(location))
    assert len(TeacherCache(str(location), allow_incomplete=True)) == len(setup["samples"])
    # flags that do not decode still leave a one-line refusal
    flags = location / "shard_done" / "c" / "0"
    kept = flags.read_bytes()
    flags.write_bytes(bytes(b ^ 0xFF for b in kept))
    with pytest.raises(CacheError, match=rf"^{location}: incomplete cache \({len(done)} shards, "
                                         r"its shard_done flags unreadable\)"):
        TeacherCache(str(location))
    flags.write_bytes(kept)
    assert build(location, setup)
    for name, ref in row_arrays(reference_cache).items():
        np.testing.assert_array_equal(row_arrays(location)[name], ref, err_msg=name)


KILL_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from shard_kill import pause_after_first_shard
from akd_cache.store.key import CacheIngredients
from akd_cache.store.rows import TokenizedSample
from akd_cache.store.writer import fill
from akd_cache.teacher.hf_backend import HFTeacher

model, location, shard_rows, k, marker = sys.argv[1:]
spec = json.loads(Path(location + ".spec.json").read_text())
teacher = HFTeacher(model, k=int(k), batch_tokens=2048)
teacher.score = pause_after_first_shard(teacher.score, location, marker)
fill(location, [TokenizedSample(**s) for s in spec["samples"]],
     CacheIngredients(**spec["ingredients"]), spec["vocab_size"], lambda: teacher,
     shard_rows=int(shard_rows))
"""


def test_resume_after_kill_9_equals_an_uninterrupted_run(setup, reference_cache, tmp_path):
    import json
    from dataclasses import asdict

    location = str(tmp_path / "cache")
    Path(location + ".spec.json").write_text(json.dumps({
        "samples": [asdict(s) for s in setup["samples"]],
        "ingredients": setup["ingredients"].to_dict(),
        "vocab_size": len(setup["tokenizer"]),
    }))
    repo = Path(__file__).resolve().parents[1]
    marker = tmp_path / "paused"
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, setup["model"], location, str(SHARD_ROWS), str(K),
         str(marker)],
        cwd=repo, stderr=subprocess.DEVNULL,
    )
    kill_when_paused(child, marker)
    done = zarr.open_group(location, mode="r")["shard_done"][:]
    assert done.sum() == 1 and len(done) > 1, "the kill lands after the first shard"
    assert (Path(location) / "locks" / "worker-0-of-1.lock").exists()  # left by the dead writer
    assert build(location, setup)  # the stale lock is taken over
    for name, ref in row_arrays(reference_cache).items():
        np.testing.assert_array_equal(row_arrays(location)[name], ref, err_msg=name)


def test_workers_fill_disjoint_shards_then_finalize(setup, reference_cache, tmp_path):
    location = tmp_path / "cache"
    calls = []

    def counting():
        class Backend:
            def score(self, samples):
                calls.append([s.sample_id for s in samples])
                return setup["teacher"].score(samples)
        return Backend()

    assert not build(location, setup, backend=counting, worker_index=0, num_workers=2)
    calibration = calls.pop(0)  # the first writer calibrates the vocabulary renumbering
    assert calibration == [s.sample_id for s in calibration_samples(setup["samples"])]
    first = {sid for batch in calls for sid in batch}
    calls.clear()
    assert build(location, setup, backend=counting, worker_index=1, num_workers=2)
    second = {sid for batch in calls for sid in batch}
    assert first and second and not first & second
    assert first | second == {s.sample_id for s in setup["samples"]}
    assert TeacherCache(str(location)).meta.complete
    for name, ref in row_arrays(reference_cache).items():
        np.testing.assert_array_equal(row_arrays(location)[name], ref, err_msg=name)


def test_rerun_of_a_complete_cache_never_loads_the_teacher(setup, reference_cache):
    def never():
        raise AssertionError("the teacher was loaded for a complete cache")

    assert build(reference_cache, setup, backend=never)


def test_a_second_writer_is_refused(tmp_path):
    location = str(tmp_path / "cache")
    with WriterLock(location, "worker-0-of-1"):
        with (pytest.raises(CacheLockedError, match="another writer"),
              WriterLock(location, "worker-0-of-1")):
            pass
        with WriterLock(location, "worker-1-of-2"):
            pass


def test_a_location_is_tied_to_its_key(setup, reference_cache):
    other = replace(setup["ingredients"], k=K + 1)
    with pytest.raises(IncompatibleCacheError, match="tied to its key"):
        fill(str(reference_cache), setup["samples"], other, len(setup["tokenizer"]),
             lambda: setup["teacher"], shard_rows=SHARD_ROWS)


def test_a_resume_with_another_shard_size_continues_in_the_stored_one(
    setup, reference_cache, tmp_path, caplog
):
    """The shard size is no key ingredient: a run that asks for another one shares the cache,
    so it must write its shards in the stored layout, each sample's rows where the tables put
    them, and end equal to an uninterrupted build."""
    location = tmp_path / "cache"
    with pytest.raises(Crash):
        build(location, setup, backend=crashing_backend(setup["teacher"], 2))
    for other in (2 * SHARD_ROWS, SHARD_ROWS // 2):
        with caplog.at_level("WARNING"):
            assert fill(str(location), setup["samples"], setup["ingredients"],
                        len(setup["tokenizer"]), lambda: setup["teacher"], shard_rows=other)
        assert f"laid out in shards of {SHARD_ROWS} rows" in caplog.text
    assert TeacherCache(str(location)).meta.shard_rows == SHARD_ROWS
    for name, ref in row_arrays(reference_cache).items():
        np.testing.assert_array_equal(row_arrays(location)[name], ref, err_msg=name)


@pytest.mark.parametrize("shard_rows", [5000, 3 * fmt.INNER_CHUNK_ROWS + 1])
def test_a_shard_of_part_chunks_is_refused_before_anything_is_written(setup, tmp_path,
                                                                     shard_rows):
    location = tmp_path / "cache"
    with pytest.raises(ConfigError, match=rf"^cache.shard_tokens {shard_rows}: a shard holds "
                                          rf"whole chunks of {fmt.INNER_CHUNK_ROWS} rows"):
        fill(str(location), setup["samples"], setup["ingredients"], len(setup["tokenizer"]),
             lambda: setup["teacher"], shard_rows=shard_rows)
    assert not location.exists()


def test_no_samples_is_a_data_error_before_anything_is_written(setup, tmp_path):
    location = tmp_path / "cache"
    with pytest.raises(DataError, match=re.escape(f"{location}: no samples to cache; was every "
                                                  "one dropped by tokenisation")):
        fill(str(location), [], setup["ingredients"], len(setup["tokenizer"]),
             lambda: setup["teacher"], shard_rows=SHARD_ROWS)
    assert not location.exists()


@pytest.mark.parametrize(("make", "problem"), [
    (lambda path: None, "no teacher cache there"),
    (lambda path: path.mkdir(), "no teacher cache there"),
    (lambda path: zarr.open_group(str(path), mode="w"),
     f"not an akd-cache teacher cache (no '{fmt.ATTRS}' attrs)"),
], ids=["missing", "empty-folder", "group-without-attributes"])
def test_finalize_of_no_cache_is_one_line(tmp_path, capsys, monkeypatch, make, problem):
    location = tmp_path / "cache"
    make(location)
    monkeypatch.delenv("AKD_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["finalize", str(location)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"akd finalize: {location}: {problem}\n"


def test_key_changes_with_every_ingredient(setup):
    base = setup["ingredients"]
    changes = {"teacher_weights_sha256": "x", "tokenizer_sha256": "x", "dataset_sha256": "x",
               "template": "starcoder", "max_length": 256, "k": 8, "temperature": 2.0,
               "truncation": "drop", "heldout": 5, "teacher_revision": "abc",
               "tail_shape": True, "tail_rank": 8, "tail_code_fit": 1}
    keys = {replace(base, **{name: value}).key() for name, value in changes.items()}
    assert len(keys | {base.key()}) == len(changes) + 1


def test_a_local_teacher_is_named_by_its_path_and_by_its_weights(tiny_models, tmp_path):
    """What the README promises of a local teacher folder: a copy at another path keeps the
    weights checksum but not the name (Stage 2 checks a cache by name, without the teacher), and
    other weights at the same path change the checksum. The checksum is checked against a
    sha256 over the config and weight files written out by hand."""
    source = tiny_models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(source)
    copy = tmp_path / "moved"
    shutil.copytree(source, copy)

    def identity(folder: Path) -> dict:
        return teacher_identity(TeacherConfig(model=str(folder)), str(folder), tokenizer)

    original, moved = identity(source), identity(copy)
    by_hand = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        by_hand.update(name.encode() + (copy / name).read_bytes())
    assert original["teacher_weights_sha256"] == moved["teacher_weights_sha256"]
    assert moved["teacher_weights_sha256"] == by_hand.hexdigest()
    assert (original["teacher"], moved["teacher"]) == (str(source), str(copy))

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: other weights, same layout
    weights.write_bytes(bytes(data))
    reconverted = identity(copy)
    assert reconverted["teacher_weights_sha256"] != moved["teacher_weights_sha256"]
    assert {key: value for key, value in reconverted.items() if key != "teacher_weights_sha256"} \
        == {key: value for key, value in moved.items() if key != "teacher_weights_sha256"}


def test_key_of_fixed_ingredients_is_stable():
    """A key that moves orphans every existing cache, so the hashing is pinned. (Format 2 added
    checksums, format 3 the tail shape, format 4 the tail code and format 5 the tail code's fit:
    their caches get new keys by design, and the pin was moved with each, from
    c34ec87d2ed70a670211 at format 1.)"""
    ingredients = CacheIngredients(
        teacher="embedded:smollm2", teacher_revision=None, teacher_weights_sha256="a" * 64,
        teacher_dtype="float32", tokenizer_sha256="b" * 64, dataset_sha256="c" * 64,
        samples_sha256="d" * 64, split="train", heldout=100, split_seed=0, max_train_samples=96,
        template="alpaca_original", max_length=512, truncation="truncate_response", k=64,
        temperature=1.0, tail_shape=False,
    )
    assert ingredients.format_version == 5
    assert ingredients.key() == "391de1d0f9b941b77163"
    # what it is the hash of, spelled out: every ingredient, nothing else
    spelled = {
        "teacher": "embedded:smollm2", "teacher_revision": None, "teacher_weights_sha256": "a" * 64,
        "teacher_dtype": "float32", "tokenizer_sha256": "b" * 64, "dataset_sha256": "c" * 64,
        "samples_sha256": "d" * 64, "split": "train", "heldout": 100, "split_seed": 0,
        "max_train_samples": 96, "template": "alpaca_original", "max_length": 512,
        "truncation": "truncate_response", "k": 64, "temperature": 1.0, "tail_shape": False,
        "tail_rank": 0, "tail_code_fit": 2, "value_code_max": 100, "format_version": 5,
    }
    canonical = json.dumps(spelled, sort_keys=True).encode()
    assert ingredients.key() == hashlib.sha256(canonical).hexdigest()[:20]


def test_meta_is_the_one_schema_of_the_attributes(setup, reference_cache, tmp_path):
    """Written by the writer, read back typed by the reader and `akd inspect`; an attribute
    missing from a copy of the cache is named in the reader's error."""
    from akd_cache.store.inspect import describe

    cache = TeacherCache(str(reference_cache))
    meta = cache.meta
    n_rows = sum(s.n_loss_rows for s in setup["samples"])
    assert (meta.key, meta.k, meta.n_samples, meta.n_rows) == (
        setup["ingredients"].key(), K, len(setup["samples"]), n_rows)
    assert meta.ingredients == setup["ingredients"].to_dict()
    assert meta.stats.rows == n_rows == sum(meta.stats.tail_mass_log10_hist.counts)
    # the stats against each decoded row, by hand: the tail mass's decade (the first bin takes
    # everything below 1e-7), the top-k mass and the entropy of the top-k + tail buckets
    counts, topk_mass, entropy = [0] * 8, 0.0, 0.0
    for i in range(len(cache)):
        sample = cache[i]
        for lp, tail in zip(sample.topk_logprobs.astype(np.float64),
                            sample.tail_logmass.astype(np.float64)):
            mass = math.exp(tail)
            decade = math.floor(math.log10(mass)) if mass > 0 else -8
            counts[min(max(decade, -8), -1) + 8] += 1
            topk_mass += 1 - mass
            entropy -= sum(math.exp(v) * v for v in lp) + (mass * tail if mass > 0 else 0.0)
    assert meta.stats.tail_mass_log10_hist.counts == counts
    assert meta.stats.mean_topk_mass == pytest.approx(topk_mass / n_rows, rel=1e-9)
    assert meta.stats.mean_entropy_nat == pytest.approx(entropy / n_rows, rel=1e-9)
    text = describe(cache, [])
    assert f"key        {meta.key}  (complete)" in text
    assert f"tokens     {meta.n_tokens} in sequences, {n_rows} teacher rows" in text

    copy = tmp_path / "copy"
    shutil.copytree(reference_cache, copy)
    group = zarr.open_group(str(copy), mode="r+")
    damaged = dict(group.attrs[fmt.ATTRS])
    del damaged["complete"]
    group.attrs[fmt.ATTRS] = damaged
    with pytest.raises(CacheError, match="damaged 'akd_cache' attributes \\(complete: Field req"):
        TeacherCache(str(copy))


def test_reader_refuses_a_student_with_another_tokenizer(setup, reference_cache, tiny_models,
                                                         codealpaca_rows):
    from tiny_models import train_tokenizer

    cache = TeacherCache(str(reference_cache))
    cache.check_student(setup["tokenizer"], expected_key=setup["ingredients"].key())
    other = train_tokenizer([r["output"] for r in codealpaca_rows[:300]], vocab_size=400)
    with pytest.raises(CacheError, match="tokenizer"):
        cache.check_student(other)
    with pytest.raises(CacheError, match="differs from the expected"):
        cache.check_student(setup["tokenizer"], expected_key="0" * 20)


def test_fsspec_url_location(setup, reference_cache, tmp_path):
    url = f"file://{tmp_path}/remote-cache"
    assert build(url, setup)
    cache = TeacherCache(url)
    assert cache.key == setup["ingredients"].key()
    for name, ref in row_arrays(reference_cache).items():
        np.testing.assert_array_equal(row_arrays(url)[name], ref, err_msg=name)


def test_value_codec_on_a_hand_worked_row(monkeypatch):
    monkeypatch.setattr(fmt, "CODE_MAX", 100)
    # p = (0.81, 0.09, 0.0001), tail 0.0999: sqrt(p) * 100 = 90, 30, 1 exactly
    lp = np.log(np.array([[0.81, 0.09, 0.0001]]))
    tail = np.log(np.array([0.0999], dtype=np.float32))
    rank = np.arange(10, dtype=np.uint16)[::-1].copy()  # id 9 is rank 0
    enc = fmt.encode_rows(np.array([[2, 7, 5]]), lp, tail, np.zeros(1), rank)
    # ranks: id 2 -> 7, id 7 -> 2, id 5 -> 4; sorted ranks 2, 4, 7; deltas 2, 2, 3
    assert enc.ids.tolist() == [[2, 2, 3]]
    assert enc.codes.tolist() == [[30, 1, 90]]
    order = np.argsort(rank)
    assert fmt.decode_ids(enc.ids, order).tolist() == [[7, 5, 2]]
    p = np.exp(fmt.decode_logprobs(enc.codes, enc.tail_logmass).astype(np.float64))
    np.testing.assert_allclose(p[0], [0.09, 0.0001, 0.81], rtol=1e-6)


def test_vocab_rank_orders_by_calibration_top_k_then_data():
    topk = np.array([[3, 1], [3, 2]])
    tokens = np.array([0, 0, 0, 1, 4, 4])
    # top-k counts: 3 -> 2, 1 -> 1, 2 -> 1; data breaks the 1/2 tie (1 seen once, 2 never);
    # the rest by data count (0 thrice, 4 twice)
    assert fmt.vocab_rank(topk, tokens, 5).tolist() == [3, 1, 2, 0, 4]


def test_shard_shuffle_sampler_visits_every_sample_once_shard_by_shard(reference_cache):
    from akd_cache.store.reader import ShardShuffleSampler

    cache = TeacherCache(str(reference_cache))
    sampler = ShardShuffleSampler(cache, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(len(cache)))
    shards = cache.sample_shards[first]
    assert (np.diff(shards) != 0).sum() == len(np.unique(shards)) - 1  # one visit per shard
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)
    assert list(ShardShuffleSampler(cache, seed=1)) == first


def test_reads_spanning_chunk_boundaries(reference_cache, monkeypatch):
    whole = TeacherCache(str(reference_cache))
    expected = [whole[i] for i in range(len(whole))]
    small = TeacherCache(str(reference_cache))
    # force every sample's rows and tokens across several cached blocks
    small._block_sizes = dict.fromkeys(small._block_sizes, 7)
    small._block.cache_clear()
    for want, got in zip(expected, (small[i] for i in range(len(small)))):
        assert len(got.input_ids) > 7
        np.testing.assert_array_equal(want.input_ids, got.input_ids)
        np.testing.assert_array_equal(want.topk_ids, got.topk_ids)
        np.testing.assert_array_equal(want.topk_logprobs, got.topk_logprobs)
        np.testing.assert_array_equal(want.tail_logmass, got.tail_logmass)
        np.testing.assert_array_equal(want.target_logprob, got.target_logprob)


def test_dense_logprobs_is_the_top_k_plus_each_modes_tail(setup, reference_cache):
    cache = TeacherCache(str(reference_cache))
    vocab = cache.meta.vocab_size
    for i, sample in enumerate(setup["samples"][:3]):
        rows, got = setup["reference"][sample.sample_id], cache[i]
        uniform = cache.dense_logprobs(i, "uniform").astype(np.float64)
        assert uniform.shape == (sample.n_loss_rows, vocab)
        np.testing.assert_allclose(np.exp(uniform).sum(1), 1.0, atol=1e-5)
        p_ref = np.zeros((sample.n_loss_rows, vocab))
        np.put_along_axis(p_ref, rows.topk_ids, np.exp(rows.topk_logprobs), axis=1)
        on_top = p_ref > 0
        assert np.abs(np.exp(uniform) - p_ref)[on_top].max() < MAX_PROB_ERROR
        tail_each = np.exp(rows.tail_logmass.astype(np.float64)) / (vocab - K)
        np.testing.assert_allclose(np.where(on_top, 0.0, np.exp(uniform)),
                                   np.where(on_top, 0.0, tail_each[:, None]), rtol=1e-5)
        renormalized = np.exp(cache.dense_logprobs(i, "renormalize").astype(np.float64))
        assert not renormalized[~on_top].any()
        p_top = np.exp(got.topk_logprobs.astype(np.float64))
        np.testing.assert_allclose(np.take_along_axis(renormalized, got.topk_ids, 1),
                                   p_top / p_top.sum(1, keepdims=True), rtol=1e-5)
    with pytest.raises(ValueError, match="no full-vocabulary form"):
        cache.dense_logprobs(0, "bucket")


@pytest.fixture(scope="module")
def shape_cache(setup, tmp_path_factory):
    location = tmp_path_factory.mktemp("shape") / "cache"
    ingredients = replace(setup["ingredients"], tail_shape=True)
    assert build(location, setup, ingredients=ingredients)
    return location


def test_tail_shape_is_the_teachers_mean_tail_over_the_calibration_rows(setup, shape_cache):
    """Against the full softmax of each calibration sample run alone, in float64."""
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    total, rows = 0.0, 0
    for s in calibration_samples(setup["samples"]):
        with torch.no_grad():
            logits = model(torch.tensor([s.input_ids])).logits[0].double()
        p = logits.softmax(-1)[s.prompt_len - 1 : len(s.input_ids) - 1]
        tail = p.scatter(-1, p.topk(K, dim=-1).indices, 0.0)
        total = total + (tail / tail.sum(-1, keepdim=True)).sum(0)
        rows += len(p)
    vocab = len(setup["tokenizer"])
    expected = (1 - fmt.TAIL_SHAPE_UNIFORM_MIX) * (total / rows).numpy() + \
        fmt.TAIL_SHAPE_UNIFORM_MIX / vocab
    cache = TeacherCache(str(shape_cache))
    assert cache.log_tail_shape.shape == (vocab,)
    np.testing.assert_allclose(np.exp(cache.log_tail_shape.astype(np.float64)), expected,
                               rtol=1e-4)


@pytest.mark.parametrize("tail", [{"tail_shape": True}, {"tail_rank": 8},
                                  {"tail_shape": True, "tail_rank": 8}])
def test_a_modelled_tail_cache_calibrates_in_one_teacher_pass(setup, tmp_path, monkeypatch,
                                                              tail):
    """The vocabulary order, the tail shape and the tail code come from one pass over the
    calibration samples: each of them meets the teacher twice in all (again in its shard), the
    rest once."""
    seen: Counter[str] = Counter()
    row_hidden = HFTeacher._row_hidden

    def counting(self, samples):
        seen.update(s.sample_id for s in samples)
        return row_hidden(self, samples)

    monkeypatch.setattr(HFTeacher, "_row_hidden", counting)
    monkeypatch.setattr(fmt, "CALIBRATION_ROWS", sum(s.n_loss_rows for s in setup["samples"]) // 3)
    assert build(tmp_path / "c", setup, ingredients=replace(setup["ingredients"], **tail))
    cache = TeacherCache(str(tmp_path / "c"))
    assert (cache.log_tail_shape is not None) == ("tail_shape" in tail)
    assert (cache.tail_code is not None) == ("tail_rank" in tail)
    calibration = {s.sample_id for s in calibration_samples(setup["samples"])}
    assert 0 < len(calibration) < len(setup["samples"])
    assert seen == {s.sample_id: 2 if s.sample_id in calibration else 1 for s in setup["samples"]}


def test_dense_shape_mode_spreads_the_exact_tail_by_the_shape(setup, shape_cache,
                                                              reference_cache):
    cache = TeacherCache(str(shape_cache))
    shape = np.exp(cache.log_tail_shape.astype(np.float64))
    for i in range(3):
        got = cache[i]
        dense = np.exp(cache.dense_logprobs(i, "shape").astype(np.float64))
        np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(dense, got.topk_ids, 1),
                                   np.exp(got.topk_logprobs.astype(np.float64)), rtol=1e-5)
        outside = np.ones_like(dense, dtype=bool)
        np.put_along_axis(outside, got.topk_ids, False, axis=1)
        w_out = np.where(outside, shape, 0.0).sum(1)
        want = np.exp(got.tail_logmass.astype(np.float64))[:, None] * shape / w_out[:, None]
        np.testing.assert_allclose(dense[outside], want[outside], rtol=1e-4)
    with pytest.raises(CacheError, match="no tail shape"):
        TeacherCache(str(reference_cache)).dense_logprobs(0, "shape")


@pytest.mark.parametrize("setting,value", [("tail_shape", True), ("tail_rank", 8)])
def test_a_modelled_tail_needs_a_backend_that_sees_more_than_the_top_k(setup, tmp_path,
                                                                       setting, value):
    """The tail shape needs the whole distribution, the tail code the hidden states."""
    class TopKOnly:
        def score(self, samples):
            return setup["teacher"].score(samples)

    ingredients = replace(setup["ingredients"], **{setting: value})
    with pytest.raises(ConfigError, match=f"cache.{setting}: the TopKOnly teacher backend"):
        build(tmp_path / "c", setup, lambda: TopKOnly(), ingredients=ingredients)


def test_a_damaged_tail_shape_is_reported_and_not_guessed(setup, shape_cache, tmp_path):
    location = tmp_path / "cache"
    shutil.copytree(shape_cache, location)
    chunk = next(p for p in (location / fmt.TAIL_SHAPE / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DamageError, match="tail_shape"):
        TeacherCache(str(location))
    ingredients = replace(setup["ingredients"], tail_shape=True)
    with pytest.raises(DamageError, match="cannot be rewritten exactly"):
        build(location, setup, ingredients=ingredients)


@pytest.fixture(scope="module")
def code_cache(setup, tmp_path_factory):
    """A cache with a full-rank tail code: the tiny teacher's hidden size is 64."""
    location = tmp_path_factory.mktemp("code") / "cache"
    ingredients = replace(setup["ingredients"], tail_rank=TINY_HIDDEN)
    assert build(location, setup, ingredients=ingredients)
    return location


def final_hidden_and_logits(model, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample alone, float64 from float32: the final hidden states and logits of its loss
    rows, from the model's own forward."""
    with torch.no_grad():
        out = model(torch.tensor([sample.input_ids]), output_hidden_states=True)
    rows = slice(sample.prompt_len - 1, len(sample.input_ids) - 1)
    return out.hidden_states[-1][0, rows].double(), out.logits[0, rows].double()


def test_tail_code_rebuilds_the_teachers_logits_and_loses_less_with_each_rank(setup):
    """At full rank, bias + basis z is the teacher's logits W h; at lower ranks the error shrinks
    as the rank grows, and the principal directions beat random ones of the same rank."""
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    calibration = calibration_samples(setup["samples"])
    rows = [final_hidden_and_logits(model, s) for s in setup["samples"][:6]]
    hidden = torch.cat([h for h, _ in rows])
    logits = torch.cat([lg for _, lg in rows])
    errors = {}
    for rank in (4, 16, TINY_HIDDEN):
        code = setup["teacher"].calibrate(calibration, False, rank).tail_code
        assert code.basis.shape == (len(setup["tokenizer"]), rank)
        mean, encoder, basis, bias = (torch.from_numpy(a).double() for a in
                                      (code.mean, code.encoder, code.basis, code.bias))
        rebuilt = bias + (hidden - mean) @ encoder @ basis.T
        errors[rank] = (rebuilt - logits).pow(2).mean().item()
    assert errors[TINY_HIDDEN] < 1e-8 * logits.var().item()
    assert errors[16] < errors[4] < logits.var().item()
    random_dirs = torch.linalg.qr(torch.randn(TINY_HIDDEN, 16, dtype=torch.float64))[0]
    weight = model.get_output_embeddings().weight.detach().double()
    centred = hidden - hidden.mean(0)
    random_error = (centred @ (torch.eye(TINY_HIDDEN, dtype=torch.float64)
                               - random_dirs @ random_dirs.T) @ weight.T).pow(2).mean().item()
    assert errors[16] < random_error
    with pytest.raises(ModelError, match="tail_rank 65 is not in"):
        setup["teacher"].calibrate(calibration, False, TINY_HIDDEN + 1)


def tail_kl(logits: torch.Tensor, rebuilt: torch.Tensor, k: int) -> float:
    """Mean over rows of the teacher's tail mass times KL(its tail || softmax of the rebuilt
    logits over the same ids), float64: what the tail code costs a row."""
    log_p = logits.log_softmax(-1)
    top = log_p.topk(k, dim=-1).indices
    tail = log_p.scatter(-1, top, float("-inf"))
    log_q = rebuilt.scatter(-1, top, float("-inf")).log_softmax(-1)
    tail_norm = tail - tail.logsumexp(-1, keepdim=True)
    terms = tail.exp() * (tail_norm - log_q)
    return torch.where(tail.isfinite(), terms, 0.0).sum(-1).mean().item()


# the random tiny teacher's logits have an RMS of 1.6: at this temperature 5.4, and its top 16
# hold about 98 % of the mass, as a trained model's top-k do
SHARP_TEMPERATURE = 0.3


def test_tail_code_is_fitted_to_the_tails_kl_not_the_logits(setup):
    """At the same rank the stored code's tails are closer to the teacher's than those of the
    plain principal directions of the logits (an SVD of the [rows, V] logits themselves), which
    are what a least-squares fit of the logits would keep."""
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    calibration = calibration_samples(setup["samples"])
    rows = [final_hidden_and_logits(model, s) for s in calibration]
    hidden = torch.cat([h for h, _ in rows])
    logits = torch.cat([lg for _, lg in rows]) / SHARP_TEMPERATURE
    rank = 8
    teacher = HFTeacher(setup["model"], k=K, temperature=SHARP_TEMPERATURE)
    code = teacher.calibrate(calibration, False, rank).tail_code
    mean, encoder, basis, bias = (torch.from_numpy(a).double() for a in
                                  (code.mean, code.encoder, code.basis, code.bias))
    fitted = tail_kl(logits, bias + (hidden - mean) @ encoder @ basis.T, K)
    centre = logits.mean(0)
    _, _, vt = torch.linalg.svd(logits - centre, full_matrices=False)
    plain = tail_kl(logits, centre + (logits - centre) @ vt[:rank].T @ vt[:rank], K)
    assert fitted < 0.8 * plain, (fitted, plain)


def test_inspect_names_the_tail_code(code_cache, reference_cache):
    assert "tail code of rank 64 stored" in describe(TeacherCache(str(code_cache)), [])
    assert "tail code" not in describe(TeacherCache(str(reference_cache)), [])


def test_tail_code_cache_stores_each_rows_quantised_code(setup, code_cache):
    """The stored codes are the rows' hidden states through the stored encoder, to half a step,
    and the row arrays every other cache has are unchanged by the code."""
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    cache = TeacherCache(str(code_cache))
    code = cache.tail_code
    for i in (0, 7, len(cache) - 1):
        hidden, _ = final_hidden_and_logits(model, setup["samples"][i])
        want = (hidden.numpy() - code.mean) @ code.encoder / code.step
        got = cache[i].tail_code / code.step
        assert np.abs(got - want).max() <= 0.5 + 1e-3
    assert cache[3].tail_code.shape == (setup["samples"][3].n_loss_rows, TINY_HIDDEN)
    batch = collate([cache[i] for i in range(3)])
    assert batch["tail_code"].shape == (batch["loss_mask"].sum(), TINY_HIDDEN)
    np.testing.assert_array_equal(batch["tail_code"].numpy(),
                                  np.concatenate([cache[i].tail_code for i in range(3)]))


def test_dense_lowrank_mode_is_the_teacher_to_quantisation(setup, code_cache, shape_cache):
    """KL(full teacher || dense) per row, against the teacher run alone in float64: the full-rank
    tail code is far closer than the uniform and the shape tails, and keeps the exact top-k and
    tail mass."""
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    coded, shaped = TeacherCache(str(code_cache)), TeacherCache(str(shape_cache))
    kl = {"lowrank": [], "uniform": [], "shape": []}
    for i in range(len(coded) - 6, len(coded)):  # rows after the calibration rows
        _, logits = final_hidden_and_logits(model, setup["samples"][i])
        log_p = logits.log_softmax(-1).numpy()
        for mode, cache in (("lowrank", coded), ("uniform", coded), ("shape", shaped)):
            dense = cache.dense_logprobs(i, mode).astype(np.float64)
            kl[mode].append((np.exp(log_p) * (log_p - dense)).sum(1))
        got = coded[i]
        dense = np.exp(coded.dense_logprobs(i, "lowrank").astype(np.float64))
        np.testing.assert_allclose(np.take_along_axis(dense, got.topk_ids, 1),
                                   np.exp(got.topk_logprobs.astype(np.float64)), rtol=1e-5)
        np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-5)
    mean = {mode: np.concatenate(values).mean() for mode, values in kl.items()}
    assert mean["lowrank"] < 0.1 * min(mean["uniform"], mean["shape"]), mean
    with pytest.raises(CacheError, match="no tail code"):
        shaped.dense_logprobs(0, "lowrank")


def test_a_damaged_tail_code_shard_is_recomputed_and_a_damaged_basis_refused(
        setup, code_cache, tmp_path):
    ingredients = replace(setup["ingredients"], tail_rank=TINY_HIDDEN)
    location = tmp_path / "cache"
    shutil.copytree(code_cache, location)
    shard = location / "rows" / fmt.TAIL_CODE / "c" / "0" / "0"  # the first samples' rows
    original = shard.read_bytes()
    middle = len(original) // 2
    shard.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF])
                      + original[middle + 1 :])
    with pytest.raises(DamageError, match="rows/tail_code"):
        TeacherCache(str(location))[0]
    assert build(location, setup, ingredients=ingredients)
    assert shard.read_bytes() == original
    basis = next(p for p in (location / fmt.TAIL_CODE / "basis" / "c").rglob("*") if p.is_file())
    basis.write_bytes(basis.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DamageError, match="cannot be rewritten exactly"):
        build(location, setup, ingredients=ingredients)


def test_a_cache_of_an_older_format_is_refused_by_its_version_not_called_damage(
        reference_cache, tmp_path):
    """A format-4 cache has no `tail_code_fit` ingredient: the reader names the format, with what
    to do, instead of reporting the missing ingredient as damage."""
    location = tmp_path / "cache"
    shutil.copytree(reference_cache, location)
    group = zarr.open_group(str(location), mode="r+")
    attrs = dict(group.attrs[fmt.ATTRS])
    ingredients = {name: value for name, value in attrs["ingredients"].items()
                   if name != "tail_code_fit"}
    attrs["ingredients"] = {**ingredients, "format_version": 4}
    group.attrs[fmt.ATTRS] = attrs
    with pytest.raises(CacheError, match="a format-4 cache; this akd reads format 5: run "
                                         "`akd cache-teacher` to build it anew"):
        TeacherCache(str(location))
