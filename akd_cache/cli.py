"""The `akd` command: the pipeline stages by name, plus tools on caches."""

from __future__ import annotations

import argparse
import importlib
import sys

STAGES = {
    "prepare": "stages.prepare",
    "models": "stages.models",
    "cache-teacher": "stages.cache_teacher",
    "teacher-generate": "stages.teacher_generate",
    "train": "stages.train",
    "template-analysis": "stages.template_analysis",
    "evaluate": "stages.evaluate",
    "report": "stages.report",
}


def _inspect(argv: list[str]) -> None:
    from akd_cache.store.inspect import describe
    from akd_cache.store.reader import TeacherCache

    parser = argparse.ArgumentParser(prog="akd inspect", description="describe a teacher cache")
    parser.add_argument("cache", help="cache folder or fsspec URL")
    args = parser.parse_args(argv)
    print(describe(TeacherCache(args.cache, allow_incomplete=True)))


def _finalize(argv: list[str]) -> None:
    from akd_cache.store.format import open_cache_group
    from akd_cache.store.writer import finalize

    parser = argparse.ArgumentParser(
        prog="akd finalize", description="mark a cache filled by several workers complete"
    )
    parser.add_argument("cache")
    args = parser.parse_args(argv)
    if not finalize(open_cache_group(args.cache, mode="r+"), args.cache):
        sys.exit(f"{args.cache}: shards are still missing; run the remaining workers first")
    print(f"{args.cache}: complete")


TOOLS = {"inspect": _inspect, "finalize": _finalize}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = sorted([*STAGES, *TOOLS])
    if not argv or argv[0] in {"-h", "--help"}:
        print(f"usage: akd {{{','.join(commands)}}} [options]")
        return
    command, rest = argv[0], argv[1:]
    if command in STAGES:
        importlib.import_module(STAGES[command]).main(rest)
    elif command in TOOLS:
        TOOLS[command](rest)
    else:
        sys.exit(f"akd: unknown command {command!r}; choose one of {', '.join(commands)}")
