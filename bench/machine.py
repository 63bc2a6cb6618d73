"""Where a benchmark ran, for its JSON: results are only comparable on the same machine and card
(an H100 and an H200 can both answer for "gpu"), the same commit and the same libraries.
write_result is the one way a benchmark writes its JSON."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# module -> distribution, for versions(): the libraries a result's numbers depend on
LIBRARIES = {"llama_cpp": "llama_cpp_python", "torch": "torch", "transformers": "transformers"}


@functools.cache
def describe(device: str) -> str:
    text = f"{platform.machine()} {platform.processor() or ''}".strip()
    text += f", {os.cpu_count()} CPUs"
    if device == "gpu":
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=10).stdout.split("\n")
            text += ", " + (", ".join(n.strip() for n in names if n.strip()) or "GPU unknown")
        except (OSError, subprocess.SubprocessError):
            text += ", GPU unknown (no nvidia-smi)"
    return text


def commit() -> dict[str, Any]:
    """This checkout's short hash and whether its tracked files differ from it. Where there is
    no git checkout (the device tool's copy of the tree has no .git) BENCH_COMMIT, if set, names
    it: `BENCH_COMMIT=abc1234 bash bench/gpu_fast.sh ...`."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    short = git("rev-parse", "--short", "HEAD")
    if short is None:
        return {"hash": os.environ.get("BENCH_COMMIT"), "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"hash": short, "dirty": None if status is None else bool(status)}


def versions() -> dict[str, str | None]:
    """Python's and each library's version (None: not installed): the module's own __version__
    where the benchmark imported it (what ran), else the installed distribution's."""
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version()}
    for module, dist in LIBRARIES.items():
        loaded = getattr(sys.modules.get(module), "__version__", None)
        if loaded is None:
            try:
                loaded = metadata.version(dist)
            except metadata.PackageNotFoundError:
                loaded = None
        found[dist] = str(loaded) if loaded is not None else None
    return found


def write_result(path: Path | str, device: str, result: dict[str, Any] | list[Any], *,
                 indent: int = 1, quiet: bool = False) -> Path:
    """A benchmark's JSON: the command that made it, the machine it ran on (describe(device)),
    the commit and the library versions, then the result's own keys (a list goes under "rows").
    Prints where it wrote unless quiet (a run that saves as it goes)."""
    path = Path(path)
    payload = {"rows": result} if isinstance(result, list) else result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": " ".join(sys.argv), "machine": describe(device),
                                "commit": commit(), "versions": versions(), **payload},
                               indent=indent, default=str) + "\n")
    if not quiet:
        print(f"wrote {path}")
    return path
