"""How many CPU threads llama.cpp gets by default: enough to be fast, not so many that a
busy machine (or the UI thread beside it) makes every thread wait on the slowest one.

llama.cpp's threads synchronise after every layer, so one thread descheduled by a
neighbour stalls them all: on the 2-core dev machine with one CPU-bound neighbour, a reply
fell from 105 to about 2 tok/s with 2 threads and stayed at 51-55 with one (issue 14).
Hyper-threads share a core's arithmetic units and add little to these kernels, so the count
starts from physical cores; decoding (one token a step) leaves a core to the UI, and prompt
processing (big batches, while the UI waits anyway) takes them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Threads:
    decode: int
    batch: int


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores(cpuinfo: str | None = None) -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo, capped by the CPUs this process may
    use; without that file, the logical count."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    cores: set[tuple[str, str]] = set()
    package = core = None
    for line in [*cpuinfo.splitlines(), ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key:
            if core is not None:
                cores.add((package or "0", core))
            package = core = None
    logical = usable_cpus()
    return min(len(cores), logical) if cores else logical


def default_threads(cores: int | None = None) -> Threads:
    cores = physical_cores() if cores is None else max(1, cores)
    return Threads(decode=max(1, cores - 1), batch=cores)


def resolve_threads(n_threads: int | None) -> Threads:
    """A user's count (for both) or the default."""
    if n_threads is None or n_threads <= 0:
        return default_threads()
    return Threads(decode=n_threads, batch=n_threads)
