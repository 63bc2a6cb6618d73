"""Training the compressor: the whole episode in one masked forward, loss on the final reply.

Only the <COMP> table and the LoRA learn; the base model stays frozen. Progress shows with
tqdm; a checkpoint (trainable tensors + the step) is written every so often and a run with
the same checkpoint dir resumes from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm import tqdm

from engine.ccm.compressor import Compressor
from engine.ccm.data import Episode

CHECKPOINT = "checkpoint.safetensors"
STATE = "checkpoint.json"


def episode_loss(compressor: Compressor, episode: Episode) -> torch.Tensor:
    """Mean NLL of the reply tokens, reading the context only through the <COMP> groups."""
    final = episode.prompt + episode.reply
    logits, layout = compressor.parallel_logits([*episode.context, final])
    index = layout.text_index[-1]
    first = len(episode.prompt)
    predict = logits[torch.tensor(index[first - 1 : -1], device=logits.device)]  # rows that
    # predict each reply token
    return F.cross_entropy(predict.float(), torch.tensor(episode.reply, device=predict.device))


def _trainable_state(compressor: Compressor) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in compressor.named_parameters()}
    return {names[id(p)]: p.detach().cpu().contiguous() for p in compressor.trainable()}


def train(
    compressor: Compressor,
    episodes: Iterator[Episode],
    steps: int,
    out_dir: Path,
    lr: float = 3e-4,
    checkpoint_every: int = 50,
    show_progress: bool = True,
    max_seconds: float | None = None,
) -> list[float]:
    """Train for `steps` steps in all (resuming from `out_dir`), or until `max_seconds` have
    passed; return this run's losses."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in compressor.model.parameters():
        p.requires_grad_(False)
    params = compressor.trainable()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = 0
    if (out_dir / STATE).exists():
        compressor.load_state_dict(load_file(out_dir / CHECKPOINT), strict=False)
        start = json.loads((out_dir / STATE).read_text())["step"]
    losses: list[float] = []
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not show_progress,
               desc="compressor")
    started = time.monotonic()
    for step in bar:
        loss = episode_loss(compressor, next(episodes))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        out_of_time = max_seconds is not None and time.monotonic() - started > max_seconds
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps or out_of_time:
            save_file(_trainable_state(compressor), out_dir / CHECKPOINT)
            (out_dir / STATE).write_text(json.dumps({"step": step + 1}))
        if out_of_time:
            break
    return losses
