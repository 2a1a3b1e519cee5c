"""The package is layered: a module imports only from its own layer or the ones below it, so
`store/` (the cache format) stands alone and the stages sit on top of everything."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import akd_cache

PACKAGE = Path(akd_cache.__file__).parent
LAYERS: dict[str, int] = {
    "errors": 0, "jsonl": 0, "run_settings": 0,
    "store": 1,
    "config": 2, "devices": 2,
    "data": 3, "models": 3, "generation": 3,
    "teacher": 4,
    "student": 5,
    "evaluation": 6,
    "report": 7,
    "cli": 8,
}
"""Bottom to top. A new module or subpackage must be placed here before it can be imported."""
OUTSIDE = ("stages", "benchmarks", "tests")  # what the package never imports


def _unit(path: Path) -> str:
    """`store` for akd_cache/store/reader.py, `config` for akd_cache/config.py."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported(tree: ast.Module) -> list[tuple[int, str]]:
    """Every absolute module name a file imports, at any depth (function-level imports too).
    `from akd_cache import jsonl` imports the module `akd_cache.jsonl`; a name that is no layer
    (`__version__`) comes from the package's own `__init__`, which imports nothing."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "akd_cache":
            names += [(node.lineno, f"akd_cache.{alias.name}" if alias.name in LAYERS
                       else "akd_cache") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
    return sorted(names)  # in file order: ast.walk reaches nested imports last


def _violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue
        if unit not in LAYERS:
            found.append(f"{path}: `{unit}` has no layer in LAYERS")
            continue
        for line, name in _imported(ast.parse(path.read_text(), str(path))):
            top, _, rest = name.partition(".")
            if top in OUTSIDE:
                found.append(f"{path}:{line}: imports {name}")
            elif top == "akd_cache" and rest:
                target = rest.split(".")[0]
                if LAYERS.get(target, len(LAYERS)) > LAYERS[unit]:
                    found.append(f"{path}:{line}: {unit} (layer {LAYERS[unit]}) imports "
                                 f"{name} (layer {LAYERS.get(target, '?')})")
    return found


def test_every_import_goes_down_the_layers():
    assert _violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a store module importing the trainer, a function-level import of a
    stage, and a module with no layer are each reported with the file and line."""
    fake = tmp_path / "akd_cache"
    (fake / "store").mkdir(parents=True)
    (fake / "store" / "reader.py").write_text(
        "from akd_cache.errors import CacheError\n"
        "from akd_cache.student.trainer import train\n"
        "def f():\n    import stages.train\n"
        "from akd_cache import __version__, jsonl, student\n")
    (fake / "newthing.py").write_text("import os\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = _violations()
    assert found == [
        f"{fake / 'newthing.py'}: `newthing` has no layer in LAYERS",
        (f"{fake / 'store' / 'reader.py'}:2: store (layer 1) imports "
         "akd_cache.student.trainer (layer 5)"),
        f"{fake / 'store' / 'reader.py'}:4: imports stages.train",
        (f"{fake / 'store' / 'reader.py'}:5: store (layer 1) imports "
         "akd_cache.student (layer 5)"),
    ]
