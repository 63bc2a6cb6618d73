"""Quality against compression ratio, one line per method, from bench/quality.py's rows.

    python bench/plot_quality.py bench/results/quality_gpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from plots import line_chart

METHODS = {"sink+window": "s--", "ccm-concat": "o-", "ccm-merge": "^-"}


def chart(rows: list[dict], name: str, ylabel: str, out: Path) -> Path:
    picked = [r for r in rows if r["set"] == name]
    series = {}
    for method, style in METHODS.items():
        points = sorted((r["ratio"], r["value"]) for r in picked
                        if r["method"] == method and r["ratio"])
        if points:
            series[method] = ([x for x, _ in points], [y for _, y in points], style)
    xs = [x for x, _, _ in series.values() for x in x]
    for method, label, style in (("full", "full context", "k:"), ("none", "no context", "r:")):
        ref = [r["value"] for r in picked if r["method"] == method]
        if ref and xs:
            series[label] = ([min(xs), max(xs)], [ref[0], ref[0]], style)
    return line_chart(out, series, "compression ratio (full-context tokens / cells held, log)",
                      ylabel, f"{ylabel} vs compression ({name})", logx=True)


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/quality_gpu.json")
    rows = json.loads(source.read_text())["rows"]
    for name, ylabel in (("ppl@16", "next-turn perplexity"), ("ppl@32", "next-turn perplexity"),
                         ("recall", "recall accuracy"), ("longchat", "first-topic accuracy")):
        png = source.with_name(f"{source.stem}_{name.replace('@', '')}.png")
        print(chart(rows, name, ylabel, png))


if __name__ == "__main__":
    main()
