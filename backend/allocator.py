"""glibc allocator settings for processes that run the model, applied by re-executing the process.

glibc returns freed activations to the OS and faults them back in on every pass; keeping them mapped is
worth 1.5-3x on CPU (docs/targets.md). Memory kept that way stays in the arena of the thread that freed it,
and glibc makes up to 8 arenas per core for a server's many threads: two arenas bound that (25 annotators on
embedded mode: 3.6 GB instead of 5.3 GB, bench/bench_load.py). The variables only act at process start,
hence the re-exec (:func:`ensure_allocator_env`), used by the ``segmask`` command and the benchmarks.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_ARENA_MAX": "2",
}
# Set by the re-exec to the process id, which exec keeps and a child process does not share: so a process
# knows it was re-executed, and a child started with the same environment does not think it was.
REEXEC_MARK = "SEGMASK_ALLOCATOR_REEXEC"


def ensure_allocator_env(argv: list[str] | None = None, use: bool = True) -> bool:
    """Re-exec this process once, as ``python *argv`` (default: its own command line after the
    interpreter, ``sys.orig_argv[1:]``), with :data:`ALLOCATOR_ENV` set (``use``; values already in the
    environment are kept, so other settings can be tried from the shell) or removed (``use=False``, for
    benchmarks measuring without them), unless the environment already is so.

    Returns whether this process is the result of that re-exec; does not return when it re-executes.
    """
    present = [k for k in ALLOCATOR_ENV if k in os.environ]
    reexecuted = os.environ.get(REEXEC_MARK) == str(os.getpid())
    if (use and len(present) == len(ALLOCATOR_ENV)) or (not use and not present):
        return reexecuted
    if reexecuted:
        raise RuntimeError("allocator environment still wrong after re-exec")
    env = {**os.environ, REEXEC_MARK: str(os.getpid())}
    for key, value in ALLOCATOR_ENV.items():
        if use:
            env.setdefault(key, value)
        else:
            env.pop(key, None)
    log.info("re-executing with allocator variables %s", "set" if use else "removed")
    sys.stdout.flush()
    sys.stderr.flush()
    command = sys.orig_argv[1:] if argv is None else argv
    os.execve(sys.executable, [sys.executable, *command], env)
    raise AssertionError("unreachable: execve replaced the process")
