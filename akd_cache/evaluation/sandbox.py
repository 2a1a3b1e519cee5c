"""Run generated code and its tests in a limited child process, and report the first exception.

The child is a fresh `python -I` in a fresh temporary directory (its cwd and HOME); its runner
sets RLIMIT_CPU, RLIMIT_AS and RLIMIT_FSIZE before reading the code (not in a `preexec_fn`, which
is unsafe when sandboxes run from threads); it has its own session (a wall timeout kills the
whole process group), stdin from /dev/null and a minimal environment. Network, two layers:
- `unshare -rn` (a new user + network namespace: no interface but a down loopback) when the
  kernel allows it, probed once per process;
- always, a runner that replaces `socket.socket`'s connect/bind/send methods, `create_connection`
  and `getaddrinfo` with functions raising PermissionError before the code runs. Code that imports
  `_socket` itself gets past this layer; only the namespace stops it.
This contains accidents (a model's infinite loop, memory or disk bomb), not an attacker.
The runner writes JSON lines on a pipe of its own, so whatever the code prints cannot forge them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MIB = 1 << 20
MAX_MESSAGE_CHARS = 500
CPU_HARD_MARGIN_S = 1  # SIGXCPU at the soft limit, SIGKILL one second later if it is ignored
TIMEOUT = "TimeoutError"
CRASHED = "Crashed"  # the child died without reporting (a signal other than a time limit)

RUNNER = r"""
import json, os, resource, socket, sys

_cfg = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (_cfg["cpu"], _cfg["cpu_hard"]))
resource.setrlimit(resource.RLIMIT_AS, (_cfg["memory"], _cfg["memory"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (_cfg["file"], _cfg["file"]))
_entry = _cfg["entry_point"]

def _blocked(*args, **kwargs):
    raise PermissionError("network access is blocked in the sandbox")

for _name in ("connect", "connect_ex", "bind", "listen", "send", "sendto", "sendall"):
    setattr(socket.socket, _name, _blocked)
socket.create_connection = socket.getaddrinfo = _blocked

_out = os.fdopen(_cfg["fd"], "w")

def _report(phase, exc=None):
    line = {"phase": phase, "type": None, "message": "", "lineno": None}
    if exc is not None:
        line.update(type=type(exc).__name__, message=str(exc)[:_cfg["max_message"]],
                    lineno=getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None)
    _out.write(json.dumps(line) + "\n")
    _out.flush()

_ns = {"__name__": "solution"}
try:
    exec(compile(open("solution.py").read(), "solution.py", "exec"), _ns)
    if _entry and _entry not in _ns:
        raise NameError(f"name {_entry!r} is not defined")
except BaseException as exc:
    _report("load", exc)
    os._exit(0)
_report("loaded")
try:
    exec(compile(open("tests.py").read(), "tests.py", "exec"), _ns)
except BaseException as exc:
    _report("test", exc)
    os._exit(0)
_report("done")
os._exit(0)
"""


@dataclass(frozen=True)
class Limits:
    """Per-task bounds. A HumanEval+/MBPP+ task's tests run in well under a second; these stop a
    runaway or hostile solution (a loop, a memory or disk bomb) without failing a correct one."""

    cpu_seconds: int = 5
    memory_bytes: int = 1024 * MIB
    file_bytes: int = 1 * MIB
    wall_seconds: float = 10.0
    network_namespace: bool = True  # use `unshare -rn` where the kernel allows it


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Outcome:
    """`reached_tests`: the code ran and defined the entry point; `error_type` is None when every
    test passed, else the first exception's class name (TimeoutError for a time limit)."""

    reached_tests: bool
    error_type: str | None
    message: str = ""
    lineno: int | None = None

    @property
    def passed(self) -> bool:
        return self.error_type is None


@cache
def namespace_available() -> bool:
    """Whether `unshare -rn` can start a process here (root, or unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def _command(runner: Path, fd: int, entry_point: str, limits: Limits) -> list[str]:
    config = {
        "fd": fd,
        "entry_point": entry_point,
        "cpu": limits.cpu_seconds,
        "cpu_hard": limits.cpu_seconds + CPU_HARD_MARGIN_S,
        "memory": limits.memory_bytes,
        "file": limits.file_bytes,
        "max_message": MAX_MESSAGE_CHARS,
    }
    python = [sys.executable, "-I", str(runner), json.dumps(config)]
    if limits.network_namespace and namespace_available():
        return ["unshare", "-rn", *python]
    return python


def _outcome(lines: list[dict], timed_out: bool, returncode: int | None) -> Outcome:
    reached = any(line["phase"] in ("loaded", "test", "done") for line in lines)
    last = lines[-1] if lines else None
    if last is not None and last["phase"] in ("load", "test", "done"):
        return Outcome(last["phase"] != "load", last["type"], last["message"], last["lineno"])
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome(reached, TIMEOUT, "time limit exceeded")
    return Outcome(reached, CRASHED, f"exit status {returncode}")


def run_in_sandbox(
    code: str, tests: str = "", entry_point: str = "", limits: Limits = DEFAULT_LIMITS
) -> Outcome:
    """Run `code`, check it defines `entry_point` (if given), then run `tests` in its namespace."""
    with tempfile.TemporaryDirectory(prefix="akd-sandbox-") as tmp:
        work = Path(tmp)
        (work / "solution.py").write_text(code)
        (work / "tests.py").write_text(tests)
        (work / "runner.py").write_text(RUNNER)
        read_fd, write_fd = os.pipe()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            _command(work / "runner.py", write_fd, entry_point, limits),
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
        os.close(write_fd)
        try:
            proc.wait(timeout=limits.wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)
        with os.fdopen(read_fd) as pipe:
            lines = _parse(pipe.read())
    return _outcome(lines, timed_out, proc.returncode)


def _kill_group(proc: subprocess.Popen) -> None:
    """Also reaps what the code may have forked, which would otherwise hold the pipe open."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _parse(text: str) -> list[dict]:
    """Complete JSON lines only: a kill can cut the last one."""
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return lines
