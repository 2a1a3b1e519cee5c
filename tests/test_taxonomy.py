"""The error taxonomy (paper Table 13) and the sandbox it re-runs failing solutions in."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from akd_cache.evaluation.postprocess import to_solution
from akd_cache.evaluation.problems import Problem, load_problems
from akd_cache.evaluation.sandbox import MIB, Limits, namespace_available, run_in_sandbox
from akd_cache.evaluation.score import score
from akd_cache.evaluation.taxonomy import (
    CORRECT,
    CUT_OFF,
    EMPTY_FUNCTION,
    MISSING_IMPORT,
    NOT_REPRODUCED,
    NOTHING_GENERATED,
    OTHER,
    UNBALANCED,
    WRONG_NAME,
    Attempt,
    attempts_from_scores,
    classify,
    is_empty_function,
)

EVALPLUS_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "evalplus"
FAST = Limits(cpu_seconds=1, wall_seconds=3.0)
BOMB_MEMORY_BYTES = 256 * MIB
BOMB_WALL_S = 120.0
PROBLEM = Problem(
    dataset="mbpp",
    task_id="Toy/add",
    prompt="'''\nAdd two numbers.\n'''",
    entry_point="add",
    canonical_solution="def add(a, b):\n    return a + b\n",
    tests="assert add(1, 2) == 3\nassert add(0, 0) == 0\n",
)


def body(*lines: str) -> str:
    return "def add(a, b):\n" + "".join(f"    {line}\n" for line in lines)


# (solution, truncated, category, subcategory, complete)
CASES = {
    "wrong answer": (body("return a - b"), False, "AssertionError", None, True),
    "pass": (body("pass"), False, "AssertionError", EMPTY_FUNCTION, True),
    "return 0": (body("return 0"), False, "AssertionError", EMPTY_FUNCTION, True),
    "return None": (body("return None"), False, "AssertionError", EMPTY_FUNCTION, True),
    "ellipsis": (body("..."), False, "AssertionError", EMPTY_FUNCTION, True),
    "docstring only": (body('"""Add."""'), False, "AssertionError", EMPTY_FUNCTION, True),
    "wrong name": ("def plus(a, b):\n    return a + b\n", False, "NameError", WRONG_NAME, False),
    "nothing generated": ("", False, "NameError", NOTHING_GENERATED, False),
    "import at call": (body("return math.floor(a) + b"), False, "NameError", MISSING_IMPORT, True),
    "import at def": (
        "def add(a: List[int], b):\n    return a + b\n",
        False,
        "NameError",
        MISSING_IMPORT,
        False,
    ),
    "undefined variable": (body("return a + c"), False, "NameError", None, True),
    "unbalanced": (
        body("x = [a, b)", "return sum(x)"),
        False,
        "SyntaxError",
        UNBALANCED,
        False,
    ),
    "cut off": (body("return (a +"), False, "SyntaxError", CUT_OFF, False),
    "cut off, flagged": (
        body("x = (a,", "     b", "return x") + "def more(",
        True,
        "SyntaxError",
        CUT_OFF,
        False,
    ),
    "ValueError": (body('return int("x")'), False, "ValueError", None, True),
    "IndexError": (body("return [][a]"), False, "IndexError", None, True),
    "TypeError": (body('return a + "b"'), False, "TypeError", None, True),
    "AttributeError": (body("return a.total"), False, "AttributeError", None, True),
    "TimeoutError": (body("while True:", "    pass"), False, "TimeoutError", None, True),
    "IndentationError": ("def add(a, b):\nreturn a + b\n", False, "IndentationError", None, False),
    "TabError": (
        "def add(a, b):\n        x = a\n\treturn x + b\n",
        False,
        "IndentationError",
        None,
        False,
    ),
    "ModuleNotFoundError": (
        "import no_such_module_xyz\n" + body("return a + b"),
        False,
        "ModuleNotFoundError",
        None,
        False,
    ),
    "KeyError": (body("return {}[a]"), False, "KeyError", None, True),
    "UnboundLocalError": (
        body("if a > 100:", "    s = 0", "return s"),
        False,
        "UnboundLocalError",
        None,
        True,
    ),
    "RecursionError": (body("return add(a, b)"), False, "RecursionError", None, True),
    "NotImplementedError": (
        body("raise NotImplementedError"),
        False,
        "NotImplementedError",
        None,
        True,
    ),
    "other": (body("return a / 0"), False, OTHER, None, True),
}


@pytest.fixture(scope="module")
def classified():
    attempts = [Attempt(PROBLEM, code, False, truncated) for code, truncated, *_ in CASES.values()]
    _, rows = classify(attempts, FAST, workers=2)
    return dict(zip(CASES, rows, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_each_category_and_subcategory(classified, name):
    _, _, category, subcategory, complete = CASES[name]
    row = classified[name]
    assert (row.category, row.subcategory, row.complete) == (category, subcategory, complete), (
        row.message
    )


def test_a_reply_of_prose_without_code_is_nothing_generated():
    """The paper's "nothing generated" counts code: a reply that only talks has no program."""
    solution = to_solution("To add two numbers, apply the plus operator to them.", PROBLEM)
    _, [row] = classify([Attempt(PROBLEM, solution, passed=False)], FAST)
    assert (solution, row.category, row.subcategory) == ("", "NameError", NOTHING_GENERATED)


def test_passing_solutions_are_correct_without_a_rerun():
    # An empty solution would fail if it were run: evalplus's verdict is taken as is.
    _, [row] = classify([Attempt(PROBLEM, "", passed=True)])
    assert (row.category, row.complete, row.passed) == (CORRECT, True, True)


def test_failure_not_reproduced_by_the_base_tests():
    """A solution evalplus failed (e.g. on its extra tests) that passes the base tests."""
    _, [row] = classify([Attempt(PROBLEM, PROBLEM.canonical_solution, passed=False)])
    assert (row.category, row.subcategory, row.complete) == (OTHER, NOT_REPRODUCED, True)


def test_summary_and_pass_rate_among_complete_solutions():
    mix = [Attempt(PROBLEM, PROBLEM.canonical_solution, passed=True)] * 3 + [
        Attempt(PROBLEM, body("return a - b"), passed=False),
        Attempt(PROBLEM, body("pass"), passed=False),
        Attempt(PROBLEM, body("return (a +"), passed=False),
        Attempt(PROBLEM, "", passed=False),
    ]
    summary, _ = classify(mix, FAST, workers=2)
    assert (summary.total, summary.correct, summary.complete, summary.incomplete) == (7, 3, 5, 2)
    assert summary.pass_rate_complete == pytest.approx(3 / 5)
    none_complete, _ = classify(mix[-1:], FAST, workers=1)
    assert (none_complete.complete, none_complete.pass_rate_complete) == (0, None)  # no 0 %
    assert summary.categories == {"AssertionError": 2, "SyntaxError": 1, "NameError": 1}
    assert summary.subcategories == {
        ("AssertionError", EMPTY_FUNCTION): 1,
        ("SyntaxError", CUT_OFF): 1,
        ("NameError", NOTHING_GENERATED): 1,
    }


def test_from_evalplus_scores_to_the_taxonomy(tmp_path):
    """Scored samples keep their order and their `truncated` flag on the way to the taxonomy."""
    problems = load_problems("humaneval", EVALPLUS_DATA)[:3]
    right, empty, cut = problems
    rows = [
        {"task_id": right.task_id, "solution": right.reference},
        {"task_id": empty.task_id, "solution": f"def {empty.entry_point}(*args):\n    pass\n"},
        {"task_id": cut.task_id, "solution": f"def {cut.entry_point}(", "truncated": True},
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score(samples, "humaneval", EVALPLUS_DATA, allow_subset=True)
    summary, table = classify(attempts_from_scores(result.samples, problems, plus=True), FAST)
    assert [(r.category, r.subcategory) for r in table] == [
        (CORRECT, None),
        ("AssertionError", EMPTY_FUNCTION),
        ("SyntaxError", CUT_OFF),
    ]
    assert (summary.correct, summary.complete) == (1, 2)


def test_empty_function_detection():
    assert is_empty_function(body("return"), "add")
    assert is_empty_function(body('"""Doc."""', "pass"), "add")
    assert not is_empty_function(body("return False"), "add")
    assert not is_empty_function(body("return a"), "add")
    assert not is_empty_function(body("pass"), "other_name")


def test_sandbox_stops_a_memory_bomb():
    """A small address-space limit and a wall time no loaded machine reaches: the bomb must end
    by its MemoryError, never by a time limit."""
    limits = Limits(memory_bytes=BOMB_MEMORY_BYTES, wall_seconds=BOMB_WALL_S)
    outcome = run_in_sandbox("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n",
                             limits=limits)
    assert outcome.error_type == "MemoryError"


def test_sandbox_stops_an_infinite_loop_by_cpu_time():
    outcome = run_in_sandbox("while True:\n    pass\n", limits=FAST)
    assert outcome.error_type == "TimeoutError"


def test_sandbox_stops_a_sleeper_by_wall_time():
    outcome = run_in_sandbox("import time\ntime.sleep(60)\n", limits=Limits(wall_seconds=1.0))
    assert outcome.error_type == "TimeoutError"


def test_sandbox_stops_a_file_size_bomb():
    code = "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 16))\n"
    outcome = run_in_sandbox(code)
    assert (outcome.error_type, "File too large" in outcome.message) == ("OSError", True)


@pytest.fixture
def listener():
    """A local server: a connection in its backlog would be a sandbox escape."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def assert_nothing_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


@pytest.mark.parametrize("namespace", [True, False], ids=["namespace", "socket-patch"])
def test_sandbox_blocks_sockets(listener, namespace):
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
    outcome = run_in_sandbox(code, limits=Limits(network_namespace=namespace))
    assert outcome.error_type in ("PermissionError", "OSError")
    assert_nothing_connected(listener)


@pytest.mark.skipif(not namespace_available(), reason="no user/network namespaces here")
def test_namespace_stops_code_that_bypasses_the_socket_patch(listener):
    port = listener.getsockname()[1]
    code = f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))\n"
    outcome = run_in_sandbox(code)
    assert outcome.error_type == "OSError"
    assert_nothing_connected(listener)
