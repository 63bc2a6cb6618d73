"""Run one benchmark on two revisions of this repository, alternating, in one run.

A restructuring should change no number: this runs the same bench script of an older commit
(from a temporary git worktree) and of the working tree, A B A B ..., so the machine's noise
falls on both alike, then prints every numeric result the two JSON files share, side by side.

    python bench/compare_revisions.py --base 76df1a7 --rounds 2 -- \
        decode_speed.py --tokens 200 --repeats 3 --n-ctx 2048 --device cpu

An old tree laid out with top-level packages (`from engine import ...`) runs with its root on
PYTHONPATH; the working tree runs through the installed `ccm_chat` namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import write_result  # isort: skip  (bench/ is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]


def flatten(value: object, prefix: str = "") -> dict[str, float]:
    """Numeric leaves by path; rows of a list are named by their level/length fields."""
    out: dict[str, float] = {}
    if isinstance(value, bool):
        return out
    if isinstance(value, int | float):
        return {prefix: float(value)}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            name = str(i)
            if isinstance(item, dict):
                tags = [str(item[k]) for k in ("level", "config", "transcript_tokens", "exchange")
                        if k in item]
                name = "/".join(tags) or name
            out.update(flatten(item, f"{prefix}[{name}]"))
    return out


def run_once(tree: Path, script: list[str], out: Path, old_layout: bool) -> dict[str, float]:
    env = dict(os.environ)
    if old_layout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(tree / "bench" / script[0]), *script[1:], "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return flatten(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the older commit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("script", nargs=argparse.REMAINDER,
                        help="-- BENCH.py [its arguments, without --out]")
    args = parser.parse_args()
    script = [a for a in args.script if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.base], check=True, capture_output=True)
        try:
            old_layout = "package-dir" not in (base / "pyproject.toml").read_text()
            runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
            for r in range(args.rounds):
                for name, tree in (("base", base), ("head", ROOT)):
                    result = run_once(tree, script, Path(tmp) / f"{name}{r}.json",
                                      old_layout and name == "base")
                    runs[name].append(result)
                    print(f"round {r + 1}: {name} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False, capture_output=True)
    shared = sorted(set.intersection(*(set(r) for rs in runs.values() for r in rs)))
    rows = []
    for key in shared:
        b = statistics.median(r[key] for r in runs["base"])
        h = statistics.median(r[key] for r in runs["head"])
        if b == h == 0:
            continue
        rows.append({"metric": key, "base": b, "head": h, "head_over_base": h / b if b else None})
    width = max((len(r["metric"]) for r in rows), default=10)
    print(f"{'metric':<{width}}  {'base':>12}  {'head':>12}  head/base")
    for row in rows:
        ratio = f"{row['head_over_base']:.3f}" if row["head_over_base"] is not None else "-"
        print(f"{row['metric']:<{width}}  {row['base']:>12.4g}  {row['head']:>12.4g}  {ratio}")
    if args.out:
        write_result(args.out, "cpu", {
            "command": "python bench/compare_revisions.py " + " ".join(sys.argv[1:]),
            "base": args.base, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
