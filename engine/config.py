"""Engine configuration values: compression levels and sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ccm_chat.engine.memory import MemoryPolicy, make_policy

if TYPE_CHECKING:
    from ccm_chat.engine.ccm.files import CompressorFiles

LEVELS: tuple[str, ...] = ("off", "light", "balanced", "aggressive")
KV_TYPES: tuple[str, ...] = ("f16", "q8_0", "q4_0")

# What each level means without a trained compressor: (cells held after a turn, K cache type).
# Budgets are in tokens so they mean the same on every model. The K cache type is an
# orthogonal saving on llama.cpp: q8_0 takes about a quarter off a cell's bytes, q4_0 about
# three eighths (V stays f16, see engine.llama_backend).
LEVEL_BUDGETS: dict[str, tuple[int | None, str]] = {
    "off": (None, "f16"),
    "light": (2048, "q8_0"),
    "balanced": (512, "q8_0"),
    "aggressive": (128, "q4_0"),
}
SINK_TOKENS = 4
# With a trained compressor, the share of a level's budget held as recent text; the rest
# holds older exchanges as <COMP> slots (engine.memory.hybrid). Balanced was chosen on the
# validation split (bench/results/hybrid_validation_cpu.json, 3 chats): a quarter held
# next-reply perplexity at 23.0 / 25.1 / 21.6 / 27.2 at exchange 4 / 8 / 16 / 32 against
# 25.7 / 26.5 / 22.3 / 26.3 for a half, and recalled as well or better, in fewer cells. Light
# and aggressive were not measured yet and keep half.
VERBATIM_SHARE: dict[str, float] = {"light": 0.5, "balanced": 0.25, "aggressive": 0.5}
# Cells a turn may bring back from the transcript (engine.recall): earlier exchanges the
# memory no longer holds verbatim, decoded before the new message for that turn only and
# dropped after it, so they come on top of what the memory holds after a turn (as the message
# and the reply do). Full context holds every exchange already: nothing to recall.
RECALL_TOKENS: dict[str, int] = {"off": 0, "light": 512, "balanced": 256, "aggressive": 128}


@dataclass(frozen=True)
class CompressionConfig:
    """What memory budget a conversation runs under and which method serves it.

    `level` is what the user picks; `method` and `params` are the memory policy the engine
    runs for it (see engine.memory); `kv_type` is the K cache's element type (llama.cpp).
    """

    level: str = "off"
    method: str = "full"
    params: dict[str, object] = field(default_factory=dict)
    kv_type: str = "f16"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Unknown compression level {self.level!r}; pick one of {LEVELS}.")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"Unknown KV cache type {self.kv_type!r}; pick one of {KV_TYPES}.")

    @classmethod
    def for_level(cls, level: str, quantize_kv: bool = True,
                  compressor: CompressorFiles | None = None) -> CompressionConfig:
        """The best method there is for `level`: the model's trained CCM compressor if it has
        one (its budget in <COMP> slots, the KV cache unquantized as it was trained), else
        sink + recent window with K cache quantization."""
        if level not in LEVEL_BUDGETS:
            raise ValueError(f"Unknown compression level {level!r}; pick one of {LEVELS}.")
        budget, kv_type = LEVEL_BUDGETS[level]
        kv_type = kv_type if quantize_kv else "f16"
        if budget is None:
            return cls(level, "full", {}, kv_type, "keeps every token")
        if compressor is not None:
            n = compressor.n_comp
            reason = f"trained CCM compressor for this model ({compressor.folder.name})"
            if compressor.method != "ccm-concat":
                return cls(level, compressor.method,
                           {"n_comp": n, "cap": max(1, budget // n),
                            "compressor": compressor.fingerprint}, "f16", reason)
            verbatim = int(budget * VERBATIM_SHARE[level])
            return cls(
                level, "ccm-hybrid",
                {"n_comp": n, "cap": max(1, (budget - verbatim) // n), "verbatim": verbatim,
                 "compressor": compressor.fingerprint},
                "f16", reason,
            )
        return cls(
            level, "window", {"sink": SINK_TOKENS, "window": budget - SINK_TOKENS}, kv_type,
            "no trained CCM compressor for this model, so the training-free sink + recent "
            "window policy",
        )

    @property
    def recall_tokens(self) -> int:
        """Cells this level lets a turn recall (0: recall is off at this level)."""
        return RECALL_TOKENS[self.level]

    def policy(self) -> MemoryPolicy:
        return make_policy(self.method, **self.params)

    def key(self) -> dict[str, object]:
        """What a saved memory state must match to be reused."""
        return {"method": self.method, "params": dict(self.params), "kv_type": self.kv_type}

    def describe(self, bytes_per_cell: int | None = None) -> str:
        """What the level keeps; with the model's f16 bytes per cell, about how much."""
        policy = self.policy()
        text = f"{self.level}: {self.method} ({policy.describe()}"
        if bytes_per_cell and policy.budget is not None:
            # K is half a cell's f16 bytes; a quantized K takes its type's share of them
            k_share = {"f16": 1.0, "q8_0": 34 / 64, "q4_0": 18 / 64}[self.kv_type]
            size = policy.budget * bytes_per_cell * (1 + k_share) / 2
            text += f", about {size / 1e6:.1f} MB at most"
        text += ")"
        if self.kv_type != "f16":
            text += f", K cache {self.kv_type}"
        return f"{text}; {self.reason}" if self.reason else text


@dataclass(frozen=True)
class SamplingParams:
    """How one reply is generated. temperature <= 0 means greedy.

    Small models fall into loops; the defaults hold them off (bench/loop_rate.py measured
    the share of replies that ran to the cap): a repetition penalty on the last
    `repeat_last_n` generated tokens (1.0: off), and on llama.cpp the DRY sampler, which
    penalises a token that would extend a sequence already seen (`dry_multiplier` 0: off).
    """

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    dry_multiplier: float = 0.8
    dry_base: float = 1.75
    dry_allowed_length: int = 2

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1].")
        if self.repeat_penalty <= 0 or self.repeat_last_n < 0:
            raise ValueError("repeat_penalty must be > 0 and repeat_last_n >= 0.")
        if self.dry_multiplier < 0 or self.dry_base < 1 or self.dry_allowed_length < 1:
            raise ValueError("DRY needs multiplier >= 0, base >= 1 and allowed length >= 1.")
