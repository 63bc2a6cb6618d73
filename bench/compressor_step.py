"""Training-step cost of the compressor at episode lengths and windows, on a randomly
initialised model of the default model's shape (no weights needed: time and memory depend
only on the shape). For planning GPU runs.

    python bench/compressor_step.py --exchanges 16 64 160 --window 0 4 8 --n 1 2 4
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ccm_chat.engine.ccm.compressor import Compressor
from ccm_chat.engine.hf_weights import torch_placement
from ccm_chat.training.data import Dialogue
from ccm_chat.training.train import TrainConfig, dialogue_loss, plan_for

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, nargs="+", default=[16, 64, 160])
    parser.add_argument("--window", type=int, nargs="+", default=[0, 4, 8])
    parser.add_argument("--n", type=int, nargs="+", default=[2])
    parser.add_argument("--tokens-per-exchange", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    placed, dtype = torch_placement("auto")
    device = placed.type
    rows = []
    for n in args.n:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device, dtype).eval()
        comp = Compressor(model, n_comp=n, rank=8).to(device)
        for p in comp.trainable():
            p.requires_grad_(True)
        for count in args.exchanges:
            rng = random.Random(count)
            length = args.tokens_per_exchange
            ex = [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(count)]
            dialogue = Dialogue(ex, [length // 2] * count)
            for window in args.window:
                config = TrainConfig(max_window=window)
                plan = plan_for(dialogue, config, random.Random(1), window)
                times = []
                torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    parts = dialogue_loss(comp, dialogue, plan, config)
                    parts["loss"].backward()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0
                row = {"n": n, "exchanges": count, "window": window,
                       "tokens": int(parts["tokens"]), "replies": int(parts["replies"]),
                       "seconds": min(times), "peak_gib": round(peak, 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        del comp, model
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      "rows": rows}))


if __name__ == "__main__":
    main()
