"""Damaged caches and caches that are not the ones asked for, as a user meets them through `akd`:
every damage is one line naming the array, the shard file and the samples (exit code 2),
nothing trains on it, and `akd cache-teacher` rewrites exactly what is damaged, bit for bit.

One cache is built once (tiny Llama teacher, 32 samples, several shards); each test damages a
copy of the whole working folder (params, prepared data, runs/, the cache under `cache/`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from akd_cache.cli import main
from akd_cache.store.format import ROW_ARRAYS

N_TRAIN = 32
SHARD_TOKENS = 1024
DAMAGED_SHARD = 1
FLIPPED_BYTES = 8
ATTRS = "akd_cache"


def write_params(folder: Path, dataset: Path, model: str, cache: dict | None = None,
                 train: dict | None = None) -> None:
    doc = {"profile": "mini", "profiles": {"mini": {
        "data": {"dataset": str(dataset), "heldout": 2, "max_train_samples": N_TRAIN},
        "teacher": {"model": model},
        "student": {"model": model},
        "cache": {"k": 8, "shard_tokens": SHARD_TOKENS, "root": "cache", **(cache or {})},
        "train": {"batch_size": 8, "save_steps": 1000, **(train or {})},
    }}, "experiments": {"kd": {"method": "kd"}}}
    (folder / "params.yaml").write_text(yaml.safe_dump(doc))


@pytest.fixture(scope="module")
def built(tiny_models, codealpaca_path, tmp_path_factory) -> Path:
    """A working folder after `akd prepare` and `akd cache-teacher`: the undamaged reference."""
    folder = tmp_path_factory.mktemp("built")
    write_params(folder, codealpaca_path, str(tiny_models["llama"]))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        main(["prepare"])
        main(["cache-teacher"])
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def work(built, tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "work"
    shutil.copytree(built, folder)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("AKD_DEBUG", raising=False)
    return folder


def location() -> str:
    return json.loads(Path("runs/teacher_cache.json").read_text())["location"]


def failing_akd(capsys, *argv: str) -> tuple[int, str, str]:
    """`akd argv...` in-process, expected to fail: its exit code, its one error line (which may
    follow a progress bar that the error interrupted) and its stdout."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    prefix = f"akd {argv[0]}: "
    lines = [line[line.index(prefix):] for line in err.splitlines() if prefix in line]
    assert len(lines) == 1, err
    return exit_info.value.code, lines[0], out


def akd(capsys, *argv: str) -> tuple[int, str]:
    return failing_akd(capsys, *argv)[:2]


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + FLIPPED_BYTES):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def shard_samples(cache: str, shard: int) -> str:
    """The samples whose rows are in `shard`, straight from the stored table."""
    row_start = zarr.open_group(cache, mode="r")["samples/row_start"][:]
    members = np.flatnonzero(row_start // SHARD_TOKENS == shard)
    assert len(members) and (np.diff(members) == 1).all()
    return f"samples {members[0]}-{members[-1]}"


def files(cache: str) -> dict[str, bytes]:
    root = Path(cache)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "locks" not in p.relative_to(root).parts}


def edit_attrs(cache: str, edit) -> None:
    group = zarr.open_group(cache, mode="r+")
    attrs = json.loads(json.dumps(group.attrs[ATTRS]))
    edit(attrs)
    group.attrs[ATTRS] = attrs


def assert_repaired_bit_for_bit(built: Path, cache: str, capsys) -> None:
    main(["cache-teacher"])
    assert files(cache) == files(str(built / cache))
    capsys.readouterr()
    main(["verify", cache])
    assert capsys.readouterr().out.strip().endswith("its checksums valid)")


# --- §2 damaged shards and attributes ------------------------------------------------------


def test_flipped_bytes_in_a_tail_logmass_shard(work, built, capsys):
    cache = location()
    samples = shard_samples(cache, DAMAGED_SHARD)
    flip(Path(cache) / "rows" / "tail_logmass" / "c" / str(DAMAGED_SHARD))
    named = (f"{cache}: array rows/tail_logmass, file rows/tail_logmass/c/{DAMAGED_SHARD} "
             f"({samples}): fails its crc32c checksum")
    code, line = akd(capsys, "verify", cache)
    assert code == 2 and line.startswith(f"akd verify: {named}")
    assert line.endswith("run `akd cache-teacher` to rewrite it "
                         f"(`akd verify {cache}` lists all damage)")
    code, line = akd(capsys, "train", "--experiment", "kd")
    assert code == 2 and line.startswith(f"akd train: {named}")
    assert not Path("runs/train/kd/metrics.json").exists()
    assert_repaired_bit_for_bit(built, cache, capsys)


def test_a_deleted_ids_shard(work, built, capsys):
    cache = location()
    samples = shard_samples(cache, DAMAGED_SHARD)
    (Path(cache) / "rows" / "ids" / "c" / str(DAMAGED_SHARD) / "0").unlink()
    named = (f"{cache}: array rows/ids, file rows/ids/c/{DAMAGED_SHARD}/0 ({samples}): missing "
             "(it would read as fill values)")
    code, line, out = failing_akd(capsys, "inspect", cache)
    assert code == 2 and line.startswith(f"akd inspect: {named}")
    assert f"files      DAMAGED: 1 found; run `akd verify {cache}`" in out
    for argv in (["verify", cache], ["train", "--experiment", "kd"]):
        code, line = akd(capsys, *argv)
        assert code == 2 and line.startswith(f"akd {argv[0]}: {named}")
    assert_repaired_bit_for_bit(built, cache, capsys)


def test_flipped_bytes_in_an_ids_shard(work, built, capsys):
    cache = location()
    samples = shard_samples(cache, DAMAGED_SHARD)
    flip(Path(cache) / "rows" / "ids" / "c" / str(DAMAGED_SHARD) / "0")
    named = (f"{cache}: array rows/ids, file rows/ids/c/{DAMAGED_SHARD}/0 ({samples}): fails "
             "its crc32c checksum")
    for argv in (["verify", cache], ["train", "--experiment", "kd"]):
        code, line = akd(capsys, *argv)
        assert code == 2 and line.startswith(f"akd {argv[0]}: {named}")
    assert_repaired_bit_for_bit(built, cache, capsys)


def test_empty_row_shard_files(work, built, capsys):
    """zarr reads an empty shard file as fill values, silently: all-zero codes would train."""
    cache = location()
    emptied = {"rows/codes/c/0/0": 0, "rows/ids/c/2/0": 2}
    for file in emptied:
        (Path(cache) / file).write_bytes(b"")
    named = (f"{cache}: array rows/ids, file rows/ids/c/2/0 ({shard_samples(cache, 2)}): "
             "truncated to 0 B (a stored file of this array holds at least 20 B) (and 1 more)")
    code, line, out = failing_akd(capsys, "inspect", cache)
    assert code == 2 and line.startswith(f"akd inspect: {named}")
    assert f"files      DAMAGED: 2 found; run `akd verify {cache}`" in out
    code, line, out = failing_akd(capsys, "verify", cache)
    assert code == 2 and line.startswith(f"akd verify: {named}")
    for file, shard in emptied.items():
        assert f"file {file} ({shard_samples(cache, shard)}): truncated to 0 B" in out
    code, line = akd(capsys, "train", "--experiment", "kd")
    assert code == 2 and line.startswith(f"akd train: {named}")
    assert not Path("runs/train/kd/metrics.json").exists()
    # the undamaged shards 1 and 3 stay done: their files are not even written again
    kept = {path: path.stat().st_mtime_ns for path in Path(cache, "rows").rglob("*")
            if path.is_file() and path.relative_to(cache).parts[2:4] in (("c", "1"), ("c", "3"))}
    assert len(kept) == len(ROW_ARRAYS) * 2
    assert_repaired_bit_for_bit(built, cache, capsys)
    assert {path: path.stat().st_mtime_ns for path in kept} == kept


@pytest.mark.parametrize("file", ["zarr.json", "rows/ids/zarr.json"])
def test_a_torn_zarr_json_is_refused(work, capsys, file):
    """A torn write of metadata: nothing can rewrite it exactly, so every command refuses the
    cache in one line and `cache-teacher` leaves every file as it is."""
    cache = location()
    path = Path(cache) / file
    path.write_bytes(path.read_bytes()[:40])
    before = files(cache)
    named = (f"{cache}: file zarr.json (the cache's attributes): does not decode (JSONDecodeError"
             if file == "zarr.json" else
             f"{cache}: array rows/ids, file rows/ids/zarr.json (all samples): does not decode "
             "(JSONDecodeError")
    for argv in (["inspect", cache], ["verify", cache], ["train", "--experiment", "kd"],
                 ["cache-teacher"]):
        code, line = akd(capsys, *argv)
        assert code == 2 and line.startswith(f"akd {argv[0]}: {named}")
        assert line.endswith(f"this cannot be rewritten exactly: move {cache} away and run "
                             "`akd cache-teacher` again")
    assert files(cache) == before


def test_inspect_of_a_folder_whose_zarr_json_is_not_json(tmp_path, capsys):
    (tmp_path / "zarr.json").write_text("not json")
    code, line = akd(capsys, "inspect", str(tmp_path))
    assert code == 2 and line.startswith(f"akd inspect: {tmp_path}: file zarr.json (the cache's "
                                         "attributes): does not decode (JSONDecodeError")


def test_a_missing_rows_group(work, capsys):
    cache = location()
    shutil.rmtree(Path(cache) / "rows")
    before = files(cache)
    named = f"{cache}: array rows/ids, file rows/ids/zarr.json (all samples): array missing"
    for argv in (["inspect", cache], ["verify", cache], ["train", "--experiment", "kd"],
                 ["cache-teacher"]):
        code, line = akd(capsys, *argv)
        assert code == 2 and line.startswith(f"akd {argv[0]}: {named}")
    assert files(cache) == before


def test_a_removed_completion_attribute(work, built, capsys):
    cache = location()
    edit_attrs(cache, lambda attrs: attrs.pop("complete"))
    message = (f"{cache}: damaged 'akd_cache' attributes (complete: Field required); run "
               "`akd cache-teacher` to restore them")
    for argv in (["inspect", cache], ["verify", cache], ["train", "--experiment", "kd"]):
        assert akd(capsys, *argv) == (2, f"akd {argv[0]}: {message}")
    assert_repaired_bit_for_bit(built, cache, capsys)


def test_an_undamaged_cache_verifies(work, capsys):
    cache = location()
    capsys.readouterr()
    main(["verify", cache])
    out = capsys.readouterr().out
    assert out.startswith(f"{cache}: ok (complete; key {Path(cache).name} re-derived")
    main(["inspect", cache])
    assert "files      all present" in capsys.readouterr().out


# --- §3 the cache's identity ---------------------------------------------------------------


def test_an_edited_key_attribute(work, built, capsys):
    cache = location()
    key = Path(cache).name
    edit_attrs(cache, lambda attrs: attrs.update(key="0" * len(key)))
    code, line = akd(capsys, "train", "--experiment", "kd")
    assert code == 2
    assert line == (f"akd train: {cache}: attribute key {'0' * len(key)} is not the key of the "
                    f"stored ingredients ({key}): the key or an ingredient was edited; run "
                    "`akd cache-teacher` to restore them")
    assert_repaired_bit_for_bit(built, cache, capsys)


def test_an_edited_ingredient(work, built, capsys):
    """The stored key still matches the params: `cache-teacher` used to accept the cache as is."""
    cache = location()
    edit_attrs(cache, lambda attrs: attrs["ingredients"].update(template="starcoder"))
    code, line = akd(capsys, "train", "--experiment", "kd")
    assert code == 2 and line.startswith(f"akd train: {cache}: attribute key {Path(cache).name} "
                                         "is not the key of the stored ingredients")
    assert_repaired_bit_for_bit(built, cache, capsys)


def test_training_refuses_a_cache_the_params_would_not_produce(work, codealpaca_path,
                                                               tiny_models, capsys):
    cache = location()
    write_params(work, codealpaca_path, str(tiny_models["llama"]), cache={"template": "starcoder"})
    assert akd(capsys, "train", "--experiment", "kd") == (2, (
        f"akd train: {cache}: the cache was built with cache.template='alpaca', the params say "
        "'starcoder'; run `akd cache-teacher` for the current params"
    ))
    write_params(work, codealpaca_path, str(tiny_models["llama"]))
    pointer = json.loads(Path("runs/teacher_cache.json").read_text())
    Path("runs/teacher_cache.json").write_text(json.dumps({**pointer, "key": "f" * 20}))
    assert akd(capsys, "train", "--experiment", "kd") == (2, (
        f"akd train: {cache}: cache key {Path(cache).name} differs from the expected "
        f"{'f' * 20}; run `akd cache-teacher` for the current params"
    ))


def test_a_training_temperature_the_cache_does_not_have(work, codealpaca_path, tiny_models,
                                                        capsys):
    model = str(tiny_models["llama"])
    write_params(work, codealpaca_path, model, train={"temperature": 2.0})
    code, line = akd(capsys, "train", "--experiment", "kd")
    assert code == 2 and line.startswith(
        f"akd train: train.temperature=2.0 differs from the temperature of the cache "
        f"{location()} (T = 1.0)")
    write_params(work, codealpaca_path, model, train={"temper_cache": True})
    code, line = akd(capsys, "train", "--experiment", "kd")
    assert code == 2 and "temper_cache tempers a T = 1 cache to train.temperature" in line
    write_params(work, codealpaca_path, model, train={"temperature": 2.0, "temper_cache": True})
    main(["train", "--experiment", "kd"])
    assert json.loads(Path("runs/train/kd/metrics.json").read_text())["steps"] > 0


def test_tempered_rows_keep_ratios_and_sum_to_one(work):
    from akd_cache.config import KD, TrainConfig
    from akd_cache.errors import ConfigError
    from akd_cache.store.reader import TeacherCache
    from akd_cache.student.cache_data import cache_dataset

    temperature = 2.0
    cache = TeacherCache(location())
    tempered = cache_dataset(cache, KD(), TrainConfig(temperature=temperature, temper_cache=True))
    for index in (0, len(cache) - 1):
        raw, hot = cache[index], tempered[index]
        lp, tail = hot.topk_logprobs.astype(np.float64), hot.tail_logmass.astype(np.float64)
        total = np.exp(lp).sum(1) + np.exp(tail)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
        ratios = lp - lp[:, :1]
        expected = (raw.topk_logprobs - raw.topk_logprobs[:, :1]) / temperature
        np.testing.assert_allclose(ratios, expected, atol=1e-4)
        assert (tail >= raw.tail_logmass).all()  # flatter: more mass in the tail
    # tempering a cache that is not at T = 1 does not apply
    cache.meta.ingredients["temperature"] = 2.0
    with pytest.raises(ConfigError, match="tempers a T = 1 cache, and .* is at T = 2.0"):
        cache_dataset(cache, KD(), TrainConfig(temperature=3.0, temper_cache=True))
