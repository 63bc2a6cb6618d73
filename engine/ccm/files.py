"""A trained compressor on disk, and where the engine looks for one for a model.

A compressor folder (what `ccm-chat train-compressor` writes) holds the card
`compressor.json` (the base model's fingerprint, method, n, rank, alpha), the trained
tensors `compressor.safetensors`, the LoRA as a llama.cpp adapter `lora.gguf` and the <COMP>
vectors `comp_vectors.npy`. Shipped ones live in the `assets` package; a user's own go in the
user data dir's `compressors/` folder, or anywhere $CCM_CHAT_COMPRESSORS names. Only
torch-free code here: the engine imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from ccm_chat.engine.errors import ModelError
from ccm_chat.engine.models import user_data_dir

# The one place the folder's file names are spelled (training writes them, back ends read them)
CARD = "compressor.json"
WEIGHTS = "compressor.safetensors"  # the <COMP> table and the LoRA, for transformers
ADAPTER = "lora.gguf"  # the LoRA as a llama.cpp adapter
VECTORS = "comp_vectors.npy"  # the <COMP> table in float32, for llama.cpp's embedding batches
FILES = (CARD, WEIGHTS, ADAPTER, VECTORS)


@dataclass(frozen=True)
class LoadedCompressor:
    """A compressor as a back end runs it: its adapter handle and <COMP> vectors (n, d)."""

    files: CompressorFiles
    adapter: object
    vectors: np.ndarray


@dataclass(frozen=True)
class CompressorFiles:
    folder: Path
    card: dict

    @property
    def method(self) -> str:
        return f"ccm-{self.card['method']}"

    @property
    def n_comp(self) -> int:
        return int(self.card["n_comp"])

    @cached_property
    def fingerprint(self) -> str:
        """Identifies these weights (every file a back end reads): a memory made with other
        weights is not reused."""
        digest = hashlib.sha256()
        for name in FILES[1:]:
            digest.update((self.folder / name).read_bytes())
        return digest.hexdigest()[:16]

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def adapter(self) -> Path:
        return self.folder / ADAPTER

    def vectors(self) -> np.ndarray:
        return np.load(self.folder / VECTORS).astype(np.float32)

    @classmethod
    def open(cls, folder: str | Path) -> CompressorFiles:
        folder = Path(folder)
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise ModelError(
                f"{folder} is not a complete compressor (missing {', '.join(missing)}). "
                "Train one with `ccm-chat train-compressor --out DIR`."
            )
        try:
            card = json.loads((folder / CARD).read_text())
            for key in ("base_fingerprint", "method", "n_comp", "rank", "alpha"):
                card[key]  # noqa: B018  (presence check)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{folder / CARD} is not a compressor card ({exc}).") from exc
        return cls(folder, card)


def user_compressor_dir() -> Path:
    """Where a user's own compressors go (under the app's data dir, $CCM_CHAT_DATA_DIR wins)."""
    return user_data_dir() / "compressors"


EXTRA_DIRS_ENV = "CCM_CHAT_COMPRESSORS"


def compressor_dirs() -> list[Path]:
    """Where compressors are looked for, first match wins: folders in $CCM_CHAT_COMPRESSORS
    (a compressor, or a folder of them), the user's own, then the shipped ones."""
    extra = [Path(p).expanduser() for p in os.environ.get(EXTRA_DIRS_ENV, "").split(os.pathsep)
             if p]
    shipped = Path(str(resources.files("ccm_chat.assets"))) / "compressors"
    return [*extra, user_compressor_dir(), shipped]


def find_compressor(model_fingerprint: str, method: str = "concat",
                    dirs: list[Path] | None = None) -> CompressorFiles | None:
    """The newest complete compressor trained for this exact model file, if any (user's
    folder first)."""
    for root in dirs if dirs is not None else compressor_dirs():
        if not root.is_dir():
            continue
        cards = [root / CARD] if (root / CARD).is_file() else sorted(
            root.glob(f"*/{CARD}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for card in cards:
            try:
                files = CompressorFiles.open(card.parent)
            except ModelError:
                continue
            if (files.card["base_fingerprint"] == model_fingerprint
                    and files.card["method"] == method):
                return files
    return None
