"""Generation for evaluation (tiny random model), prompts, and completion post-processing."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from akd_cache.config import EvalConfig
from akd_cache.evaluation.generate import generate_samples, generator_factory
from akd_cache.evaluation.postprocess import DEFAULT_STOPS, to_solution, truncate_at_stops
from akd_cache.evaluation.problems import Problem, build_prompt, load_problems
from akd_cache.evaluation.taxonomy import CUT_OFF, Attempt, classify
from akd_cache.generation import Decoding, HFGenerator, complete_all, find_stop

EVALPLUS_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "evalplus"
PROMPTS = [
    "def add(a, b):",
    "Write a function that sorts a list of numbers in ascending order and returns it.",
    "x",
    "### Instruction:\nReverse a string.\n### Response:",
    "Below is an instruction that describes a task.",
]
NEW_TOKENS = 16
BATCH = len(PROMPTS)
NO_STOPS = Decoding(max_new_tokens=NEW_TOKENS, stops=())


@pytest.fixture(scope="module")
def llama(tiny_models):
    path = tiny_models["llama"]
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def generate_completions(model, tokenizer, prompts, decoding, batch_size=BATCH):
    return complete_all(HFGenerator(model, tokenizer, batch_size), prompts, decoding)


@pytest.fixture(scope="module")
def unstopped(llama):
    return generate_completions(*llama, PROMPTS, NO_STOPS)


@pytest.fixture(scope="module")
def humaneval():
    return {p.task_id: p for p in load_problems("humaneval", EVALPLUS_DATA)}


def test_batched_left_padded_greedy_equals_one_by_one(llama, unstopped):
    model, tokenizer = llama
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 1, "prompts of one length would not exercise the padding"
    assert generate_completions(model, tokenizer, PROMPTS, NO_STOPS, batch_size=1) == unstopped
    assert all(c.truncated for [c] in unstopped)


def test_stop_strings_cut_the_output(llama, unstopped):
    """A stop taken from the middle of each unstopped output: generation ends there."""
    model, tokenizer = llama
    text = unstopped[1][0].text
    stop = re.search(r"[A-Za-z]{2,}", text[3:]).group(0)
    decoding = Decoding(max_new_tokens=NEW_TOKENS, stops=(stop,))
    [[completion]] = generate_completions(model, tokenizer, [PROMPTS[1]], decoding)
    assert completion.text == text[: text.index(stop)]
    assert not completion.truncated


def test_sampling_needs_a_temperature():
    with pytest.raises(ValueError, match="temperature"):
        Decoding(max_new_tokens=NEW_TOKENS, n_samples=2)


def samples_cfg() -> tuple[EvalConfig, list[Problem]]:
    cfg = EvalConfig(data_dir=str(EVALPLUS_DATA), n_tasks=3, max_new_tokens=4, batch_size=2)
    return cfg, load_problems("humaneval", EVALPLUS_DATA, cfg.n_tasks, cfg.seed)


def test_samples_file_is_written_and_resumed(tiny_models, tmp_path):
    out = tmp_path / "samples.jsonl"
    cfg, problems = samples_cfg()
    generate_samples(generator_factory(tiny_models["llama"], cfg), problems, out, cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert {"task_id", "solution", "raw", "truncated", "prompt_sha256"} <= set(rows[0])
    before = out.read_text()

    def must_not_load():
        raise AssertionError("every task is done: no model should be loaded")

    generate_samples(must_not_load, problems, out, cfg)
    assert out.read_text() == before
    # a resume makes the solutions again from the raw text: post-processing changes reach them
    out.write_text("".join(json.dumps({**row, "solution": "STALE"}) + "\n" for row in rows))
    generate_samples(must_not_load, problems, out, cfg)
    assert out.read_text() == before


def test_unusable_lines_of_a_samples_file_are_named_dropped_and_made_again(tiny_models, tmp_path,
                                                                         caplog):
    out = tmp_path / "samples.jsonl"
    cfg, problems = samples_cfg()
    generator = generator_factory(tiny_models["llama"], cfg)
    generate_samples(generator, problems, out, cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    damaged = [{"task_id": rows[0]["task_id"]}, [1, 2], {"solution": "x"}, rows[1], rows[2],
               {**rows[1], "truncated": "no"}]
    out.write_text("".join(json.dumps(row) + "\n" for row in damaged) + "not json\n")
    with caplog.at_level(logging.WARNING):
        generate_samples(generator, problems, out, cfg)
    again = "dropped, its task is generated again"
    assert [r.getMessage() for r in caplog.records] == [
        f"{out}: line 1: 'raw' missing or not a str; {again}",
        f"{out}: line 2: a list, not an object; {again}",
        f"{out}: line 3: 'task_id' missing or not a str; {again}",
        f"{out}: line 6: 'truncated' missing or not a bool; {again}",
        f"{out}: line 7: unparsable JSON (Expecting value at column 1); {again}",
    ]
    # greedy: the task that lost its row gets the same sample again, after the kept ones
    assert [json.loads(line) for line in out.read_text().splitlines()] == [*rows[1:], rows[0]]


def test_a_task_whose_prompt_changed_is_generated_again_and_named(tiny_models, tmp_path, caplog):
    out = tmp_path / "samples.jsonl"
    cfg, problems = samples_cfg()
    generator = generator_factory(tiny_models["llama"], cfg)
    generate_samples(generator, problems, out, cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # a new release of the data rewords the second task: its old sample no longer counts
    edited = [*problems[:1], replace(problems[1], prompt=problems[1].prompt + "    # v2\n"),
              *problems[2:]]
    loaded = []

    def counting_generator():
        loaded.append(1)
        return generator()

    with caplog.at_level(logging.WARNING):
        generate_samples(counting_generator, edited, out, cfg)
    assert [r.getMessage() for r in caplog.records] == [
        (f"{out}: 1 task(s) were generated from another prompt than today's (the eval data "
         f"changed): {problems[1].task_id}; their samples are generated again")]
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert loaded == [1]
    changed = problems[1].task_id
    assert again[:2] == [row for row in rows if row["task_id"] != changed]  # kept as they were
    old = next(row for row in rows if row["task_id"] == changed)
    assert again[2]["task_id"] == changed
    assert again[2]["prompt_sha256"] == hashlib.sha256(
        build_prompt(edited[1], cfg.template).encode()).hexdigest() != old["prompt_sha256"]


def test_prompts_follow_the_templates(humaneval):
    problem = humaneval["HumanEval/0"]
    prompt = build_prompt(problem, "alpaca")
    assert prompt.startswith("Below is an instruction")
    assert "def has_close_elements(" in prompt and prompt.endswith("### Response:")
    mbpp = load_problems("mbpp", EVALPLUS_DATA, n=1, seed=0)[0]
    instruct = build_prompt(mbpp, "instruct_eval")
    assert instruct.startswith("Please complete the following Python code")
    assert f"assert {mbpp.entry_point}(" in instruct


def test_seeded_subset_is_stable():
    first = [p.task_id for p in load_problems("mbpp", EVALPLUS_DATA, n=5, seed=3)]
    again = [p.task_id for p in load_problems("mbpp", EVALPLUS_DATA, n=5, seed=3)]
    assert first == again and len(set(first)) == 5


def test_fence_stop_ends_only_a_closing_fence():
    reply = "Here:\n```\ndef f():\n    return 1\n```\nExplanation"
    assert truncate_at_stops(reply) == "Here:\n```\ndef f():\n    return 1"
    assert find_stop("```python\nx = 1\n```\n", DEFAULT_STOPS) == len("```python\nx = 1")
    assert find_stop("a\n### Instruction: more", DEFAULT_STOPS) == 1


def test_solution_from_a_fenced_reply(humaneval):
    problem = humaneval["HumanEval/0"]
    reply = (
        "Sure.\n```python\ndef has_close_elements(numbers: List[float], threshold: float):\n"
        "    return False\n\nprint(has_close_elements([], 1))\n```\nIt works.\n### Instruction"
    )
    solution = to_solution(reply, problem)
    assert solution.startswith("from typing import List\n")
    assert "print(" not in solution and "It works" not in solution


def test_an_async_entry_point_is_the_entry_point(humaneval):
    """`async def` defines the entry point as `def` does: the task's imports come with it."""
    reply = ("async def has_close_elements(numbers: List[float], threshold: float):\n"
             "    return False\n")
    solution = to_solution(reply, humaneval["HumanEval/0"])
    assert solution == "from typing import List\n" + reply.rstrip("\n")


def test_body_only_completion_continues_the_prompt(humaneval):
    problem = humaneval["HumanEval/2"]
    solution = to_solution("    return number % 1.0\n", problem)
    assert solution.startswith("def truncate_number(") and solution.endswith("return number % 1.0")


def test_empty_completion_stays_empty(humaneval):
    assert to_solution("  \n<|endoftext|>", humaneval["HumanEval/0"]) == ""


@pytest.mark.parametrize("reply", [
    "The above response is a response that completes the instruction.\n",  # the demo teacher's
    "```",
    "The sum\n\n\nThe sum\nThe sum\n",
])
def test_prose_without_code_gives_an_empty_solution(humaneval, reply):
    assert to_solution(reply, humaneval["HumanEval/0"]) == ""


def test_prose_before_unfenced_code_keeps_the_code(humaneval):
    reply = "Here is the function:\ndef has_close_elements(numbers, threshold):\n    return False\n"
    solution = to_solution(reply, humaneval["HumanEval/0"])
    assert "def has_close_elements(numbers, threshold):\n    return False" in solution
    assert "Here is" not in solution


def test_code_cut_off_inside_a_docstring_is_kept_as_written(humaneval):
    """The demo teacher's reply, cut off by max_new_tokens inside the docstring: evalplus's
    sanitizer would leave `def even_odd_palindrome(n):` alone, an IndentationError; the taxonomy
    must see the output cut off."""
    problem = humaneval["HumanEval/107"]
    reply = ('```\ndef even_odd_palindrome(n):\n    """\n    Given a positive integer n, return '
             "a tuple that has the number of even and odd integer\n\n    Example 2")
    solution = to_solution(reply, problem)
    assert solution.endswith("    Example 2") and "def even_odd_palindrome(n):" in solution
    _, [row] = classify([Attempt(problem, solution, passed=False, truncated=True)])
    assert (row.category, row.subcategory) == ("SyntaxError", CUT_OFF)


def test_sanitizer_keeps_an_empty_entry_point(humaneval):
    """evalplus drops functions without `return`; the taxonomy needs them as empty functions."""
    problem = humaneval["HumanEval/0"]
    solution = to_solution("def has_close_elements(numbers, threshold):\n    pass\n", problem)
    assert "def has_close_elements(numbers, threshold):\n    pass" in solution


def test_cut_off_code_is_kept_unparsed(humaneval):
    solution = to_solution(
        "def has_close_elements(numbers, threshold):\n    return (", humaneval["HumanEval/0"]
    )
    assert solution.endswith("return (")
