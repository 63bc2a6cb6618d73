"""`ccm-chat train-compressor`: train a compressor for a model and write what the app loads.

Writes to the output folder: `compressor.safetensors` (the <COMP> table and the LoRA),
`lora.gguf` (the LoRA as a llama.cpp adapter), `comp_vectors.npy` (float32, for llama.cpp's
embedding batches), `compressor.json` (the base model's fingerprint, the settings, and the
held-apart loss before and after), and the resumable checkpoint.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from engine.ccm.compressor import Compressor
from engine.ccm.data import Tokens, chitchat_pool, load_chitchat, mixed_episodes
from engine.ccm.export import export_lora_gguf
from engine.ccm.train import _trainable_state, episode_loss, train
from engine.hf_backend import load_pretrained
from engine.models import model_cache_dir, model_fingerprint, resolve_model_path

CARD = "compressor.json"


def model_tokens(tokenizer) -> Tokens:
    """The model's chat template and tokenizer, as the data builders want them."""
    def render(messages: list[dict[str, str]], add_assistant: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_assistant)

    return Tokens(render, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])


def load_for_training(model: str | None, device: str):
    """(path, model, tokenizer) on CUDA in bfloat16 when asked for and present, else CPU."""
    path = resolve_model_path(model, allow_dir=True)
    use_cuda = device != "cpu" and torch.cuda.is_available()
    dtype = torch.bfloat16 if use_cuda else torch.float32
    hf, tokenizer = load_pretrained(path, model_cache_dir(), dtype)
    return path, hf.to("cuda" if use_cuda else "cpu").eval(), tokenizer


def train_compressor(
    model: str | None,
    out: Path,
    steps: int = 500,
    n_comp: int = 2,
    method: str = "concat",
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 3e-4,
    device: str = "auto",
    eval_episodes: int = 50,
    seed: int = 0,
    max_seconds: float | None = None,
) -> dict:
    path, hf, tokenizer = load_for_training(model, device)
    torch.manual_seed(seed)
    compressor = Compressor(hf, n_comp=n_comp, rank=rank, alpha=alpha,
                            method=method).to(hf.device)
    tok = model_tokens(tokenizer)
    conversations = load_chitchat()
    held = list(islice(mixed_episodes(tok, chitchat_pool(conversations, held_out=True),
                                      seed=10_000), eval_episodes))

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(episode_loss(compressor, e)) for e in held) / max(1, len(held))

    before = held_loss()
    losses = train(compressor, mixed_episodes(tok, chitchat_pool(conversations, False), seed),
                   steps, out, lr=lr, max_seconds=max_seconds)
    after = held_loss()
    save_file(_trainable_state(compressor), out / "compressor.safetensors")
    export_lora_gguf(hf, out / "lora.gguf", alpha)
    np.save(out / "comp_vectors.npy", compressor.comp.detach().float().cpu().numpy())
    card = {
        "base_model": path.name, "base_fingerprint": model_fingerprint(path),
        "method": method, "n_comp": n_comp, "rank": rank, "alpha": alpha, "lr": lr,
        "steps": json.loads((out / "checkpoint.json").read_text())["step"],
        "device": str(hf.device), "dtype": str(hf.dtype).removeprefix("torch."),
        "data": "chitchat-dataset windows of 1-16 exchanges (train side of a 90/10 split by "
                "conversation id hash), half of them generated recall dialogues (a fact, 1-8 "
                "chitchat exchanges, the question; values from the train side of a value split)",
        "held_apart_reply_nll_before": before, "held_apart_reply_nll_after": after,
        "last_losses": losses[-20:],
    }
    (out / CARD).write_text(json.dumps(card, indent=2))
    return card
