"""From a model's completion to the program evalplus scores.

Order: cut at the first stop sequence, take the code out of a fenced block (or the raw text),
re-attach the task's own code when the model only continued the function body, then run
evalplus's sanitizer with the entry point. A completion without code (empty, or prose that
defines no function and is no Python) gives an empty solution, never the bare prompt or the
prose: the taxonomy files it as "nothing generated", not as a SyntaxError of code cut off.
"""

from __future__ import annotations

import ast
import re

from evalplus.sanitize import sanitize

from akd_cache import generation
from akd_cache.evaluation.problems import Problem
from akd_cache.generation import FENCE, find_stop

# The generation stops, and a closing code fence (it ends a reply only where it closes a block).
DEFAULT_STOPS: tuple[str, ...] = (*generation.DEFAULT_STOPS, f"\n{FENCE}\n")
_FENCED = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _function_def(name: str) -> re.Pattern[str]:
    """A line that defines a function whose name matches the regex `name`."""
    return re.compile(rf"^\s*(?:async\s+)?def\s+{name}\s*\(", re.MULTILINE)


_ANY_FUNCTION_DEF = _function_def(r"\w+")


def truncate_at_stops(text: str, stops: tuple[str, ...] = DEFAULT_STOPS) -> str:
    cut = find_stop(text, stops)
    return text if cut is None else text[:cut]


def extract_code(text: str) -> str:
    """The first fenced block (closed or cut off), else the text itself."""
    match = _FENCED.search(text)
    return match.group(1) if match else text


def defines(code: str, name: str) -> bool:
    return _function_def(re.escape(name)).search(code) is not None


def parses(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def is_code(text: str) -> bool:
    """Text that defines a function or parses as Python. evalplus's sanitizer passes prose
    through unchanged, which would then fail as a SyntaxError."""
    return _ANY_FUNCTION_DEF.search(text) is not None or parses(text)


def prompt_imports(prompt: str) -> str:
    """The task's top-level imports (HumanEval's `from typing import List`, ...)."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return ""
    nodes = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return "".join(ast.get_source_segment(prompt, n) + "\n" for n in nodes)


def top_level_function(code: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The function `name` defined at the top of `code`; None if absent or `code` does not
    parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    return None


def _entry_point_source(code: str, name: str) -> str:
    node = top_level_function(code, name)
    return "" if node is None else ast.get_source_segment(code, node) or ""


def to_solution(
    completion: str,
    problem: Problem,
    stops: tuple[str, ...] = DEFAULT_STOPS,
    keep_prompt_imports: bool = True,
) -> str:
    """The program to score. A completion whose first line is indented continues the prompt's
    function (FIM or completion-style models) and is appended to the prompt. With
    `keep_prompt_imports` the task's own imports precede a rewritten function: models often
    drop them, and the task gave them; a NameError for a missing import then only counts
    imports the model itself needed."""
    code = extract_code(truncate_at_stops(completion, stops))
    if not code.strip():
        return ""
    if not defines(code, problem.entry_point):
        first = next(line for line in code.splitlines() if line.strip())
        if first[:1].isspace():
            code = problem.prompt + code
    elif keep_prompt_imports:
        code = prompt_imports(problem.prompt) + code
    if not is_code(code):
        return ""
    sanitized = sanitize(code, problem.entry_point)
    if not parses(sanitized):
        # Cut off inside the function (an unclosed docstring), the sanitizer keeps its bare
        # signature, which fails as an IndentationError: keep the code as written, so the
        # failure shows where the output ended.
        return code
    if defines(sanitized, problem.entry_point) or not defines(code, problem.entry_point):
        return sanitized
    # The sanitizer dropped the entry point. It drops functions without a `return` (an empty
    # `pass` body) and code that does not parse (an output cut off): keep the function, or the
    # unparsable code, so the failure shows as what it is, not as a missing function.
    kept = _entry_point_source(code, problem.entry_point)
    return "\n\n".join(s for s in (sanitized, kept) if s) if kept else code
