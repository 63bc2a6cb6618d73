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
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from ccm_chat.engine.errors import EngineError, ModelError
from ccm_chat.engine.llama_state import _gguf_skip, _gguf_string
from ccm_chat.engine.models import user_data_dir

# The one place the folder's file names are spelled (training writes them, back ends read them)
CARD = "compressor.json"
WEIGHTS = "compressor.safetensors"  # the <COMP> table and the LoRA, for transformers
ADAPTER = "lora.gguf"  # the LoRA as a llama.cpp adapter
VECTORS = "comp_vectors.npy"  # the <COMP> table in float32, for llama.cpp's embedding batches
FILES = (CARD, WEIGHTS, ADAPTER, VECTORS)
METHODS = ("concat", "merge")
# The projections the LoRA wraps: transformers' names and llama.cpp's
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
MAX_N_COMP = 1024  # <COMP> slots a group; a card asking for more is not a compressor
MAX_RANK = 1024
MAX_LAYERS = 1024


@dataclass(frozen=True)
class ModelShape:
    """The sizes a compressor's tensors must have to fit a model (each back end's
    `compressor_shape`): the hidden width, the layers, and what q and k/v project to."""

    n_embd: int
    n_layer: int
    q_out: int  # attention heads x head size
    kv_out: int  # key/value heads x head size

    def projections(self) -> dict[str, tuple[int, int]]:
        """Each wrapped projection's (input, output) width."""
        return {"q_proj": (self.n_embd, self.q_out), "k_proj": (self.n_embd, self.kv_out),
                "v_proj": (self.n_embd, self.kv_out), "o_proj": (self.q_out, self.n_embd)}


def check_embeddings(vectors: np.ndarray, n_embd: int) -> None:
    """Refuse rows of input embeddings a back end would misread: a back end reads n_embd
    floats a row (llama.cpp past the end of a narrower array)."""
    if (not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.shape[1] != n_embd
            or not len(vectors) or vectors.dtype.kind != "f"):
        shape = getattr(vectors, "shape", type(vectors).__name__)
        raise EngineError(f"<COMP> vectors of shape {shape} do not fit this model, whose "
                          f"embeddings are {n_embd} wide; the compressor does not belong to it.")


@dataclass(frozen=True)
class CompressorTensors:
    """What a folder's tensor files hold, read and checked against each other and the card:
    the <COMP> vectors (float32, finite) and the LoRA's layers and widths (the same in the
    llama.cpp adapter and the transformers weights)."""

    vectors: np.ndarray  # (n_comp, n_embd)
    n_layer: int
    projections: dict[str, tuple[int, int]]  # (input, output) width of each projection


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

    @property
    def rank(self) -> int:
        return int(self.card["rank"])

    def tensors(self) -> CompressorTensors:
        """Every tensor file read and checked (once per version of the files); ModelError
        names the file and what is wrong with it."""
        stamp = tuple((s.st_size, s.st_mtime_ns) for s in
                      ((self.folder / name).stat() for name in FILES[1:]))
        return _read_tensors(self.folder, self.n_comp, self.rank, float(self.card["alpha"]),
                             stamp)

    def check(self, shape: ModelShape) -> CompressorTensors:
        """The tensors, if they fit the model of this shape; else ModelError saying why."""
        tensors = self.tensors()
        if tensors.vectors.shape[1] != shape.n_embd:
            raise self._unfit(VECTORS, f"its vectors are {tensors.vectors.shape[1]} wide; the "
                                       f"model's embeddings are {shape.n_embd}")
        if tensors.n_layer != shape.n_layer:
            raise self._unfit(ADAPTER, f"its LoRA has {tensors.n_layer} layers; the model "
                                       f"has {shape.n_layer}")
        if tensors.projections != shape.projections():
            raise self._unfit(ADAPTER, f"its LoRA projects {tensors.projections}; the model "
                                       f"{shape.projections()}")
        return tensors

    def _unfit(self, name: str, why: str) -> ModelError:
        return ModelError(f"{self.folder / name} does not fit this model: {why}. Use a "
                          "compressor trained for this model (`ccm-chat train-compressor`).")

    def vectors(self, shape: ModelShape) -> np.ndarray:
        """The <COMP> vectors (n_comp, n_embd), float32, checked against the model (a copy
        of its own for the caller: the checked ones are cached)."""
        return self.check(shape).vectors.copy()

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
            _check_card(card)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{folder / CARD} is not a compressor card ({exc}).") from exc
        return cls(folder, card)


def _check_card(card: object) -> None:
    """The card's fields a back end builds on, each of its type and in range."""
    if not isinstance(card, dict):
        raise ValueError("not a JSON object")
    for key in ("base_fingerprint", "method", "n_comp", "rank", "alpha"):
        card[key]  # noqa: B018  (presence check: KeyError)
    if not isinstance(card["base_fingerprint"], str) or card["method"] not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, and the fingerprint text")
    for key, most in (("n_comp", MAX_N_COMP), ("rank", MAX_RANK)):
        value = card[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            raise ValueError(f"{key} must be a whole number from 1 to {most}, not {value!r}")
    alpha = card["alpha"]
    if (not isinstance(alpha, int | float) or isinstance(alpha, bool)
            or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be a positive number, not {alpha!r}")


class _Bad(ValueError):
    """A tensor file that is not what the card says (the message says which and why)."""


# Element types the tensor files may hold: (bytes, the exponent bits of inf and NaN)
_GGML_TYPES = {0: ("F32", 4), 1: ("F16", 2), 30: ("BF16", 2)}
_FLOATS = {"F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00),
           "BF16": (np.uint16, 0x7F80)}
_SAFETENSORS_TYPES = {"F32": 4, "F16": 2, "BF16": 2}


def _finite(raw: np.ndarray, kind: str) -> bool:
    """Whether every element of `raw` (the tensor's bytes) is a finite float of `kind`."""
    bits, exponent = _FLOATS[kind]
    return not np.any((raw.view(bits) & exponent) == exponent)


@lru_cache(maxsize=16)
def _read_tensors(folder: Path, n_comp: int, rank: int, alpha: float,
                  stamp: tuple) -> CompressorTensors:
    """CompressorFiles.tensors, cached by the files' sizes and times (`stamp`)."""
    name = ADAPTER
    try:
        adapter = _read_adapter(folder / ADAPTER, alpha)
        n_layer, projections = _lora_shape(adapter, rank)
        n_embd = projections["q_proj"][0]
        name = WEIGHTS
        weights = _read_weights(folder / WEIGHTS)
        comp = weights.pop("comp", None)
        if weights != adapter:
            raise _Bad(f"its LoRA is not of the shapes of {ADAPTER}'s")
        if comp != (n_comp, n_embd):
            raise _Bad(f"its <COMP> table is {comp}, not ({n_comp}, {n_embd})")
        name = VECTORS
        vectors = _read_vectors(folder / VECTORS, n_comp, n_embd)
    except Exception as exc:  # a hostile file may fail any way a parser can
        raise ModelError(f"{folder / name} is not a usable compressor file: {exc}. Retrain "
                         "it with `ccm-chat train-compressor`, or remove the folder.") from exc
    vectors.flags.writeable = False  # cached: shared by every caller
    return CompressorTensors(vectors, n_layer, projections)


def _read_vectors(path: Path, n_comp: int, n_embd: int) -> np.ndarray:
    """The <COMP> table: n_comp finite float rows n_embd wide (no pickles: numpy's own
    format only, its shape read before any data)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _Bad(f"not a numpy array file ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise _Bad("not a single numpy array")
    if array.dtype.kind != "f" or array.shape != (n_comp, n_embd):
        raise _Bad(f"it holds a {array.dtype} array of shape {array.shape}; the card and the "
                   f"LoRA want ({n_comp}, {n_embd}) floats")
    vectors = np.array(array, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise _Bad("it holds values that are not finite (inf or NaN)")
    return vectors


_LORA_NAME = re.compile(r"model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([ab])")
_GGUF_LORA_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight\.lora_([ab])")
_FROM_GGUF = {v: k for k, v in GGUF_NAMES.items()}
_SAME = {k: k for k in GGUF_NAMES}


def _read_weights(path: Path) -> dict:
    """compressor.safetensors' tensor shapes, keyed (layer, projection, "a"/"b") and "comp",
    each float and finite. Its header is parsed here (safetensors' layout: a little-endian
    length, a JSON header, the data), not by torch."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if len(m) < 8 or (size := struct.unpack_from("<Q", m)[0]) > len(m) - 8:
            raise _Bad("not a safetensors file (its header is cut off)")
        try:
            header = json.loads(m[8:8 + size])
        except ValueError as exc:
            raise _Bad(f"not a safetensors file ({exc})") from exc
        if not isinstance(header, dict):
            raise _Bad("not a safetensors file")
        shapes: dict = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            key = "comp" if name == "comp" else _lora_key(_LORA_NAME.fullmatch(name), name, _SAME)
            shapes[key] = _safetensors_tensor(m, 8 + size, name, info)
    return shapes


def _lora_key(match: re.Match | None, name: str,
              projections: dict[str, str]) -> tuple[int, str, str]:
    """(layer, transformers' projection name, "a"/"b") of a LoRA tensor's name, matched by
    its file's pattern, with its file's names of the projections."""
    if match is None or match[2] not in projections:
        raise _Bad(f"it holds a tensor {name!r} that is no part of a compressor")
    layer = int(match[1])
    if layer >= MAX_LAYERS:
        raise _Bad(f"tensor {name} is for layer {layer}")
    return layer, projections[match[2]], match[3]


def _safetensors_tensor(m: mmap.mmap, start: int, name: str, info: object) -> tuple[int, ...]:
    """A tensor's shape, its entry checked against the file and its values finite."""
    try:
        kind, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        width = _SAFETENSORS_TYPES[kind]
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= len(m) - start:
            raise ValueError
        if end - begin != math.prod(shape) * width:
            raise ValueError
    except (KeyError, TypeError, ValueError) as exc:
        raise _Bad(f"its entry for tensor {name!r} is malformed or out of the file") from exc
    if not _finite(np.frombuffer(m, np.uint8, end - begin, start + begin), kind):
        raise _Bad(f"tensor {name} holds values that are not finite (inf or NaN)")
    return shape


def _read_adapter(path: Path, alpha: float) -> dict:
    """lora.gguf's tensor shapes as numpy orders them (a: (rank, in), b: (out, rank)), keyed
    (layer, projection, "a"/"b"), each float and finite; its alpha must be the card's."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _adapter_shapes(m, alpha)
    except (struct.error, KeyError, IndexError, OverflowError) as exc:
        raise _Bad("not a GGUF adapter: it is cut short or garbled") from exc


def _adapter_shapes(m: mmap.mmap, alpha: float) -> dict:
    if m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] < 2:
        raise _Bad("not a GGUF file of version 2 or later")
    n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
    at, alignment, found_alpha = 24, 32, None
    for _ in range(n_kv):
        key, at = _gguf_string(m, at)
        kind = struct.unpack_from("<I", m, at)[0]
        if key == b"general.alignment" and kind == 4:
            alignment = struct.unpack_from("<I", m, at + 4)[0]
        if key == b"adapter.lora.alpha" and kind == 6:
            found_alpha = struct.unpack_from("<f", m, at + 4)[0]
        at = _gguf_skip(m, kind, at + 4)
    if found_alpha is None or not math.isclose(found_alpha, alpha, rel_tol=1e-6):
        raise _Bad(f"its LoRA alpha is {found_alpha}; the card says {alpha}")
    if not 0 < alignment <= 1 << 16:
        raise _Bad(f"its alignment {alignment} is out of range")
    infos = []
    for _ in range(n_tensors):
        name, at = _gguf_string(m, at)
        n_dims = struct.unpack_from("<I", m, at)[0]
        if not 1 <= n_dims <= 4:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", m, at + 4)
        kind, offset = struct.unpack_from("<IQ", m, at + 4 + 8 * n_dims)
        at += 4 + 8 * n_dims + 12
        infos.append((name.decode("utf-8", "replace"), dims, kind, offset))
    start = -(-at // alignment) * alignment
    shapes: dict = {}
    for name, dims, kind, offset in infos:
        key = _lora_key(_GGUF_LORA_NAME.fullmatch(name), name, _FROM_GGUF)
        if kind not in _GGML_TYPES:
            raise _Bad(f"tensor {name} is of ggml type {kind}, not a float")
        label, width = _GGML_TYPES[kind]
        size = math.prod(dims) * width
        if start + offset + size > len(m):
            raise _Bad(f"tensor {name} lies past the end of the file")
        if not _finite(np.frombuffer(m, np.uint8, size, start + offset), label):
            raise _Bad(f"tensor {name} holds values that are not finite (inf or NaN)")
        shapes[key] = tuple(reversed(dims))  # ggml lists the fastest dimension first
    return shapes


def _lora_shape(shapes: dict, rank: int) -> tuple[int, dict[str, tuple[int, int]]]:
    """(layers, each projection's (input, output) width) of a LoRA: a and b for every
    projection of layers 0..n-1, of the card's rank, the same widths in every layer, q, k
    and v reading the width o writes (the model's residual stream)."""
    n_layer = 1 + max((key[0] for key in shapes), default=-1)
    wanted = {(i, p, ab) for i in range(n_layer) for p in GGUF_NAMES for ab in "ab"}
    if not n_layer or set(shapes) != wanted:
        raise _Bad(f"its LoRA is not a and b of {', '.join(GGUF_NAMES)} in every layer")
    projections = {}
    for p in GGUF_NAMES:
        a, b = shapes[(0, p, "a")], shapes[(0, p, "b")]
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise _Bad(f"its {p} LoRA is {a} and {b}, not of rank {rank}")
        projections[p] = (a[1], b[0])
        if any(shapes[(i, p, "a")] != a or shapes[(i, p, "b")] != b for i in range(n_layer)):
            raise _Bad(f"its {p} LoRA changes shape from layer to layer")
    if len({projections[p][0] for p in ("q_proj", "k_proj", "v_proj")}
           | {projections["o_proj"][1]}) != 1:
        raise _Bad("its q, k and v do not read the width o writes")
    return n_layer, projections


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
                    dirs: list[Path] | None = None,
                    skipped: list[str] | None = None) -> CompressorFiles | None:
    """The newest complete compressor trained for this exact model file, if any (user's
    folder first), whose tensor files are sound (see find_compressors)."""
    found = find_compressors(model_fingerprint, method, dirs, skipped)
    return found[0] if found else None


def find_compressors(model_fingerprint: str, method: str = "concat",
                     dirs: list[Path] | None = None,
                     skipped: list[str] | None = None) -> list[CompressorFiles]:
    """Every complete compressor trained for this model file whose tensor files are sound,
    first choice first (the folders in `compressor_dirs` order, the newest first in each);
    one that is not sound is passed over, and what is wrong with it added to `skipped`."""
    found = []
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
            if (files.card["base_fingerprint"] != model_fingerprint
                    or files.card["method"] != method):
                continue
            try:
                files.tensors()
            except ModelError as exc:
                if skipped is not None:
                    skipped.append(str(exc))
                continue
            found.append(files)
    return found
