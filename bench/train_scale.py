"""Compressor training at the sizes RTX users run: peak GPU memory and seconds a step.

train-compressor's own step (`train_step`: bf16 frozen base, grads only for the LoRA and the
<COMP> table, the chunked loss, gradient checkpointing on or off) on random weights of the
Llama-3.2-1B / 3B and Llama-3.1-8B shapes (bench/scale_shapes.py): random weights, speed and
memory only. The steps are real ones: `profile` (dev machine, with the data) draws the first
400 steps of a training run at each dialogue cap (--max-tokens) from the training corpora with
the default recipe and the default model's tokenizer, and keeps their lengths and plans (8
steps at the 1/16, 3/16, ... quantiles of the forward's length, and the longest); `run` (GPU
host) replays those steps on each shape with random token ids of the same lengths. A 24 GB
card is emulated with torch.cuda.set_per_process_memory_fraction.

    python bench/train_scale.py profile        # -> bench/results/train_scale_profile.json
    python bench/train_scale.py run --out bench/results/train_scale_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402
from scale_shapes import SHAPES, hf_config, tiny_shape  # noqa: E402

from ccm_chat.engine.ccm.compressor import Compressor  # noqa: E402
from ccm_chat.training.data import Dialogue  # noqa: E402
from ccm_chat.training.parallel import Step, World  # noqa: E402
from ccm_chat.training.train import (  # noqa: E402
    Plan,
    TrainConfig,
    enable_checkpointing,
    plan_for,
    schedule,
    step_blocks,
    train_step,
)

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = RESULTS / "train_scale_profile.json"
CAPS = (8192, 4096, 2048)
N_COMP = 2  # the shipped compressor's slots an exchange
GIB = 1 << 30
STRATA = 8


# ---------------------------------------------------------------- profile (dev machine)

def step_shape(dialogue: Dialogue, plan: Plan) -> dict:
    """What a step's cost depends on: the forward's length (text, slots and read blocks),
    the teacher's (the whole history up to the last scored reply) and the rows scored."""
    blocks, block_of = step_blocks(dialogue, plan)
    last = max([*plan.pure, *plan.hybrid])
    ex, starts = dialogue.exchanges, dialogue.reply_starts
    return {"forward": sum(len(t) + (N_COMP if c else 0) for t, _, c in blocks),
            "teacher": sum(len(e) for e in ex[:last + 1]),
            "scored": sum(len(ex[j]) - starts[j] for j, _ in block_of)}


def _summary(values: list[int]) -> dict:
    values = sorted(values)
    return {"mean": round(statistics.fmean(values)), "p50": values[len(values) // 2],
            "p90": values[int(len(values) * 0.9)], "max": values[-1]}


def profile(steps: int, out: Path, caps: list[int]) -> None:
    from ccm_chat.training.data import Corpus, ExchangeTokens, load_corpora, training_dialogue
    from ccm_chat.training.recipe import load_for_training, model_tokens

    _, _, tokenizer = load_for_training(None, "cpu")
    corpus = Corpus(load_corpora(), "train", ExchangeTokens(model_tokens(tokenizer)))
    result = {"steps": steps, "tokenizer": "the default model's (SmolLM2-135M-Instruct)",
              "recipe": "TrainConfig() defaults but max_tokens, seed 0", "caps": {}}
    for cap in caps:
        config = TrainConfig(max_tokens=cap)
        drawn = []
        for i in range(steps):  # what recipe.train_compressor's dialogues(i) and train() draw
            d = training_dialogue(corpus, random.Random(f"0:{i}:data"), config.min_exchanges,
                                  config.max_exchanges, cap, config.recall_share,
                                  config.max_distance)
            plan = plan_for(d, config, random.Random(f"0:{i}:plan"))
            if plan.pure or plan.hybrid:  # else train() takes a zero step
                drawn.append((step_shape(d, plan), d, plan))
        steps = len(drawn)
        drawn.sort(key=lambda x: x[0]["forward"])
        picks = [drawn[int((k + 0.5) * steps / STRATA)] for k in range(STRATA)] + [drawn[-1]]
        result["caps"][str(cap)] = {
            **{key: _summary([s[key] for s, _, _ in drawn])
               for key in ("forward", "teacher", "scored")},
            "steps": steps, "exchanges": _summary([len(d.exchanges) for _, d, _ in drawn]),
            "sample": [{**s, "exchange_lengths": [len(e) for e in d.exchanges],
                        "reply_starts": d.reply_starts, "window": p.window, "pure": p.pure,
                        "hybrid": p.hybrid} for s, d, p in picks]}
        print(cap, {k: v for k, v in result["caps"][str(cap)].items() if k != "sample"})
    write_result(out, "cpu", result)


# ---------------------------------------------------------------- run (GPU host)

def replayed(entry: dict, rng: random.Random) -> tuple[Dialogue, Plan]:
    """A profiled step with random token ids of its lengths (ids below the default model's
    vocabulary, inside every shape's)."""
    ex = [[rng.randrange(49152) for _ in range(n)] for n in entry["exchange_lengths"]]
    return (Dialogue(ex, entry["reply_starts"]),
            Plan(entry["window"], entry["pure"], entry["hybrid"]))


class Bench:
    """One shape on the GPU: the compressor around a random-weight model, the optimizer, and
    timed steps."""

    def __init__(self, name: str, device: str) -> None:
        from ccm_chat.training.recipe import random_model

        self.name, self.device = name, torch.device(device)
        shape = SHAPES[name] if name in SHAPES else tiny_shape(name.split("-")[1])
        self.model = random_model(hf_config(shape), self.device, torch.bfloat16)
        self.weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.params_b = sum(p.numel() for p in self.model.parameters()) / 1e9
        self.comp = Compressor(self.model, n_comp=N_COMP, rank=8).to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        trainable = self.comp.trainable()
        for p in trainable:
            p.requires_grad_(True)
        self.config = TrainConfig()
        self.optimizer = torch.optim.AdamW(trainable, lr=self.config.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           schedule(self.config))
        self.stepper = Step(trainable, World())
        self.checkpointing = None

    def step(self, item: tuple[Dialogue, Plan], cap: int) -> dict:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        parts, _ = train_step(self.stepper, self.comp, [item],
                              replace(self.config, max_tokens=cap), self.optimizer,
                              self.scheduler)
        if cuda:
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start, "loss": parts["loss"],
                "allocated": torch.cuda.max_memory_allocated() if cuda else 0,
                "reserved": torch.cuda.max_memory_reserved() if cuda else 0}

    def run(self, profile: dict, cap: int, checkpointing: bool, limit_gib: float | None,
            which: str) -> dict:
        """Steps of the profile at `cap` (which: "all" = the strata and the longest, "worst"
        = the longest only, "few" = two strata and the longest)."""
        if checkpointing != self.checkpointing:
            if checkpointing:
                enable_checkpointing(self.comp)
            else:
                (getattr(self.model, "activation_checkpointing_disable", None)
                 or self.model.gradient_checkpointing_disable)()
            self.checkpointing = checkpointing
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, limit_gib * GIB / total) if limit_gib else 1.0)
        sample = profile["caps"][str(cap)]["sample"]
        rng = random.Random(cap)
        items = [replayed(e, rng) for e in sample]
        strata, worst = items[:-1], items[-1]
        chosen = {"all": strata, "few": strata[3:5], "worst": []}[which]
        row = {"shape": self.name, "params_b": round(self.params_b, 3),
               "weights_gib": round(self.weights / GIB, 2), "max_tokens": cap,
               "checkpointing": checkpointing, "limit_gib": limit_gib, "steps": which,
               "forward_tokens_mean": profile["caps"][str(cap)]["forward"]["mean"],
               "forward_tokens_longest": sample[-1]["forward"]}
        try:
            if which != "worst":
                self.step(chosen[len(chosen) // 2], cap)  # warm-up: kernels, workspaces
            timed = [self.step(item, cap) for item in chosen]
            longest = self.step(worst, cap)
        except torch.OutOfMemoryError as exc:
            self.optimizer.zero_grad(set_to_none=True)
            self._free()
            return {**row, "fits": False, "error": str(exc).splitlines()[0][:200]}
        steps = [*timed, longest]
        if timed:
            row["seconds_mean"] = round(statistics.fmean(t["seconds"] for t in timed), 3)
            row["hours_per_1000_steps"] = round(row["seconds_mean"] * 1000 / 3600, 2)
        row.update({"fits": True, "seconds_longest": round(longest["seconds"], 3),
                    "seconds_each": [round(t["seconds"], 3) for t in timed],
                    "peak_allocated_gib": round(max(t["allocated"] for t in steps) / GIB, 2),
                    "peak_reserved_gib": round(max(t["reserved"] for t in steps) / GIB, 2),
                    "peak_allocated_longest_gib": round(longest["allocated"] / GIB, 2),
                    "losses_finite": all(t["loss"] == t["loss"] for t in steps)})
        return row

    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()

    def close(self) -> None:
        del self.comp, self.model, self.optimizer, self.stepper
        self._free()


def plan_runs(shapes: list[str], caps: list[int], fit: str,
              card: float | None = None) -> list[tuple]:
    """(shape, cap, checkpointing, limit, steps) in the order they run: the `fit` shape at
    every cap, then on the emulated card (the cap decided from its measured peaks, in
    `main`), then the others at the two longest caps; each once without checkpointing.
    With `card`: only the `fit` shape on the card, at every cap."""
    if card:
        return [(fit, cap, True, card, "all") for cap in caps]
    runs = []
    for shape in shapes:
        if shape == fit:
            runs += [(shape, cap, True, None, "all") for cap in caps]
            runs += [(shape, "card", True, None, "all")]
        else:
            runs += [(shape, cap, True, None, "all") for cap in caps[:2]]
        runs += [(shape, caps[0], False, None, "few")]
    return runs


def table(rows: list[dict]) -> str:
    lines = ["| shape | max tokens | checkpointing | memory limit | s/step (mean) | "
             "h / 1,000 steps | longest step s | peak allocated GiB | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['max_tokens']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['limit_gib'] or '-'} | {r.get('seconds_mean', '-')} | "
            f"{r.get('hours_per_1000_steps', '-')} | {r.get('seconds_longest', '-')} | "
            f"{r.get('peak_allocated_gib', '-')} | {'yes' if r['fits'] else 'OOM'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile", help="the realistic steps, from the data (dev machine)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", type=Path, default=PROFILE)
    p.add_argument("--caps", type=int, nargs="+", default=list(CAPS))
    r = sub.add_parser("run", help="time the steps on each shape (GPU)")
    r.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "llama-3.2-1b",
                                                   "llama-3.2-3b"])
    r.add_argument("--profile", type=Path, default=PROFILE)
    r.add_argument("--out", type=Path, default=RESULTS / "train_scale_gpu.json")
    r.add_argument("--card-gib", type=float, default=23.0,
                   help="allocator limit of the emulated 24 GB card (24 GiB less ~1 GiB for "
                        "the CUDA context and a desktop)")
    r.add_argument("--budget-s", type=float, default=1e9, help="start no run after this")
    r.add_argument("--card-only", action="store_true",
                   help="only the --fit shape on the emulated card, at every cap")
    r.add_argument("--fit", default="llama-3.1-8b", help="the shape fitted to the card")
    r.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    args = parser.parse_args()
    if args.cmd == "profile":
        profile(args.steps, args.out, args.caps)
        return
    started = time.monotonic()
    prof = json.loads(args.profile.read_text())
    caps = sorted((int(c) for c in prof["caps"]), reverse=True)
    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__,
              "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "note": "random weights: speed and memory only", "profile": str(args.profile),
              "rows": []}
    import transformers

    result["transformers"] = transformers.__version__
    bench = None
    runs = plan_runs(args.shapes, caps, args.fit, args.card_gib if args.card_only else None)
    for shape, cap, ckpt, limit, which in runs:
        if time.monotonic() - started > args.budget_s:
            print(f"budget spent: not run {shape} {cap} {ckpt}", flush=True)
            continue
        if bench is None or bench.name != shape:
            if bench is not None:
                bench.close()
            bench = Bench(shape, args.device)
        if cap == "card":  # the longest cap whose measured peak leaves 3 % of the card free
            limit = args.card_gib
            fitting = [r["max_tokens"] for r in result["rows"] if r["shape"] == shape
                       and r["fits"] and r["checkpointing"] and not r["limit_gib"]
                       and r["peak_allocated_gib"] <= 0.97 * limit]
            cap = max(fitting) if fitting else min(caps)
            if cap != caps[0]:  # and show whether the longest one does
                result["rows"].append(bench.run(prof, caps[0], True, limit, "worst"))
        row = bench.run(prof, cap, ckpt, limit, which)
        row["elapsed_s"] = round(time.monotonic() - started, 1)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_result(args.out, "gpu" if args.device == "cuda" else "cpu", result, quiet=True)
    print(f"wrote {args.out}")
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
