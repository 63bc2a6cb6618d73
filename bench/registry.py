"""The benchmarks, found by looking: every bench/*.py with a main block and every bench/gpu_*.sh.

Nothing is listed by hand, so a new script cannot be missed; helper modules without a main
block (machine.py, plots.py, scoring.py) are not benchmarks. A few facts that reading the file
cannot tell (does it need a GPU) sit in GPU below; a script not named there is judged by its
text (a `--device` option: a GPU is optional; `gpu` in its name: it needs one).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SKIP = {"__init__", "__main__", "registry"}  # this package's own files

# Whether a GPU is needed where the text does not say it plainly: "yes", "optional", "no".
GPU = {
    "hf_fast_check": "yes",  # engine.hf_fast on CUDA only
    "train_scale": "yes",  # `run` times the steps on the GPU (`profile` is CPU)
    "compressor_step": "optional",  # CUDA when there is one
    "compressor_quality": "optional",
    "scale_inference": "optional",
    "scale_shapes": "no",  # writes files for the GPU runs, itself on the CPU
    "compare_revisions": "optional",  # as the benchmark it runs
}

_MAIN = re.compile(r"""^if __name__ == ['"]__main__['"]\s*:""", re.M)
_OUT_DEFAULT = re.compile(r"""add_argument\(\s*["']--out["'][^)]*?default=([^,)]+(?:\([^)]*\))?)""",
                          re.S)
_OUT_REQUIRED = re.compile(r"""add_argument\(\s*["']--out["'][^)]*?required=True""", re.S)
_SH_OUT = re.compile(r"\$OUT/([\w${}:+\-.]+\.json)")


@dataclass
class Benchmark:
    name: str  # the file's stem: `python -m bench run NAME`
    path: Path
    description: str  # the docstring's (or the .sh header's) first line
    gpu: str  # "yes", "optional" or "no"
    writes: list[str] = field(default_factory=list)  # where its JSON goes, as far as known
    results: list[str] = field(default_factory=list)  # bench/results files named after it

    @property
    def kind(self) -> str:
        return "sh" if self.path.suffix == ".sh" else "py"

    @property
    def sourced(self) -> bool:
        """A shell library the gpu_*.sh scripts source (gpu_stage.sh), not a run of its own."""
        return self.kind == "sh" and not self.path.read_text().startswith("#!")


def _py_description(text: str) -> str:
    try:
        doc = ast.get_docstring(ast.parse(text))
    except SyntaxError:
        doc = None
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""


def _sh_description(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#!"):
            continue
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def _py_writes(text: str) -> list[str]:
    writes = []
    for m in _OUT_DEFAULT.finditer(text):
        value = m.group(1).strip()
        path = re.search(r"""["']([^"']+\.json)["']""", value)
        if path and value.startswith("RESULTS"):  # RESULTS / "x.json"
            writes.append(f"bench/results/{path.group(1)}")
        else:  # a quoted path, or a constant such as PROFILE (read below)
            writes.append(path.group(1) if path else value)
    if _OUT_REQUIRED.search(text):
        writes.append("--out PATH")
    # constants such as PROFILE = RESULTS / "train_scale_profile.json" read as their file
    consts = dict(re.findall(r"""^([A-Z_]+) = RESULTS / ["']([^"']+)["']""", text, re.M))
    return [f"bench/results/{consts[w]}" if w in consts else w for w in dict.fromkeys(writes)]


def _gpu(name: str, text: str, kind: str) -> str:
    if name in GPU:
        return GPU[name]
    if kind == "sh" or "gpu" in name:
        return "yes"
    if re.search(r"""["']--device["']""", text):
        return "optional"
    return "no"


def _results(names: list[str]) -> dict[str, list[str]]:
    """Each bench/results file goes to the longest benchmark name it starts with."""
    found: dict[str, list[str]] = {n: [] for n in names}
    if not RESULTS_DIR.is_dir():
        return found
    for f in sorted(RESULTS_DIR.glob("*.json")):
        owners = [n for n in names if f.stem == n or f.stem.startswith(n + "_")]
        if owners:
            found[max(owners, key=len)].append(f.name)
    return found


def discover(bench_dir: Path = BENCH_DIR) -> dict[str, Benchmark]:
    """Every benchmark in bench_dir by name, sorted: .py scripts with a main block, gpu_*.sh."""
    found: dict[str, Benchmark] = {}
    for path in sorted(bench_dir.glob("*.py")):
        if path.stem in SKIP:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not _MAIN.search(text):
            continue
        found[path.stem] = Benchmark(path.stem, path, _py_description(text),
                                     _gpu(path.stem, text, "py"), _py_writes(text))
    for path in sorted(bench_dir.glob("gpu_*.sh")):
        text = path.read_text(encoding="utf-8", errors="replace")
        writes = list(dict.fromkeys("$OUT/" + m for m in _SH_OUT.findall(text)))
        name = path.stem if path.stem not in found else path.name  # gpu_x.sh beside gpu_x.py
        found[name] = Benchmark(name, path, _sh_description(text), "yes", writes)
    if bench_dir == BENCH_DIR:
        for name, files in _results(list(found)).items():
            found[name].results = files
    return dict(sorted(found.items()))
