"""User settings: one dataclass, validated, stored in the database's settings table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ccm_chat.engine import BACKENDS, DEFAULT_SYSTEM_PROMPT, LEVELS, SamplingParams
from ccm_chat.storage import Store

MAX_THREADS = 512
MAX_MODEL_FOLDERS = 64
SAMPLING = SamplingParams()  # the engine's defaults: they hold the default model off loops


@dataclass(frozen=True)
class Settings:
    model_path: str = ""  # empty: the embedded default model
    n_gpu_layers: int = -1  # -1: every layer on the GPU when there is one; 0: CPU only
    context_size: int = 4096
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    repeat_penalty: float = SAMPLING.repeat_penalty  # 1.0: off
    dry_multiplier: float = SAMPLING.dry_multiplier  # llama.cpp's DRY sampler; 0: off
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    compression: str = "off"
    recall: bool = True  # bring back earlier exchanges a message asks about (engine.recall)
    backend: str = "auto"  # auto: llama.cpp for a .gguf file, transformers for a model folder
    threads: int = 0  # CPU threads for the model; 0: the engine's default (leaves the UI room)
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> keys
    model_folders: list[str] = field(default_factory=list)  # more places the model picker looks

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.threads <= MAX_THREADS:
            found.append(f"Threads must be 0 (automatic) or a count up to {MAX_THREADS}.")
        if self.n_gpu_layers < -1:
            found.append("GPU layers must be -1 (all), 0 (CPU only) or a positive count.")
        if not 256 <= self.context_size <= 1_048_576:
            found.append("Context size must be between 256 and 1048576 tokens.")
        if not 0.0 <= self.temperature <= 2.0:
            found.append("Temperature must be between 0 and 2.")
        if not 0.0 < self.top_p <= 1.0:
            found.append("Top-p must be above 0 and at most 1.")
        if not 1.0 <= self.repeat_penalty <= 2.0:
            found.append("Repeat penalty must be between 1 (off) and 2.")
        if not 0.0 <= self.dry_multiplier <= 5.0:
            found.append("DRY multiplier must be between 0 (off) and 5.")
        if not 1 <= self.max_tokens <= 32_768:
            found.append("Max tokens must be between 1 and 32768.")
        if self.backend not in BACKENDS:
            found.append(f"Back end must be one of {', '.join(BACKENDS)}.")
        if self.compression not in LEVELS:
            found.append(f"Compression level must be one of {', '.join(LEVELS)}.")
        if not (isinstance(self.model_folders, list)
                and len(self.model_folders) <= MAX_MODEL_FOLDERS
                and all(isinstance(f, str) and 0 < len(f) <= 4096 for f in self.model_folders)):
            found.append(f"Model folders must be at most {MAX_MODEL_FOLDERS} folder paths.")
        return found

    def engine_key(self) -> tuple[Any, ...]:
        """The settings that need a model reload when they change.

        The compression level is one: it fixes the engine's K cache type and attention kernel.
        """
        return (self.model_path, self.n_gpu_layers, self.context_size, self.compression,
                self.backend, self.threads)

    @classmethod
    def load(cls, store: Store) -> Settings:
        saved = store.get_settings()
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        try:
            candidate = replace(cls(), **values)
        except TypeError:
            return cls()
        return candidate if not candidate.problems() else cls()

    def save(self, store: Store) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(" ".join(problems))
        store.save_settings(asdict(self))
