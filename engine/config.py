"""Engine configuration values: compression levels and sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

LEVELS: tuple[str, ...] = ("off", "light", "balanced", "aggressive")


@dataclass(frozen=True)
class CompressionConfig:
    """What memory budget a conversation runs under and which method serves it.

    `level` is what the user picks; `method` is what the engine uses for it. Only `full`
    (keep everything) is implemented so far; other levels are accepted and reported as
    running on `full` until their memory policy lands.
    """

    level: str = "off"
    method: str = "full"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Unknown compression level {self.level!r}; pick one of {LEVELS}.")

    @classmethod
    def for_level(cls, level: str) -> CompressionConfig:
        return cls(level=level, method="full")

    def describe(self) -> str:
        if self.level == "off":
            return "off: full context, nothing evicted"
        return f"{self.level}: no compressor for this level yet, running on full context"


@dataclass(frozen=True)
class SamplingParams:
    """How one reply is generated. temperature <= 0 means greedy."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1].")
