"""How often replies loop: the share of replies that run to the token cap, on 30 fixed
prompts, under the old sampling (no penalties) and the new defaults, side by side in one run.

A reply that reaches the cap on the default model is nearly always a repetition loop (the
trial in issue 14 saw 27 of 31 do so); the table also counts replies whose last 120
characters repeat a 12+ character run three times.

    python bench/loop_rate.py --out bench/results/loop_rate_cpu.json
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import write_result  # noqa: E402
from ccm_chat.engine import Engine, SamplingParams  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Give me three tips for better sleep.",
    "Write a short poem about the sea.", "Explain what a black hole is.",
    "How do I make a cup of tea?", "What are the planets of the solar system?",
    "Tell me a joke about cats.", "Summarise the story of Cinderella.",
    "Why is the sky blue?", "What should I pack for a weekend trip?",
    "Write a haiku about autumn.", "How does a bicycle work?",
    "What is photosynthesis?", "Give me a recipe for pancakes.",
    "What is the difference between weather and climate?", "Describe a good morning routine.",
    "How can I learn a new language quickly?", "What is machine learning?",
    "Write a limerick about a dog.", "What are some healthy snacks?",
    "Explain how vaccines work.", "What is the tallest mountain in the world?",
    "How do airplanes stay in the air?", "List five fruits that are red.",
    "What is the boiling point of water?", "How do I write a good email?",
    "Tell me about the Roman Empire.", "What are the benefits of exercise?",
    "How do I care for a houseplant?", "What is a good name for a goldfish?",
]
OLD = SamplingParams(repeat_penalty=1.0, dry_multiplier=0.0)


def looping(text: str) -> bool:
    tail = text[-120:]
    return re.search(r"(.{12,}?)\1\1", tail, re.S) is not None


def run(engine: Engine, params: SamplingParams, seeds: int) -> dict:
    capped = loops = 0
    tokens, seconds = [], 0.0
    for seed in range(seeds):
        for prompt in PROMPTS:
            conv = engine.new_conversation()
            text = "".join(conv.send(prompt, replace(params, seed=seed)))
            reply = conv.last_reply
            capped += reply.finish_reason == "length"
            loops += looping(text)
            tokens.append(reply.tokens)
            seconds += reply.decode_seconds
    n = seeds * len(PROMPTS)
    return {"replies": n, "hit_cap": capped, "cap_rate": round(capped / n, 3),
            "looping_tail": loops, "mean_tokens": round(statistics.fmean(tokens), 1),
            "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/results/loop_rate.json"))
    args = ap.parse_args()
    variants = {
        "old (no penalties)": replace(OLD, max_tokens=args.max_tokens),
        "new defaults": SamplingParams(max_tokens=args.max_tokens),
    }
    rows = []
    with Engine.load(n_ctx=2048, device=args.device) as engine:
        for name, params in variants.items():
            t0 = time.time()
            rows.append({"sampling": name, "params": {k: v for k, v in vars(params).items()
                                                      if k != "stop"}, **run(engine, params,
                                                                             args.seeds)})
            print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print("| sampling | replies | hit the cap | looping tail | mean tokens |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampling']} | {r['replies']} | {r['hit_cap']} ({r['cap_rate']:.0%}) | "
              f"{r['looping_tail']} | {r['mean_tokens']} |")
    write_result(args.out, args.device, {"rows": rows})


if __name__ == "__main__":
    main()
