"""Every DVC stage depends on the code that decides its outputs, so a code change reruns it.

The code a stage runs is found from its `cmd` (`akd <command>`): the CLI's module-level imports,
then the stage script and everything it imports from `akd_cache` and `stages`, transitively,
imports inside functions included (a lazy import, such as a backend chosen by a setting, still
runs). The CLI's own functions are left out: they serve the cache tools, not the stages.
"""

from __future__ import annotations

import ast
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dvc.repo import Repo

from akd_cache.cli import STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("akd_cache", "stages")
CLI_MODULE = "akd_cache.cli"
DVC = str(Path(sys.executable).parent / "dvc")  # the dvc installed with this Python


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imported_modules(name: str, top_level_only: bool = False) -> set[str]:
    """The project modules `name` imports (`from a import b` counts a.b when b is a module)."""
    path = module_file(name)
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(m)}


def code_run_by(stage_module: str) -> set[Path]:
    """The project files `akd <command>` executes for the stage in `stage_module`."""
    seen: set[str] = set()
    todo = [stage_module, *imported_modules(CLI_MODULE, top_level_only=True)]
    files = {module_file(CLI_MODULE)}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        todo += imported_modules(name)
    files |= {module_file(name) for name in seen}
    return {path.relative_to(REPO) for path in files if _has_code(path)}


def _has_code(path: Path) -> bool:
    """False for a file that is empty or only a docstring: it cannot change an output."""
    body = ast.parse(path.read_text()).body
    docstring = bool(body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                            ast.Constant)
    return len(body) > (1 if docstring else 0)


@functools.cache
def dvc_stages() -> dict[str, tuple[str, list[Path]]]:
    """Each stage (foreach items expanded) by name: its command and its dependencies, as DVC
    itself reads dvc.yaml."""
    with Repo(str(REPO)) as repo:
        return {stage.addressing: (stage.cmd, [Path(dep.def_path) for dep in stage.deps])
                for stage in repo.index.stages}


def test_the_import_walk_sees_lazy_imports():
    """The walk is the reference below; it must find imports made inside functions."""
    files = code_run_by(STAGES["cache-teacher"])
    assert Path("akd_cache/teacher/vllm_backend.py") in files  # imported inside backend_factory
    assert Path("akd_cache/store/inspect.py") not in files  # only `akd inspect` runs it


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_every_stage_depends_on_the_code_it_runs(name):
    cmd, deps = dvc_stages()[name]
    command = cmd.split()[1]
    assert cmd.split()[0] == "akd" and command in STAGES, cmd
    missing = sorted(
        str(path) for path in code_run_by(STAGES[command])
        if not any(path == dep or dep in path.parents for dep in deps)
    )
    assert not missing, f"{name} runs code it does not depend on: {missing}"


def test_a_template_edit_makes_cache_teacher_stale(tmp_path):
    """The issue's case: a template's text changes, and `dvc status` must call the teacher cache
    stale (before, only `prepare` reran, wrote byte-identical data, and the cache was kept)."""
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    for rel in ("akd_cache", "stages"):  # this checkout's code, committed or not
        shutil.copytree(REPO / rel, repo / rel, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    # the stage's inputs and outputs, so that `dvc commit` records a lock entry without running
    for rel in ("data/prepared/train.jsonl", "storage/models/manifest.json",
                "storage/teacher-cache/x/zarr.json", "runs/teacher_cache.json",
                "runs/teacher_cache_dropped.jsonl"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("{}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=repo, check=True)

    def dvc(*args: str) -> str:
        proc = subprocess.run([DVC, *args], cwd=repo, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    dvc("commit", "-f", "cache_teacher")
    assert "up to date" in dvc("status", "cache_teacher")
    templates = repo / "akd_cache" / "data" / "templates.py"
    text = templates.read_text()
    assert "### Response:" in text
    templates.write_text(text.replace("### Response:", "### Answer:"))
    status = dvc("status", "cache_teacher")
    assert "cache_teacher:" in status and "modified:" in status and "akd_cache/data" in status
