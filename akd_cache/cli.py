"""The `akd` command: the pipeline stages by name, plus tools on caches.

An expected failure (an `AkdError`: a bad setting, missing input, damaged or locked cache, a
model that is not there; or a path the machine will not let it use: no permission, a file where
a folder should be, a full disk) prints one line, `akd <command>: <message>`, and exits with
code 2.
`--debug` anywhere on the command line, or `AKD_DEBUG=1`, shows its traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from akd_cache.errors import AkdError, CacheError

STAGES = {
    "prepare": "stages.prepare",
    "models": "stages.models",
    "cache-teacher": "stages.cache_teacher",
    "teacher-generate": "stages.teacher_generate",
    "train": "stages.train",
    "template-analysis": "stages.template_analysis",
    "evaluate": "stages.evaluate",
    "fidelity": "stages.fidelity",
    "report": "stages.report",
}
EXIT_USAGE = 2  # what argparse exits with on a bad command line; expected errors share it
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                         errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG})
"""What the machine refuses about a path the settings or the command name, which the user fixes
there; any other OSError (a file the code expected to find, say) is a bug and keeps its
traceback."""
DEBUG_FLAG = "--debug"
DEBUG_ENV = "AKD_DEBUG"


def _inspect(argv: list[str]) -> None:
    from akd_cache.store.inspect import describe
    from akd_cache.store.integrity import damage_error, find_damage
    from akd_cache.store.reader import TeacherCache

    parser = argparse.ArgumentParser(prog="akd inspect", description="describe a teacher cache")
    parser.add_argument("cache", help="cache folder or fsspec URL")
    args = parser.parse_args(argv)
    cache = TeacherCache(args.cache, allow_incomplete=True, check_files=False)
    damage = find_damage(cache.group, args.cache, cache.meta, full=False)
    print(describe(cache, damage))
    if damage:
        raise damage_error(args.cache, damage)


def _verify(argv: list[str]) -> None:
    from akd_cache.store.integrity import damage_error, find_damage, open_cache

    parser = argparse.ArgumentParser(
        prog="akd verify", description="check every shard of a teacher cache: present, "
        "checksums valid, tables consistent, key re-derived from the ingredients; exit code 2 "
        "and one line per damage if not (`akd cache-teacher` rewrites the damaged shards)"
    )
    parser.add_argument("cache", help="cache folder or fsspec URL")
    args = parser.parse_args(argv)
    group, meta = open_cache(args.cache)
    damage = find_damage(group, args.cache, meta, full=True)
    for d in damage:
        print(d.line(args.cache))
    if damage:
        raise damage_error(args.cache, damage)
    state = "complete" if meta.complete else "incomplete, the shards written so far"
    print(f"{args.cache}: ok ({state}; key {meta.key} re-derived, every file present and "
          "its checksums valid)")


def _finalize(argv: list[str]) -> None:
    from akd_cache.store.integrity import open_cache
    from akd_cache.store.writer import finalize

    parser = argparse.ArgumentParser(
        prog="akd finalize", description="mark a cache filled by several workers complete"
    )
    parser.add_argument("cache")
    args = parser.parse_args(argv)
    group, _ = open_cache(args.cache, mode="r+")
    if not finalize(group, args.cache):
        raise CacheError(f"{args.cache}: shards are still missing; run the remaining workers first")
    print(f"{args.cache}: complete")


TOOLS = {"inspect": _inspect, "verify": _verify, "finalize": _finalize}


def _debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in {"", "0"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = _debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    commands = sorted([*STAGES, *TOOLS])
    if not argv or argv[0] in {"-h", "--help"}:
        print(f"usage: akd {{{','.join(commands)}}} [options] [{DEBUG_FLAG}]")
        return
    command, rest = argv[0], argv[1:]
    if command not in STAGES and command not in TOOLS:
        print(f"akd: unknown command {command!r}; choose one of {', '.join(commands)}",
              file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        if command in STAGES:
            importlib.import_module(STAGES[command]).main(rest)
        else:
            TOOLS[command](rest)
    except AkdError as err:
        if debug:
            raise
        message = " ".join(str(err).splitlines())
        print(f"akd {command}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as err:
        if debug or err.errno not in PATH_ERRNOS or err.filename is None:
            raise
        print(f"akd {command}: {err.filename}: {err.strerror}; fix the path's permissions or "
              "free space, or set another path", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
