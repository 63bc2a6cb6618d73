"""A llama.cpp sequence state edited in host memory: cells dropped, moved, keys re-rotated.

A CCM step ends with the new <COMP> slots moved into the place of the text they stand for.
llama.cpp moves cells with a position shift it applies at the next decode: a graph of its
own, then a scheduler re-reserve and a graph rebuilt for that decode (6.8-8.7 ms of an 18-30
ms step on an H200, bench/results/turn_profile_gpu_deferred.json). The step's result passes
through host memory anyway (it is copied from the context that ran the slots), so the cells
are dropped and moved there: the kept cells are written out with their new positions and
the moved ones' keys rotated by the same RoPE angles llama.cpp's shift uses.

The layout read is llama-kv-cache.cpp's `state_write` for one sequence of a plain KV cache
(llama-cpp-python 0.3.36): magic, sequence id, one stream, the cells' positions, then every
layer's K rows, then every layer's V (rows, or transposed: a run of cells per dimension).
Keys may be f16, q8_0 or q4_0. llama.cpp stores quantized keys in a Walsh-Hadamard basis
(each head's key times an orthonormal H, H @ H = I, so outliers spread over a block before
quantizing); a moved quantized key is dequantized, taken out of that basis, rotated, put
back and quantized again, as llama.cpp's shift does (ggml's reference rounding). Anything
else (another K type, several streams or sequences, M-RoPE cell data) is refused with
ValueError, and `LlamaContext` checks the result against llama.cpp's own shift before
relying on it.
"""

from __future__ import annotations

import functools
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 0xAF143CD8  # llama-context.cpp's io_magic
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8
ROPE_NORM, ROPE_NEOX = 0, 2  # llama_rope_type: pairs (2i, 2i+1), or (i, i + n_rot/2)


@dataclass(frozen=True)
class Rope:
    """What rotating a cached key by a position delta takes (one setting for every layer)."""

    neox: bool
    n_rot: int  # leading dimensions of each head that rotate
    head_dim: int
    theta: np.ndarray  # radians per position for each rotating pair (n_rot / 2)

    @classmethod
    def plain(cls, rope_type: int, n_rot: int, head_dim: int, base: float, freq_scale: float,
              factors: np.ndarray | None = None) -> Rope:
        """ggml's rope angles without YaRN: freq_scale * base^(-2i/n_rot) / factor_i."""
        if rope_type not in (ROPE_NORM, ROPE_NEOX) or not 0 < n_rot <= head_dim or n_rot % 2:
            raise ValueError(f"no plain RoPE (type {rope_type}, {n_rot} of {head_dim} dims)")
        theta = freq_scale * base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
        if factors is not None:
            if factors.shape != theta.shape:
                raise ValueError("rope factors do not fit the rotating dimensions")
            theta = theta / factors.astype(np.float64)
        return cls(rope_type == ROPE_NEOX, n_rot, head_dim, theta)

    def rotate(self, rows: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Keys (..., cells, n_head_kv * head_dim) moved by `delta` positions each (one per
        cell, for every leading index: the layers of a state), as float32."""
        heads = rows.reshape(*rows.shape[:-1], -1, self.head_dim).astype(np.float32)
        angle = delta.astype(np.float64)[:, None] * self.theta[None, :]
        cos = np.cos(angle).astype(np.float32)[:, None, :]
        sin = np.sin(angle).astype(np.float32)[:, None, :]
        if not self.neox:  # pairs (2i, 2i+1): complex numbers, turned by one product
            turn = np.empty(cos.shape, dtype=np.complex64)
            turn.real, turn.imag = cos, sin
            heads[..., :self.n_rot].view(np.complex64)[...] *= turn
            return heads.reshape(rows.shape)
        half = self.n_rot // 2
        x0, x1 = heads[..., :half], heads[..., half:self.n_rot]
        y0, y1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        x0[...], x1[...] = y0, y1  # views into `heads`
        return heads.reshape(rows.shape)


class KeyCodec:
    """Rows of cached keys (cells, bytes) to float32 (cells, elements) and back."""

    def __init__(self, block: int, block_bytes: int) -> None:
        self.block, self.block_bytes = block, block_bytes  # elements and bytes of a block

    def elements(self, row_bytes: int) -> int:
        return row_bytes // self.block_bytes * self.block

    def _blocks(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scales (cells, blocks, 1) as float32, quants (cells, blocks, bytes))."""
        blocks = rows.reshape(len(rows), -1, self.block_bytes)
        scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)
        return scale, blocks[..., 2:]

    def scales(self, rows: np.ndarray) -> np.ndarray:
        """Each element's quantization step (float32, like `decode`'s)."""
        scale, _ = self._blocks(rows)
        return np.repeat(np.abs(scale), self.block, axis=2).reshape(len(rows), -1)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class F16Keys(KeyCodec):
    def __init__(self) -> None:
        super().__init__(1, 2)

    def scales(self, rows: np.ndarray) -> np.ndarray:
        return np.zeros((len(rows), rows.shape[1] // 2), dtype=np.float32)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rows).view(np.float16).astype(np.float32)

    def encode(self, values: np.ndarray) -> np.ndarray:
        return values.astype(np.float16).view(np.uint8)


class Q8Keys(KeyCodec):
    """ggml's q8_0: blocks of 32 int8 with one f16 scale (amax / 127), rounded half away."""

    def __init__(self) -> None:
        super().__init__(32, 34)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        scale, quants = self._blocks(rows)
        return (quants.view(np.int8).astype(np.float32) * scale).reshape(len(rows), -1)

    def encode(self, values: np.ndarray) -> np.ndarray:
        x = values.astype(np.float32).reshape(len(values), -1, 32)
        d = np.abs(x).max(axis=2, keepdims=True) / np.float32(127)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        v = x * inv
        q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # C's roundf
        out = np.empty((len(values), x.shape[1], 34), dtype=np.uint8)
        out[..., :2] = d.astype(np.float16).view(np.uint8)
        out[..., 2:] = q.astype(np.int8).view(np.uint8)
        return out.reshape(len(values), -1)


class Q4Keys(KeyCodec):
    """ggml's q4_0: blocks of 32 nibbles (element j low, j + 16 high) with one f16 scale,
    the block's value of largest magnitude over -8."""

    def __init__(self) -> None:
        super().__init__(32, 18)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        scale, quants = self._blocks(rows)
        low = (quants & 0x0F).astype(np.float32) - 8
        high = (quants >> 4).astype(np.float32) - 8
        return (np.concatenate([low, high], axis=2) * scale).reshape(len(rows), -1)

    def encode(self, values: np.ndarray) -> np.ndarray:
        x = values.astype(np.float32).reshape(len(values), -1, 32)
        at = np.abs(x).argmax(axis=2)[..., None]
        d = np.take_along_axis(x, at, axis=2) / np.float32(-8)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        q = np.minimum(15, np.trunc(x * inv + np.float32(8.5))).astype(np.uint8)  # C's cast
        out = np.empty((len(values), x.shape[1], 18), dtype=np.uint8)
        out[..., :2] = d.astype(np.float16).view(np.uint8)
        out[..., 2:] = q[..., :16] | (q[..., 16:] << 4)
        return out.reshape(len(values), -1)


@functools.cache
def hadamard(n: int) -> np.ndarray:
    """ggml's orthonormal Walsh-Hadamard matrix of order n (Sylvester's construction), made
    once per order (read-only: every host move of quantized keys uses it)."""
    h = np.full((1, 1), 1.0 / np.sqrt(n), dtype=np.float32)
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    h.flags.writeable = False
    return h


def in_basis(keys: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Each block of len(basis) elements of each key times `basis` (its own inverse)."""
    n = len(basis)
    return (keys.reshape(-1, n) @ basis).reshape(keys.shape)


KEY_CODECS: dict[int, KeyCodec] = {GGML_F16: F16Keys(), GGML_Q8_0: Q8Keys(),
                                   GGML_Q4_0: Q4Keys()}


def rope_factors(path: Path, half: int) -> np.ndarray | None:
    """The `rope_freqs` tensor of a GGUF file (llama3 rope scaling), or None if it has none.

    Read from the file's tensor list: gguf's GGUFReader parses every metadata array first,
    which took 2.7 s on the default model's file and 6.6 s on an 8B one (H200 host)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] < 2:
            raise ValueError(f"{path.name} is not a GGUF file of version 2 or later")
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        at, alignment = 24, 32
        for _ in range(n_kv):
            key, at = _gguf_string(m, at)
            kind = struct.unpack_from("<I", m, at)[0]
            if key == b"general.alignment":
                alignment = struct.unpack_from("<I", m, at + 4)[0]
            at = _gguf_skip(m, kind, at + 4)
        found = None
        for _ in range(n_tensors):
            name, at = _gguf_string(m, at)
            n_dims = struct.unpack_from("<I", m, at)[0]
            dims = struct.unpack_from(f"<{n_dims}Q", m, at + 4)
            kind, offset = struct.unpack_from("<IQ", m, at + 4 + 8 * n_dims)
            at += 4 + 8 * n_dims + 12
            if name == b"rope_freqs.weight":
                found = (dims, kind, offset)
        if found is None:
            return None
        dims, kind, offset = found
        if kind != GGML_F32 or int(np.prod(dims)) != half:
            raise ValueError("rope_freqs does not fit the model's rotating dimensions")
        start = -(-at // alignment) * alignment
        return np.frombuffer(m, dtype=np.float32, count=half, offset=start + offset).copy()


GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_string(m: mmap.mmap, at: int) -> tuple[bytes, int]:
    n = struct.unpack_from("<Q", m, at)[0]
    return m[at + 8:at + 8 + n], at + 8 + n


def _gguf_skip(m: mmap.mmap, kind: int, at: int) -> int:
    """Where a metadata value of `kind` that starts at `at` ends."""
    if kind == GGUF_STRING:
        return at + 8 + struct.unpack_from("<Q", m, at)[0]
    if kind != GGUF_ARRAY:
        return at + GGUF_SIZES[kind]
    item, count = struct.unpack_from("<IQ", m, at)
    at += 12
    if item in (GGUF_STRING, GGUF_ARRAY):
        for _ in range(count):
            at = _gguf_skip(m, item, at)
        return at
    return at + count * GGUF_SIZES[item]


class SeqState:
    """One sequence's saved cells, parsed in place (no copy of the buffer)."""

    def __init__(self, buf: np.ndarray) -> None:
        try:
            self._parse(buf)
        except struct.error as exc:  # ran past the end: a layout this does not know
            raise ValueError(f"an unexpected state layout ({exc})") from exc

    def _parse(self, buf: np.ndarray) -> None:
        self.buf = buf
        magic, seq, n_stream, cells = struct.unpack_from("<IiII", buf, 0)
        if magic != MAGIC or n_stream != 1:
            raise ValueError("not a one-stream llama.cpp sequence state")
        self.seq, self.cells = seq, cells
        meta = np.frombuffer(buf, dtype=np.int32, count=3 * cells, offset=16).reshape(cells, 3)
        if cells and not (meta[:, 1] == 1).all():
            raise ValueError("cells of several sequences, or extra cell data")
        self.meta = meta
        at = 16 + 12 * cells
        v_trans, n_layer = struct.unpack_from("<II", buf, at)
        self.v_trans = v_trans
        # each layer's K, then each layer's V: (its 12-byte header, its data as an array of
        # (runs, cells, bytes of a cell in a run)): a run is a row of cells; a transposed V
        # stores one run per dimension, a cell's element in each
        self.k, self.key_rows, at = _layers(buf, at + 8, n_layer, cells, False)
        self.v, _, at = _layers(buf, at, n_layer, cells, bool(v_trans))
        kinds = {struct.unpack_from("<i", head)[0] for head, _ in self.k}
        if len(kinds) > 1 or not kinds <= KEY_CODECS.keys():
            raise ValueError(f"keys of ggml types {sorted(kinds)}")
        self.key_kind: int | None = kinds.pop() if kinds else None
        if at != len(buf):
            raise ValueError("an unexpected layout")

    @property
    def positions(self) -> np.ndarray:
        return self.meta[:, 0]

    @property
    def codec(self) -> KeyCodec:
        return KEY_CODECS[self.key_kind]

    @property
    def key_elements(self) -> int:
        """Key elements a cell holds, over all layers."""
        return sum(self.codec.elements(data.shape[2]) for _, data in self.k)

    def moved(self, keep: np.ndarray, positions: np.ndarray, rope: Rope,
              alloc: Callable[[int], np.ndarray] | None = None,
              basis: np.ndarray | None = None) -> np.ndarray:
        """A state of the cells `keep` (indices, in order) at `positions`, their keys
        rotated by how far each moved: the bytes llama.cpp loads, written in one pass into
        `alloc(size)` (a new array by default). `basis`: the Hadamard matrix the keys are
        stored in (`hadamard`), or None."""
        n = len(keep)
        layers = self.k + self.v
        size = 24 + 12 * n + sum(12 + d.shape[0] * n * d.shape[2] for _, d in layers)
        out = alloc(size) if alloc is not None else np.empty(size, dtype=np.uint8)
        struct.pack_into("<IiII", out, 0, MAGIC, self.seq, 1, n)
        meta = out[16:16 + 12 * n].view(np.int32).reshape(n, 3)
        meta[:, 0], meta[:, 1], meta[:, 2] = positions, 1, self.seq
        struct.pack_into("<II", out, 16 + 12 * n, self.v_trans, len(self.k))
        at = 24 + 12 * n
        delta = positions - self.positions[keep]
        turn = np.nonzero(delta)[0]
        for head, data in layers:
            runs, _, cell = data.shape
            out[at:at + 12] = head
            rows = out[at + 12:at + 12 + runs * n * cell].reshape(runs, n, cell)
            np.take(data, keep, axis=1, out=rows)
            at += 12 + runs * n * cell
        written, block, _ = _layers(out, 24 + 12 * n, len(self.k), n, False)
        self._turn_rows(_key_blocks(written, block), turn, delta[turn], rope, basis)
        return out

    def turn(self, cells: np.ndarray, positions: np.ndarray, rope: Rope,
             basis: np.ndarray | None = None) -> None:
        """Move `cells` (indices) to `positions` in place, their keys rotated as `moved`
        rotates them."""
        if not len(cells):
            return
        delta = positions - self.positions[cells]
        self._turn_rows(_key_blocks(self.k, self.key_rows), cells, delta, rope, basis)
        self.positions[cells] = positions

    def _turn_rows(self, blocks: list[np.ndarray], cells: np.ndarray, delta: np.ndarray,
                   rope: Rope, basis: np.ndarray | None) -> None:
        """Rotate rows `cells` of key rows (layers, cells, bytes) by `delta` positions, in
        their stored form, in place, a block of layers at a time: the whole state's keys
        are one block where every layer has the same layout (`key_rows`; a pass per layer
        cost the default model's 30 layers 0.9 ms a CCM step on the dev CPU, most of it
        per call)."""
        if not len(cells):
            return
        for block in blocks:
            picked = block[:, cells]  # (layers, cells, bytes), a copy
            flat = picked.reshape(-1, picked.shape[2])
            keys = self.codec.decode(flat)
            if basis is not None:
                keys = in_basis(keys, basis)
            keys = rope.rotate(keys.reshape(len(block), len(cells), -1), delta)
            if basis is not None:
                keys = in_basis(keys, basis)
            block[:, cells] = self.codec.encode(keys.reshape(len(flat), -1)).reshape(
                picked.shape)


def _key_blocks(layers: list[tuple[np.ndarray, np.ndarray]], block: np.ndarray | None
                ) -> list[np.ndarray]:
    """What `_turn_rows` turns: every layer's keys as one block, or a block a layer."""
    return [block] if block is not None else [data for _, data in layers]


def _layers(buf: np.ndarray, at: int, n_layer: int, cells: int, transposed: bool
            ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray | None, int]:
    """The n_layer (header, data) pairs that start at `at`, their data as one array
    (layers, runs, cells, bytes) too where every layer has the same header (the default
    model's do: one view instead of a walk of n_layer steps), and where they end."""
    def header(at: int) -> tuple[int, int]:  # (runs, bytes of a cell in a run)
        if transposed:
            _, size, runs = struct.unpack_from("<iII", buf, at)
            return runs, size
        return 1, struct.unpack_from("<iQ", buf, at)[1]

    if n_layer:
        runs, size = header(at)
        stride = 12 + runs * cells * size
        if at + n_layer * stride <= len(buf):
            rows = buf[at:at + n_layer * stride].reshape(n_layer, stride)
            if (rows[:, :12] == rows[0, :12]).all():
                data = rows[:, 12:].reshape(n_layer, runs, cells, size)
                return ([(rows[i, :12], data[i]) for i in range(n_layer)],
                        data[:, 0] if runs == 1 else None, at + n_layer * stride)
    layers = []
    for _ in range(n_layer):
        runs, size = header(at)
        n = runs * cells * size
        if at + 12 + n > len(buf):
            raise ValueError("a truncated state")
        layers.append((buf[at:at + 12], buf[at + 12:at + 12 + n].reshape(runs, cells, size)))
        at += 12 + n
    return layers, None, at


class FirstKeys:
    """The keys of cells that move up, as first read, so each later move turns them from
    there, rounded once, not once a move: a window eviction moves its sink up at every
    step, and its keys' roundings would add up over a chat (with q4_0 keys, the next-token
    distribution of the default model drifted by a KL of up to 0.36 nats from llama.cpp's
    own shift in 10 exchanges). A cell is known by its values (V does not depend on
    position): the same values are the same token after the same text, so the same key."""

    LIMIT = 256  # cells remembered at most (the sinks of the chats in use)

    def __init__(self) -> None:
        self.cells: dict[bytes, tuple[int, list[np.ndarray]]] = {}

    def turn_from_first(self, state: SeqState, cells: np.ndarray) -> Callable[[], None]:
        """Put the first-read keys and positions of known `cells` into `state` (in place),
        remember the others; return what puts `state` back as it was."""
        undo: list[tuple[int, int, list[np.ndarray]]] = []
        for c in cells:
            key = b"".join(data[:, c].tobytes() for _, data in state.v)
            rows = [data[0, c] for _, data in state.k]
            first = self.cells.get(key)
            if first is None:
                if len(self.cells) >= self.LIMIT:
                    self.cells.clear()
                self.cells[key] = (int(state.positions[c]), [r.copy() for r in rows])
                continue
            undo.append((c, int(state.positions[c]), [r.copy() for r in rows]))
            state.positions[c] = first[0]
            for row, saved in zip(rows, first[1], strict=True):
                row[...] = saved

        def put_back() -> None:
            for c, pos, saved_rows in undo:
                state.positions[c] = pos
                for (_, data), saved in zip(state.k, saved_rows, strict=True):
                    data[0, c] = saved
        return put_back


def same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """Two states hold the same cells at the same positions, keys equal to their rounding:
    two roundings of one rotation differ by an f16 ulp (2^-10 relative), or by one step of
    a quantized block (its scale), at most."""
    try:
        sa, sb = SeqState(a), SeqState(b)
    except ValueError:
        return False
    if (sa.cells != sb.cells or sa.key_kind != sb.key_kind
            or not np.array_equal(sa.positions, sb.positions)):
        return False
    if not all(np.array_equal(va, vb) for (_, va), (_, vb) in zip(sa.v, sb.v, strict=True)):
        return False
    codec = sa.codec
    for (_, ka), (_, kb) in zip(sa.k, sb.k, strict=True):
        rows_a, rows_b = ka[0], kb[0]
        step = np.maximum(codec.scales(rows_a), codec.scales(rows_b)) * 1.01
        diff = np.abs(codec.decode(rows_a) - codec.decode(rows_b))
        if not (diff <= step + 2e-3 * np.abs(codec.decode(rows_b)) + 5e-4).all():
            return False
    return True


def payload_problem(buf: np.ndarray, cells: int, n_ctx: int, limit: int) -> str | None:
    """Why a saved sequence state (bytes, as an array) is not `cells` cells of one sequence
    at contiguous, increasing positions from a base that leaves the context its room below
    `limit`, ending where its layout ends; None when it is, or when its layout is not one
    this reads (llama.cpp's own checks then stand alone). llama.cpp itself accepts cells at
    any positions, in any order, and bytes left over after them."""
    if len(buf) < 16:
        return "it is too short to hold a sequence"
    magic, _, n_stream, count = struct.unpack_from("<IiII", buf, 0)
    if magic != MAGIC or n_stream != 1 or len(buf) < 16 + 12 * count + 8:
        return None
    if count != cells:
        return f"it holds {count} cells where its header says {cells}"
    meta = np.frombuffer(buf, dtype=np.int32, count=3 * count, offset=16).reshape(count, 3)
    if count and not (meta[:, 1] == 1).all():
        return None
    if count:
        positions = meta[:, 0].astype(np.int64)
        base = int(positions[0])
        if not 0 <= base <= max(0, limit - n_ctx):
            return f"its cells start at position {base}, outside this context's range"
        if not np.array_equal(positions, base + np.arange(count)):
            return "its cells' positions are not contiguous and in order"
    at = 16 + 12 * count
    v_trans, n_layer = struct.unpack_from("<II", buf, at)
    try:
        _, _, at = _layers(buf, at + 8, n_layer, count, False)
        _, _, at = _layers(buf, at, n_layer, count, bool(v_trans))
    except (ValueError, struct.error):
        return "it is truncated"
    if at != len(buf):
        return f"{len(buf) - at} bytes follow its cells"
    return None
