"""What the tests of llama.cpp's host-made steps share: every kind of step, a first load that
llama.cpp refuses, and how far apart two next-token distributions are."""

from __future__ import annotations

import numpy as np

from ccm_chat.engine.errors import EngineError

# every kind of host-made step (LlamaContext._host_moved): what turned, whether old cells went
ALL_KINDS = {f"{drop}{moved}" for drop in ("", "drop ") for moved in ("still", "up", "down",
                                                                      "up down")}


def refuse_first_load(ctx, monkeypatch) -> list[int]:
    """The context's next set_state fails as llama.cpp's refusal does (the cache emptied);
    later ones load. Returns a list that holds one entry once the refusal happened."""
    load = ctx.set_state
    refused: list[int] = []

    def refuse_once(data) -> None:
        if not refused:
            refused.append(1)
            ctx.clear()
            raise EngineError("llama.cpp rejected the saved memory state.")
        load(data)

    monkeypatch.setattr(ctx, "set_state", refuse_once)
    return refused


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of two next-token distributions, in nats."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum())
