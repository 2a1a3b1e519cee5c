"""Instruction data: schemas, bad rows counted and reported, a deterministic split, hashing."""

import json

import pytest
import yaml
from transformers import AutoTokenizer

from akd_cache import jsonl
from akd_cache.cli import main as akd
from akd_cache.config import DataConfig
from akd_cache.data.instructions import BadRow, Example, drop_summary, prepare
from akd_cache.data.tokenize import tokenize_example
from akd_cache.errors import DataError

GOOD = [{"instruction": f"Task {i}", "input": "", "output": f"print({i})"} for i in range(20)]


def write_json(tmp_path, rows, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


def test_bad_rows_are_dropped_with_a_reason_and_the_run_goes_on(tmp_path):
    bad = [
        {"instruction": "no output"},
        {"instruction": "x", "input": "", "output": 5},
        {"instruction": "x", "input": "", "output": "   "},
        {"instruction": "", "input": "", "output": "y"},
        "not an object",
        dict(GOOD[0]),
    ]
    data = prepare(DataConfig(dataset=write_json(tmp_path, GOOD + bad), heldout=2))
    reasons = {d.sample_id: d.reason for d in data.dropped}
    assert reasons == {
        "row-000020": "missing field 'output'",
        "row-000021": "field 'output' is a int, not a string",
        "row-000022": "empty output",
        "row-000023": "empty instruction",
        "row-000024": "row is a str, not an object",
        "row-000025": "duplicate of an earlier row",
    }
    assert len(data.train) + len(data.heldout) == len(GOOD)
    assert drop_summary(data.dropped, data.n_rows).startswith("dropped 6 of 26 rows")


def test_write_json_replaces_a_whole_ascii_document(tmp_path):
    """Indented with sorted keys, non-ASCII escaped (any locale reads it), no temp file left."""
    path = tmp_path / "out" / "m.json"
    path.parent.mkdir()
    path.write_text("old")
    jsonl.write_json(path, {"b": "é", "a": [1]})
    assert path.read_bytes() == b'{\n  "a": [\n    1\n  ],\n  "b": "\\u00e9"\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
    jsonl.write_json(tmp_path / "new" / "n.json", [])  # the folder is made
    assert json.loads((tmp_path / "new" / "n.json").read_text()) == []


def test_unparsable_jsonl_line_is_one_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in GOOD[:5]] + ["{oops"]) + "\n")
    data = prepare(DataConfig(dataset=str(path), heldout=1))
    assert [d.reason.split(" (")[0] for d in data.dropped] == ["unparsable JSON"]


def test_a_row_holding_a_unicode_line_separator_is_one_good_row(tmp_path):
    """JSON leaves U+2028 / U+2029 / U+0085 unescaped; str.splitlines() would split there."""
    rows = [dict(r) for r in GOOD[:4]]
    rows[1]["output"] = "a = 1\u2028b = 2\u2029c = 3\x85"
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows))
    data = prepare(DataConfig(dataset=str(path), heldout=1))
    assert data.dropped == [] and data.n_rows == 4
    assert rows[1]["output"] in [e.output for e in data.train + data.heldout]


def run_prepare(tmp_path, monkeypatch, data: dict) -> None:
    """`akd prepare` as a user runs it: a params file in the working directory."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profile": "t", "profiles": {"t": {
        "data": data, "teacher": {"model": "embedded:smollm2"},
        "student": {"model": "storage/models/student"},
    }}}))
    monkeypatch.chdir(tmp_path)
    akd(["prepare", "--params", "params.yaml"])


def prepare_refused(tmp_path, monkeypatch, capsys, data: dict) -> str:
    """The one line `akd prepare` prints when it refuses the data (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_prepare(tmp_path, monkeypatch, data)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def dropped_rows(tmp_path) -> list[dict]:
    path = tmp_path / "data" / "prepared" / "dropped.jsonl"
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


def test_cli_drops_a_jsonl_row_with_a_non_utf8_byte_and_lists_it(tmp_path, monkeypatch):
    lines = [json.dumps(r).encode() for r in GOOD[:6]]
    lines[2] = lines[2].replace(b"Task 2", b"Task \xe9")  # latin-1 e-acute: not UTF-8
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    run_prepare(tmp_path, monkeypatch, {"dataset": "d.jsonl", "heldout": 1})
    column = lines[2].index(b"\xe9") + 1
    assert dropped_rows(tmp_path) == [{
        "sample_id": "row-000002", "stage": "prepare",
        "reason": f"not UTF-8 (byte 0xe9 at column {column}), line 3",
    }]
    summary = json.loads((tmp_path / "data" / "prepared" / "summary.json").read_text())
    assert (summary["train"], summary["heldout"], summary["dropped"]) == (4, 1, 1)


def test_cli_names_file_and_offset_of_a_non_utf8_byte_in_a_json_file(tmp_path, monkeypatch,
                                                                      capsys):
    body = json.dumps(GOOD).encode()
    offset = body.index(b"Task 7") + len(b"Task ")
    (tmp_path / "d.json").write_bytes(body[:offset] + b"\xff" + body[offset + 1 :])
    line = prepare_refused(tmp_path, monkeypatch, capsys, {"dataset": "d.json", "heldout": 1})
    assert line.startswith(f"akd prepare: d.json: not UTF-8 at byte offset {offset} (0xff)")


def test_cli_names_the_cause_when_a_column_is_missing_and_lists_every_row(tmp_path,
                                                                          monkeypatch, capsys):
    (tmp_path / "d.json").write_text(json.dumps(GOOD))
    columns = {"instruction": "question", "output": "output"}
    line = prepare_refused(tmp_path, monkeypatch, capsys, {
        "dataset": "d.json", "heldout": 0, "schema": "custom", "columns": columns})
    assert line.endswith("most dropped: 20 missing field 'question')")
    dropped = dropped_rows(tmp_path)
    assert [d["sample_id"] for d in dropped] == [f"row-{i:06d}" for i in range(len(GOOD))]
    assert {d["reason"] for d in dropped} == {"missing field 'question'"}


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    path = write_json(tmp_path, GOOD)
    a = prepare(DataConfig(dataset=path, heldout=5, seed=1))
    b = prepare(DataConfig(dataset=path, heldout=5, seed=1))
    c = prepare(DataConfig(dataset=path, heldout=5, seed=2))
    assert a.train == b.train and a.heldout == b.heldout
    assert {e.sample_id for e in a.heldout} != {e.sample_id for e in c.heldout}
    ids = [e.sample_id for e in a.train + a.heldout]
    assert len(ids) == len(set(ids)) == len(GOOD)
    subset = prepare(DataConfig(dataset=path, heldout=5, seed=1, max_train_samples=4))
    assert subset.heldout == a.heldout and set(subset.train) <= set(a.train)
    assert len(subset.train) == 4


def test_heldout_larger_than_the_data_is_an_error_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="data.heldout=30"):
        prepare(DataConfig(dataset=write_json(tmp_path, GOOD), heldout=30))


def test_content_hash_follows_rows_not_files(tmp_path):
    a = prepare(DataConfig(dataset=write_json(tmp_path, GOOD, "a.json"), heldout=1))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps(r, indent=None) + "\n" for r in GOOD))
    b = prepare(DataConfig(dataset=str(jsonl), heldout=1))
    changed = [dict(r) for r in GOOD]
    changed[3]["output"] = "print(-3)"
    c = prepare(DataConfig(dataset=write_json(tmp_path, changed, "c.json"), heldout=1))
    assert a.content_sha256 == b.content_sha256 != c.content_sha256


def test_magicoder_and_custom_schemas(tmp_path):
    rows = [{"problem": f"P{i}", "solution": f"S{i}"} for i in range(4)]
    data = prepare(DataConfig(dataset=write_json(tmp_path, rows), schema="magicoder", heldout=1))
    assert {(e.instruction, e.input, e.output) for e in data.train + data.heldout} == {
        (f"P{i}", "", f"S{i}") for i in range(4)}
    rows = [{"q": f"Q{i}", "ctx": "c", "a": f"A{i}"} for i in range(4)]
    cfg = DataConfig(dataset=write_json(tmp_path, rows, "c.json"), schema="custom", heldout=1,
                     columns={"instruction": "q", "input": "ctx", "output": "a"})
    assert prepare(cfg).train[0].input == "c"


def test_real_codealpaca_file_prepares(codealpaca_path, codealpaca_rows):
    data = prepare(DataConfig(dataset=str(codealpaca_path), heldout=100))
    assert data.n_rows == len(codealpaca_rows) == 2017
    assert len(data.train) + len(data.heldout) + len(data.dropped) == data.n_rows


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def test_tokenization_masks_exactly_the_response_and_eos(tokenizer):
    example = Example("s", "Reverse a string.", "", "return s[::-1]")
    sample = tokenize_example(tokenizer, example, "alpaca", 512, "truncate_response")
    prompt = tokenizer(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.### Instruction:\nReverse a string.\n### Input:\n### Response:"
    )["input_ids"]
    response = tokenizer("return s[::-1]", add_special_tokens=False)["input_ids"]
    assert sample.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert sample.prompt_len == len(prompt)
    assert sample.n_loss_rows == len(response) + 1


def test_truncation_policies(tokenizer):
    example = Example("s", "Write it.", "", "x = 1\n" * 200)
    full = tokenize_example(tokenizer, example, "alpaca", 4096, "drop")
    cut = tokenize_example(tokenizer, example, "alpaca", 100, "truncate_response")
    assert len(cut.input_ids) == 100 and cut.input_ids == full.input_ids[:100]
    assert cut.input_ids[-1] != tokenizer.eos_token_id
    with pytest.raises(BadRow, match="too long: .* > max_length 100"):
        tokenize_example(tokenizer, example, "alpaca", 100, "drop")
    with pytest.raises(BadRow, match="the prompt alone"):
        tokenize_example(tokenizer, example, "alpaca", 10, "truncate_response")


def test_a_split_that_tokenisation_drops_whole_is_one_line_naming_a_sample(tiny_models,
                                                                           tmp_path):
    from akd_cache.config import CacheConfig, TeacherConfig
    from akd_cache.teacher.build import build_cache

    examples = [Example(f"s{i}", "Write it.", "", "x = 1\n" * 200) for i in range(3)]
    cache = CacheConfig(max_length=16, truncation="drop", root=str(tmp_path / "caches"))
    with pytest.raises(DataError, match=r"^train split: all 3 samples were dropped by "
                                        r"tokenisation \(cache.max_length 16, cache.truncation "
                                        r"'drop'\); the first, s0: ") as refusal:
        build_cache(TeacherConfig(model=str(tiny_models["llama"])),
                    DataConfig(dataset="rows.json"), cache, examples, "0" * 64)
    assert len(str(refusal.value).splitlines()) == 1
    assert not (tmp_path / "caches").exists()


@pytest.mark.parametrize("name", ["d.csv", "d.txt", "folder"])
def test_cli_refuses_a_local_dataset_that_is_not_json_in_one_line(tmp_path, monkeypatch, capsys,
                                                                   name):
    """A file or folder that is there is never handed to the hub loader."""
    if name == "folder":
        (tmp_path / name).mkdir()
        (tmp_path / name / "d.json").write_text(json.dumps(GOOD))
    else:
        (tmp_path / name).write_text(json.dumps(GOOD))
    line = prepare_refused(tmp_path, monkeypatch, capsys, {"dataset": name, "heldout": 1})
    assert line == (f"akd prepare: {name}: a local dataset is one .json or .jsonl file; fix "
                    "data.dataset in the params")


def test_cli_names_a_dataset_neither_local_nor_loadable(tmp_path, monkeypatch, capsys):
    line = prepare_refused(tmp_path, monkeypatch, capsys, {"dataset": "gone.csv", "heldout": 1})
    assert line.startswith("akd prepare: data.dataset 'gone.csv': not a local .json or .jsonl "
                           "file, and the hub cannot load it (")


@pytest.mark.parametrize("body,reason", [
    (b'{"location": "x"', "not valid JSON (Expecting ',' delimiter: line 1 column 17 (char 16))"),
    (b"[]", "expected a JSON object, got list"),
    (b'{"where": "x"}', "no 'location' key"),
])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, body, reason):
    (tmp_path / "p.json").write_bytes(body)
    with pytest.raises(DataError) as err:
        jsonl.read_json(tmp_path / "p.json", dict, ("location",))
    assert str(err.value) == f"{tmp_path / 'p.json'}: {reason}"
    assert jsonl.read_json(write_json(tmp_path, {"location": "x"}), dict, ("location",)) == \
        {"location": "x"}
