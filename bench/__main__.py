"""`python -m bench list [--json]` and `python -m bench run NAME [args...]` (from the repo root)."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
import textwrap

from bench.registry import BENCH_DIR, Benchmark, discover

USAGE = """usage: python -m bench list [--json]
       python -m bench run NAME [args...]   (the args go to the script as they are)

list: every benchmark (bench/*.py with a main block, bench/gpu_*.sh), whether it needs a GPU
      and the results it writes; run: runs one, e.g. `python -m bench run decode_speed --help`."""


def show(benchmarks: dict[str, Benchmark]) -> None:
    width = max(len(n) for n in benchmarks) + 2
    for b in benchmarks.values():
        gpu = "sourced" if b.sourced else f"gpu:{b.gpu}"
        print(f"{b.name:<{width}}{gpu:<13}{b.description}")
        notes = []
        if b.writes:
            notes.append("writes " + ", ".join(b.writes))
        if len(b.results) > 3:
            notes.append(f"results: bench/results/{b.name}*.json ({len(b.results)} files)")
        elif b.results:
            notes.append("results: " + ", ".join(b.results))
        for note in notes:
            print(textwrap.fill(note, 100, initial_indent=" " * (width + 13),
                                subsequent_indent=" " * (width + 15)))


def as_json(benchmarks: dict[str, Benchmark]) -> str:
    return json.dumps([{"name": b.name, "path": str(b.path.relative_to(BENCH_DIR.parent)),
                        "kind": b.kind, "description": b.description, "gpu": b.gpu,
                        "sourced": b.sourced, "writes": b.writes, "results": b.results}
                       for b in benchmarks.values()], indent=1)


def run(bench: Benchmark, args: list[str]) -> int:
    """Replace this process by the script's (so `timeout` and Ctrl+C reach the benchmark itself);
    a subprocess where exec is not there."""
    if bench.kind == "sh":
        bash = shutil.which("bash") or "bash"
        argv = [bash, str(bench.path), *args]
    else:
        argv = [sys.executable, str(bench.path), *args]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execv(argv[0], argv)
    return subprocess.call(argv)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    benchmarks = discover()
    if command == "list":
        if "--json" in rest:
            print(as_json(benchmarks))
        else:
            show(benchmarks)
        return 0
    if command == "run":
        if not rest:
            print("python -m bench run: which benchmark? `python -m bench list` names them",
                  file=sys.stderr)
            return 2
        name = rest[0]
        bench = benchmarks.get(name) or benchmarks.get(name.removesuffix(".py")) \
            or benchmarks.get(name.removesuffix(".sh"))
        if bench is None:
            close = difflib.get_close_matches(name, list(benchmarks), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            print(f"python -m bench run: no benchmark named {name!r}{hint}; "
                  "`python -m bench list` names them all", file=sys.stderr)
            return 2
        if bench.sourced:
            print(f"{bench.path.name} is sourced by the gpu_*.sh scripts, not run; "
                  f"see its header", file=sys.stderr)
            return 2
        return run(bench, rest[1:])
    print(f"python -m bench: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # `python -m bench list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
