"""Python stacks of running workers, on demand, even while they are blocked inside a collective.

Each worker registers :mod:`faulthandler` on :data:`STACK_DUMP_SIGNAL` with a file of its own
(:func:`register`). faulthandler's handler is C code that walks the interpreter's frames without the
GIL, so it answers even when the worker's main thread sits in gloo/NCCL C++ code, where a Ray method
call or ``py-spy`` without ptrace rights would not. The driver signals each worker's pid on the
worker's own node through a zero-CPU Ray task (:func:`signal_workers`), then reads the files.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import time
from dataclasses import dataclass

STACK_DUMP_SIGNAL = signal.SIGUSR2
_open_files: list = []  # faulthandler keeps only the file descriptor: keep the file objects alive


# faulthandler: '  File "path", line N in func' (innermost first);
# traceback:    '  File "path", line N, in func' (innermost last).
_FAULTHANDLER_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
_TRACEBACK_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
_DISTRIBUTED = re.compile(r"[/\\]torch[/\\]distributed[/\\]")
# Wrappers that every collective passes through and that say nothing about which one it is.
_WRAPPERS = {"wrapper", "_fn", "inner", "__call__"}


@dataclass
class Frame:
    file: str
    line: int
    func: str

    def __str__(self) -> str:
        return f"{self.func} ({_short(self.file)}:{self.line})"


def _short(path: str) -> str:
    for marker in ("/torch/", "/memento_train/", "/site-packages/"):
        if marker in path:
            return path[path.index(marker) + 1 :]
    return path


def _main_thread_block(text: str) -> list[str]:
    """The lines of the main thread's block of a faulthandler dump: the block that does not start
    in ``threading._bootstrap`` (other threads do), preferring the "Current thread"."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append([line])
        elif blocks and line.strip():
            blocks[-1].append(line)
    if not blocks:
        return text.splitlines()
    main = [b for b in blocks if not b[-1].rstrip().endswith("in _bootstrap")]
    current = [b for b in main if b[0].startswith("Current thread")]
    return (current or main or blocks)[0]


def frames_of(text: str) -> list[Frame]:
    """The frames of the main thread of a faulthandler dump, or of a Python traceback, innermost first."""
    fh = [
        Frame(m["file"], int(m["line"]), m["func"])
        for line in _main_thread_block(text)
        if (m := _FAULTHANDLER_FRAME.match(line))
    ]
    if fh:
        return fh
    tb = [
        Frame(m["file"], int(m["line"]), m["func"]) for line in text.splitlines() if (m := _TRACEBACK_FRAME.match(line))
    ]
    return tb[::-1]


def innermost_collective(text: str) -> Frame | None:
    """The innermost ``torch.distributed`` frame (other than generic wrappers): the collective."""
    for frame in frames_of(text):
        if _DISTRIBUTED.search(frame.file) and frame.func not in _WRAPPERS:
            return frame
    return None


def register(path: str, signum: int = STACK_DUMP_SIGNAL) -> None:
    """In a worker: on ``signum``, append the stacks of all threads to ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    f = open(path, "a")
    _open_files.append(f)
    faulthandler.register(signum, file=f, all_threads=True, chain=False)


def _kill(pid: int, signum: int) -> None:
    os.kill(pid, signum)


def signal_workers(targets: list[tuple[str, int]], signum: int = STACK_DUMP_SIGNAL, timeout: float = 30.0) -> None:
    """Send ``signum`` to each ``(ray_node_id, pid)``, from a task on that node (pids are per node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_kill = ray.remote(num_cpus=0, max_retries=0)(_kill)
    refs = [
        remote_kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pid, signum)
        for node, pid in targets
    ]
    ray.wait(refs, num_returns=len(refs), timeout=timeout)


def read_new(paths: list[str], offsets: list[int], timeout: float = 15.0, settle: float = 0.5) -> list[str]:
    """What was appended to each of ``paths`` after ``offsets``, once every file has grown and stopped
    growing (or ``timeout`` passed: a worker that never answered gives "")."""
    deadline = time.monotonic() + timeout
    last: list[int] = [-1] * len(paths)
    while time.monotonic() < deadline:
        sizes = [os.path.getsize(p) if os.path.exists(p) else 0 for p in paths]
        if all(s > o for s, o in zip(sizes, offsets)) and sizes == last:
            break
        last = sizes
        time.sleep(settle)
    out = []
    for path, offset in zip(paths, offsets):
        try:
            with open(path, errors="replace") as f:
                f.seek(offset)
                out.append(f.read())
        except OSError:
            out.append("")
    return out
