"""GPU smoke check: both back ends on the GPU, each memory level, exact save/restore.

Not a speed benchmark: it answers "does the engine work on this GPU" with one JSON of
facts (answers, token counts, the largest logit difference after save -> restore).

    python bench/gpu_smoke.py --out bench/results/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ccm_chat.engine import Engine, SamplingParams  # isort: skip  (llama_cpp before numpy, see engine)
import numpy as np  # isort: skip
from machine import write_result  # isort: skip  (bench/ is sys.path[0])

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
TURNS = [
    ("My name is Ada and I live in Lisbon.", "Nice to meet you, Ada from Lisbon."),
    ("I have a dog called Pixel who loves the beach.", "Pixel sounds like a happy dog."),
    ("My favourite food is grilled sardines with bread.", "Grilled sardines are a classic."),
] * 12


def next_logits(conv) -> np.ndarray:
    conv.add_turn("user", "Where do I live?", decode=False)
    for _ in conv.generate(SamplingParams(temperature=0.0, max_tokens=1)):
        pass
    row = conv.engine.ctx.logits(-1)
    conv.truncate(len(conv.messages) - 2)
    return row


def check(backend: str, level: str, cache_dir: Path) -> dict:
    eng = Engine.load(backend=backend, compression=level, device="gpu", n_ctx=2048,
                      cache_dir=cache_dir)
    try:
        conv = eng.new_conversation()
        answer = "".join(conv.send("What is the capital of France?", GREEDY))
        for user, reply in TURNS:
            conv.add_turn("user", user)
            conv.add_turn("assistant", reply)
        stats = conv.stats()
        blob = conv.save_state()
        expected = next_logits(conv)
        restored = eng.restore_conversation(blob)
        diff = float(np.abs(next_logits(restored) - expected).max())
        return {"backend": backend, "level": level, "device": eng.info.device,
                "method": eng.compression.describe(), "answer": answer,
                "tokens_held": stats.memory_tokens, "tokens_seen": stats.full_context_tokens,
                "bytes_held": stats.memory_bytes, "restore_max_logit_diff": diff,
                "positions": [eng.ctx.pos_min(), eng.ctx.pos_max()]}
    finally:
        eng.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_smoke.json"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ccm-gpu-cache"))
    parser.add_argument("--backends", default="llamacpp,hf")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        for level in ("off", "balanced", "aggressive"):
            try:
                rows.append(check(backend, level, args.cache_dir))
            except Exception as exc:  # report every combination, even a failing one
                rows.append({"backend": backend, "level": level, "error": repr(exc)})
            print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, "gpu", {"rows": rows}, indent=2)


if __name__ == "__main__":
    main()
