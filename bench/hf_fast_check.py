"""The hf back end's fast path (engine.hf_fast) against its eager path, on one GPU.

Random weights shaped exactly as the default model (SmolLM2-135M: 30 layers, 9 heads, 3 KV
heads, vocabulary 49,152) in bfloat16, so it needs no model file: speed does not depend on
the weights' values, and both paths run the same weights. Checks, side by side: logits of
the fast path against the eager DynamicCache path after a prefill, over greedy decoding, after
an eviction with shift, after <COMP> slots (a random LoRA, adapter on) and a merge; save ->
restore of the fast path (bit-exact continuation); then decode speed at several cache lengths
for the eager path and the fast path with each decode attention, and what the per-turn edits
cost. Prints a table and writes JSON.

    python bench/hf_fast_check.py --out bench/results/hf_fast_check_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ccm_chat.engine.ccm.compressor import Compressor
from ccm_chat.engine.config import SamplingParams
from ccm_chat.engine.hf_backend import HFContext
from ccm_chat.engine.hf_fast import FastHFContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
GREEDY = SamplingParams(temperature=0.0)


def build(device: str, shape: dict) -> SimpleNamespace:
    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    comp = Compressor(model, n_comp=2, rank=8, alpha=16.0)
    for p in comp.trainable():  # a LoRA that changes what the slots hold
        torch.nn.init.normal_(p, std=0.05)
    comp = comp.to(device, dtype)
    return SimpleNamespace(torch_model=model, config=config, device=torch.device(device),
                           n_vocab=config.vocab_size, n_ctx_train=8192, compressor=comp)


def diff(a: HFContext, b: HFContext) -> float:
    return float(np.abs(a.logits() - b.logits()).max())


def slots_over_text(ctx: HFContext, vectors: np.ndarray, start: int) -> None:
    """<COMP> slots (adapter on) after the text from `start`; the text goes and the slots
    take its place, as a CCM compression does."""
    end = len(ctx.positions)
    ctx.decode_embeddings(vectors, end, adapter=object())
    ctx.remove(start, end)
    ctx.shift(end, -1, start - end)


def slot_rows(model, n_ctx: int, prompt: list[int], vectors: np.ndarray) -> dict:
    """The <COMP> rows' cells from their captured forward against the eager one, over two
    spans (the second compression reads the first one's slots)."""
    captured, eager = FastHFContext(model, n_ctx), FastHFContext(model, n_ctx)
    eager.row_graphs = False
    out = {}
    for c in (captured, eager):
        c.decode(prompt[:200], 0)
        slots_over_text(c, vectors, 4)  # in the span of 256 cells
        c.decode(prompt, len(c.positions))  # past 256 cells: the next span
        slots_over_text(c, vectors, 6)
    a, b = (c.cache.kv[..., : c.cache.held, :].float() for c in (captured, eager))
    out["slot_cells_graph_vs_eager_max_abs"] = float((a - b).abs().max())
    out["slot_cells_abs_max"] = float(b.abs().max())
    out["row_graphs_captured"] = sum(1 for k in captured._graphs if isinstance(k, tuple))
    return out


def exactness(model, n_ctx: int) -> dict:
    eager, fast = HFContext(model, n_ctx), FastHFContext(model, n_ctx)
    both = (eager, fast)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.n_vocab, (300,), generator=gen).tolist()
    out: dict = {}
    for c in both:
        c.decode(prompt, 0)
    out["prefill_max_abs"] = diff(eager, fast)
    out["logit_std"] = float(np.std(eager.logits()))
    sampler = fast.sampler(GREEDY)
    steps, agree = [], 0
    for _ in range(48):
        tok = sampler.sample(fast)
        agree += tok == int(np.argmax(eager.logits()))
        for c in both:
            c.decode([tok], len(c.positions))
        steps.append(diff(eager, fast))
    out["decode_max_abs"], out["greedy_agree"] = max(steps), agree / 48
    for c in both:  # a window eviction: drop [4, 104), shift the rest down
        c.remove(4, 104)
        c.shift(104, -1, -100)
        c.decode(prompt[:16], len(c.positions))
    out["after_evict_max_abs"] = diff(eager, fast)
    vectors = model.compressor.comp.detach().float().cpu().numpy()
    for c in both:
        slots_over_text(c, vectors, 4)
        c.decode(prompt[16:40], len(c.positions))
    out["after_slots_max_abs"] = diff(eager, fast)
    out.update(slot_rows(model, n_ctx, prompt, vectors))
    for c in both:
        c.merge_slots(2, 0.5)
        c.decode([prompt[0]], len(c.positions))
    out["after_merge_max_abs"] = diff(eager, fast)
    blob = fast.get_state()
    copy = FastHFContext(model, n_ctx)
    copy.set_state(blob)
    for c in (fast, copy, eager):
        c.decode([prompt[1]], len(c.positions))
    out["restore_max_abs"] = diff(fast, copy)  # must be 0: the same cells, the same graph
    out["restore_vs_eager_max_abs"] = diff(fast, eager)
    other = HFContext(model, n_ctx)
    other.set_state(blob)
    other.decode([prompt[1]], len(other.positions))
    out["fast_state_in_eager_max_abs"] = diff(other, eager)
    return out


def speed(model, n_ctx: int, lengths: list[int], steps: int, compiled: list[int]) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(2)
    paths = [("eager (DynamicCache)", lambda: HFContext(model, n_ctx), 12, lengths),
             ("fast: split attention, fused norms (default)",
              lambda: FastHFContext(model, n_ctx, attention="split"), steps, lengths),
             ("fast: split attention, transformers' norms", lambda: FastHFContext(
                 model, n_ctx, attention="split", fuse_norms=False), steps, lengths),
             ("fast: sdpa attention, fused norms",
              lambda: FastHFContext(model, n_ctx, attention="sdpa"), steps, lengths)]
    if compiled:
        paths.append(("fast, split, torch.compile", lambda: FastHFContext(
            model, n_ctx, attention="split", compile_step=True), steps, compiled))
    for label, make, n, at in paths:
        ctx = make()
        for length in at:
            ctx.clear()
            prompt = torch.randint(0, model.n_vocab, (length,), generator=gen).tolist()
            torch.cuda.synchronize()
            start = time.perf_counter()
            ctx.decode(prompt, 0)
            _ = ctx.logits()
            prefill = time.perf_counter() - start
            sampler = ctx.sampler(GREEDY)
            start = time.perf_counter()
            for _ in range(3):  # the first step at a span captures its graph
                ctx.decode([sampler.sample(ctx)], len(ctx.positions))
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(n):
                ctx.decode([sampler.sample(ctx)], len(ctx.positions))
            torch.cuda.synchronize()
            tok_s = n / (time.perf_counter() - start)
            rows.append({"path": label, "cells": length, "decode_tok_s": tok_s,
                         "prefill_s": prefill, "first_3_steps_s": first})
            print(f"{label:46} {length:>6} cells: decode {tok_s:8.1f} tok/s, prefill "
                  f"{prefill * 1000:7.1f} ms, first 3 steps (capture) {first:.2f} s", flush=True)
        ctx.close()
    return rows


def edits(model, n_ctx: int) -> dict:
    """What the per-turn memory edits cost on the fast path at 512 cells held."""
    ctx = FastHFContext(model, n_ctx)
    prompt = torch.randint(0, model.n_vocab, (512,)).tolist()
    vectors = model.compressor.comp.detach().float().cpu().numpy()
    out = {}

    def timed(name, fn, repeat=5):
        times = []
        for _ in range(repeat):
            ctx.clear()
            ctx.decode(prompt, 0)
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            _ = ctx.logits()  # what the next step would wait for
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[name] = 1000 * float(np.median(times))

    timed("evict_64_and_shift_ms", lambda: (ctx.remove(4, 68), ctx.shift(68, -1, -64)))
    timed("comp_slots_ms", lambda: ctx.decode_embeddings(vectors, 512, adapter=object()))
    ctx.row_graphs = False
    timed("comp_slots_eager_ms", lambda: ctx.decode_embeddings(vectors, 512, adapter=object()))
    ctx.row_graphs = True
    timed("decode_40_tokens_ms", lambda: ctx.decode(prompt[:40], 512))
    timed("get_state_ms", ctx.get_state)
    blob = ctx.get_state()
    timed("set_state_ms", lambda: ctx.set_state(blob))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="100,1000,4000,7600")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--sections", default="exactness,edits,speed")
    parser.add_argument("--compiled", default="1000",
                        help="lengths to time with torch.compile too ('' for none)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/hf_fast_check_gpu.json"))
    args = parser.parse_args()
    model = build("cuda", SMOLLM2_135M)
    import transformers

    result = {"torch": torch.__version__, "transformers": transformers.__version__,
              "model": "random weights, SmolLM2-135M shape, bfloat16"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for name, fn in (("exactness", exactness), ("edits_ms", edits)):
            if name.split("_")[0] in args.sections:
                result[name] = fn(model, args.n_ctx)
                print(json.dumps(result[name], indent=1), flush=True)
                write_result(args.out, "gpu", result, quiet=True)  # a cut run keeps it
        compiled = [int(x) for x in args.compiled.split(",") if x]
        if "speed" not in args.sections:
            return
        rows = result["speed"] = speed(model, args.n_ctx,
                                       [int(x) for x in args.lengths.split(",")], args.steps,
                                       compiled)
    write_result(args.out, "gpu", result)
    print("| path | cells | decode tok/s | prefill ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['cells']} | {r['decode_tok_s']:.1f} | "
              f"{1000 * r['prefill_s']:.1f} |")


if __name__ == "__main__":
    main()
