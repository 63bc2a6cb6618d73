"""One compressor training run with the recipe's defaults and a few knobs, for GPU hosts
(the CLI's train-compressor with the extra options it does not expose yet).

    python bench/train_compressor_gpu.py --out runs/n2 --n 2 --steps 2000 --max-seconds 800
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ccm_chat.training.recipe import train_compressor
from ccm_chat.training.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded one)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="gpu")
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"),
                        default="auto", help="auto: on for models of 1B parameters or more")
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--method", default="concat")
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--eval-episodes", type=int, default=24)
    parser.add_argument("--recall-per-distance", type=int, default=12)
    for f in fields(TrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default)
                            if not isinstance(f.default, bool) else lambda s: s == "true",
                            default=f.default)
    args = parser.parse_args()
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    card = train_compressor(args.model, args.out, config, n_comp=args.n, method=args.method,
                            rank=args.rank, device=args.device,
                            eval_episodes=args.eval_episodes, max_seconds=args.max_seconds,
                            recall_per_distance=args.recall_per_distance, show_progress=False,
                            gradient_checkpointing={"auto": None, "on": True, "off": False}[
                                args.gradient_checkpointing])
    print(json.dumps(card["validation"]))


if __name__ == "__main__":
    main()
