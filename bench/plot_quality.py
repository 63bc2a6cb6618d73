"""Quality against compression ratio, one line per method, from bench/quality.py's rows
(and bench/quality_kv.py's: KV cache quantization on llama.cpp), drawn next to the first
file's.

    python bench/plot_quality.py bench/results/quality_gpu.json bench/results/quality_kv_cpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from plots import line_chart

# line label -> (the rows' method labels, matplotlib style)
METHODS = {
    "sink+window": (("sink+window",), "s--"),
    "ccm-concat": (("ccm-concat",), "o-"),
    "ccm-merge": (("ccm-merge",), "^-"),
    "KV quantization, K f16/q8_0/q4_0 (llama.cpp)": (
        ("full, K f16", "full, K q8_0", "full, K q4_0"), "d-."),
    "sink+window, K q8_0 (llama.cpp)": (("sink+window, K q8_0",), "v:"),
}


def chart(rows: list[dict], name: str, ylabel: str, out: Path) -> Path:
    picked = [r for r in rows if r["set"] == name]
    series = {}
    for label, (methods, style) in METHODS.items():
        points = sorted((r["ratio"], r["value"]) for r in picked
                        if r["method"] in methods and r["ratio"])
        if points:
            series[label] = ([x for x, _ in points], [y for _, y in points], style)
    xs = [x for x, _, _ in series.values() for x in x]
    for method, label, style in (("full", "full context", "k:"), ("none", "no context", "r:")):
        ref = [r["value"] for r in picked if r["method"] == method]
        if ref and xs:
            series[label] = ([min(xs), max(xs)], [ref[0], ref[0]], style)
    return line_chart(out, series, "compression ratio (full-context f16 KV bytes / bytes held, "
                      "log)", ylabel, f"{ylabel} vs compression ({name})", logx=True)


def main() -> None:
    sources = [Path(a) for a in sys.argv[1:]] or [Path("bench/results/quality_gpu.json")]
    source = sources[0]
    rows = [row for path in sources for row in json.loads(path.read_text())["rows"]]
    for name, ylabel in (("ppl@16", "next-turn perplexity"), ("ppl@32", "next-turn perplexity"),
                         ("recall", "recall accuracy"), ("longchat", "first-topic accuracy")):
        png = source.with_name(f"{source.stem}_{name.replace('@', '')}.png")
        print(chart(rows, name, ylabel, png))


if __name__ == "__main__":
    main()
