"""`ccm-chat train-compressor`: train a compressor for a model and write what the app loads.

Writes to the output folder: `compressor.safetensors` (the <COMP> table and the LoRA),
`lora.gguf` (the LoRA as a llama.cpp adapter), `comp_vectors.npy` (float32, for llama.cpp's
embedding batches), `compressor.json` (the base model's fingerprint, the settings, the
held-apart validation results before and after), the resumable checkpoint and the training
log (`train_log.jsonl`: the loss at every step, validation loss and recall as it goes).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ccm_chat.engine.ccm.compressor import Compressor
from ccm_chat.engine.ccm.files import ADAPTER, CARD, VECTORS, WEIGHTS
from ccm_chat.engine.hf_weights import load_pretrained, torch_placement
from ccm_chat.engine.models import model_cache_dir, model_fingerprint, resolve_model_path
from ccm_chat.training import parallel
from ccm_chat.training.data import (
    Corpus,
    ExchangeTokens,
    Tokens,
    load_corpora,
    recall_probes,
    training_dialogue,
)
from ccm_chat.training.evaluate import Read, probe_recall
from ccm_chat.training.train import (
    TrainConfig,
    _trainable_state,
    dialogue_loss,
    enable_checkpointing,
    plan_for,
    train,
)

RECALL_DISTANCES = (2, 8, 32, 128)


def model_tokens(tokenizer) -> Tokens:
    """The model's chat template and tokenizer, as the data builders want them."""
    def render(messages: list[dict[str, str]], add_assistant: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_assistant)

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    tokenize.many = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    return Tokens(render, tokenize)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def load_for_training(model: str | None, device: str, dtype: str = "auto",
                      random_weights: bool = False, seed: int = 0):
    """(path, model, tokenizer): on CUDA in bfloat16 when asked for and present, else the CPU
    in float32, unless `dtype` says ("bf16" or "fp32"). With `random_weights` the model is
    built from a transformers folder's config.json with random weights, directly on the
    device and the same in every process (speed and memory only: what it trains is of no
    use)."""
    from ccm_chat.engine.errors import ModelError

    path = resolve_model_path(model, allow_dir=True)
    placed, default = torch_placement(device)
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"unknown dtype {dtype!r}; one of auto, {', '.join(DTYPES)}")
    chosen = default if dtype == "auto" else DTYPES[dtype]
    if not random_weights:
        if path.is_dir() and not any(next(path.glob(g), None) for g in WEIGHT_FILES):
            raise ModelError(f"{path} holds a config but no weights; --random-weights trains "
                             "on random weights of its shape (to measure speed and memory)")
        hf, tokenizer = load_pretrained(path, model_cache_dir(), chosen)
        return path, hf.to(placed).eval(), tokenizer
    if not path.is_dir():
        raise ModelError("--random-weights needs a transformers model folder (its config.json "
                         f"and tokenizer) as --model, not {path}")
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} has no tokenizer transformers can load ({exc}); training "
                         "needs one for the data, even on random weights") from exc
    return path, random_model(AutoConfig.from_pretrained(path), placed, chosen, seed), tokenizer


def random_model(config, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """A causal LM of `config`'s shape with random weights, made on `device` (an 8B model
    never passes through host memory), the same for the same seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


class Validation:
    """The held-apart validation side, fixed for a run: dialogues scored with the training
    objective (each with its own fixed window), and recall probes at 2..128 exchanges back
    read as pure CCM."""

    def __init__(self, corpus: Corpus, config: TrainConfig, dialogues: int,
                 recall_per_distance: int, distances: tuple[int, ...] = RECALL_DISTANCES,
                 ) -> None:
        rng = random.Random(12345)
        self.config = config
        self.dialogues = [training_dialogue(corpus, rng, config.min_exchanges,
                                            min(config.max_exchanges, 160), config.max_tokens,
                                            config.recall_share, config.max_distance)
                          for _ in range(dialogues)]
        self.plans = [plan_for(d, config, random.Random(f"validation:{i}"))
                      for i, d in enumerate(self.dialogues)]
        self.recall = {d: recall_probes(corpus, d, recall_per_distance, seed=5)
                       for d in distances} if recall_per_distance else {}

    @torch.no_grad()
    def __call__(self, compressor: Compressor) -> dict:
        started = time.monotonic()
        totals = {"loss": 0.0, "nll": 0.0, "kl": 0.0}
        for dialogue, plan in zip(self.dialogues, self.plans, strict=True):
            parts = dialogue_loss(compressor, dialogue, plan, self.config)
            for key in totals:
                totals[key] += float(parts[key]) / max(1, len(self.dialogues))
        out = {f"val_{k}": v for k, v in totals.items()}
        for distance, probes in self.recall.items():
            out[f"val_recall@{distance}"] = probe_recall(compressor, probes, Read("ccm"))
        out["val_seconds"] = round(time.monotonic() - started, 1)
        return out


def train_compressor(
    model: str | None,
    out: Path,
    config: TrainConfig | None = None,
    *,
    n_comp: int = 2,
    method: str = "concat",
    rank: int = 8,
    alpha: float = 16.0,
    device: str = "auto",
    eval_episodes: int = 50,
    max_seconds: float | None = None,
    recall_per_distance: int | None = None,
    data_dir: Path | None = None,
    show_progress: bool = True,
    recall_distances: tuple[int, ...] = RECALL_DISTANCES,
    dtype: str = "auto",
    gradient_checkpointing: bool | None = None,
    random_weights: bool = False,
) -> dict:
    """Train (or resume) a compressor into `out` and write the files the app loads.
    `config` (default: TrainConfig()) is how it trains, the one place steps, lr, seed and the
    rest are set; it is saved in the checkpoint and in the card, and a resume with another is
    refused. The other arguments are the compressor's shape (n_comp, method, rank, alpha),
    where and how the model runs, and how the run is watched. `gradient_checkpointing` None:
    on for models of a billion parameters or more on CUDA. Under a launcher (torchrun,
    accelerate launch) every process trains its share of each step and the first one
    evaluates and writes the files; the others return an empty card."""
    config = config or TrainConfig()
    # steps of very different lengths fragment the allocator's fixed segments: on an
    # emulated 24 GB card the 8B ran out of memory with 21.4 GiB allocated (bench/train_scale)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    here = parallel.world(device)  # before loading: each process takes its own GPU
    path, hf, tokenizer = load_for_training(model, device, dtype, random_weights,
                                          config.seed)
    if hf.device.type != "cuda":
        config = config.for_cpu()
        recall_distances = tuple(d for d in recall_distances if d < config.max_exchanges)
    if gradient_checkpointing is None:
        gradient_checkpointing = (hf.device.type == "cuda"
                                  and sum(p.numel() for p in hf.parameters()) >= 1e9)
    torch.manual_seed(config.seed)
    compressor = Compressor(hf, n_comp=n_comp, rank=rank, alpha=alpha,
                            method=method).to(hf.device)
    if gradient_checkpointing:
        enable_checkpointing(compressor)
    tokens = ExchangeTokens(model_tokens(tokenizer))
    conversations = load_corpora(data_dir)
    train_side = Corpus(conversations, "train", tokens)
    validation = Validation(Corpus(conversations, "validation", tokens), config,
                            eval_episodes, recall_per_distance if recall_per_distance
                            is not None else eval_episodes // 4, recall_distances
                            ) if here.main else None

    def dialogues(step: int):
        return training_dialogue(train_side, random.Random(f"{config.seed}:{step}:data"),
                                 config.min_exchanges, config.max_exchanges,
                                 config.max_tokens, config.recall_share, config.max_distance)

    log = train(compressor, dialogues, config, out, lambda: validation(compressor),
                show_progress=show_progress, max_seconds=max_seconds)
    if not here.main:
        return {}
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    save_file(_trainable_state(compressor), out / WEIGHTS)
    from ccm_chat.training.export import export_lora_gguf  # the gguf package: only when writing

    export_lora_gguf(hf, out / ADAPTER, alpha)
    np.save(out / VECTORS, compressor.comp.detach().float().cpu().numpy())
    step = json.loads((out / "checkpoint.json").read_text())["step"]
    card = {
        "base_model": path.name, "base_fingerprint": model_fingerprint(path),
        "method": method, "n_comp": n_comp, "rank": rank, "alpha": alpha, "lr": config.lr,
        "steps": step, "device": str(hf.device), "dtype": str(hf.dtype).removeprefix("torch."),
        "processes": here.size, "gradient_checkpointing": gradient_checkpointing,
        **({"random_weights": "random base weights: speed and memory only, of no use to "
            "chat with"} if random_weights else {}),
        "objective": (f"per reply: NLL x {config.nll_weight} + KL(frozen model reading the "
                      f"whole history || memory-conditioned model) x {config.kl_weight}, "
                      f"{'every reply' if config.every_reply else 'the last reply'} of each "
                      f"dialogue; hybrid reads with w ~ U(0, {config.max_window}) verbatim "
                      "exchanges after the slots of the older ones"),
        "data": ("chitchat-dataset, Topical-Chat, Synthetic-Persona-Chat and MemoryBank "
                 "dialogues (train side of an 80/10/10 train/validation/test split by a hash of "
                 f"the conversation id), chained into dialogues of {config.min_exchanges}-"
                 f"{config.max_exchanges} exchanges (log-uniform, at most {config.max_tokens} "
                 f"tokens); {config.recall_share:.0%} with 1-3 planted facts asked for "
                 f"2-{config.max_distance} exchanges later (train-side values)"),
        "train_config": asdict(config),
        "held_apart_reply_nll_before": evals[0]["val_nll"] if evals else None,
        "held_apart_reply_nll_after": evals[-1]["val_nll"] if evals else None,
        "validation": evals[-1] if evals else {},
        "last_losses": [r["loss"] for r in log[-20:] if "loss" in r],
    }
    (out / CARD).write_text(json.dumps(card, indent=2))
    return card
