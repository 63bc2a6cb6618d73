"""A llama.cpp sequence state edited in host memory (engine.llama_state): the file's rope
factors, the key rotation, and a state written back unchanged when nothing moves."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from ccm_chat.engine import CompressionConfig, Engine
from ccm_chat.engine.host_buffer import HostBuffer, _cuda_runtime
from ccm_chat.engine.llama_state import (
    GGML_F16,
    GGML_Q4_0,
    GGML_Q8_0,
    MAGIC,
    ROPE_NEOX,
    ROPE_NORM,
    F16Keys,
    Rope,
    SeqState,
    hadamard,
    rope_factors,
)
from tests.device import TEST_DEVICE


def write_gguf(path: Path, factors: np.ndarray | None) -> None:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_custom_alignment(64)
    writer.add_token_list([f"tok{i}" for i in range(300)])  # a string array to step over
    writer.add_array("test.nested", [[1, 2], [3, 4, 5]])
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    writer.add_tensor("output.weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_rope_factors_are_read_from_the_tensor_list(tmp_path) -> None:
    factors = np.linspace(1.0, 8.0, 16).astype(np.float32)
    write_gguf(tmp_path / "with.gguf", factors)
    write_gguf(tmp_path / "without.gguf", None)
    np.testing.assert_array_equal(rope_factors(tmp_path / "with.gguf", 16), factors)
    assert rope_factors(tmp_path / "without.gguf", 16) is None
    with pytest.raises(ValueError):
        rope_factors(tmp_path / "with.gguf", 32)  # not the model's rotating dimensions
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    with pytest.raises(ValueError):
        rope_factors(tmp_path / "junk.gguf", 16)


@pytest.mark.parametrize("rope_type", [ROPE_NORM, ROPE_NEOX])
def test_a_rotation_moves_each_pair_by_its_angle_and_composes(rope_type) -> None:
    rope = Rope.plain(rope_type, n_rot=4, head_dim=6, base=100.0, freq_scale=0.5,
                      factors=np.array([1.0, 2.0]))
    assert np.allclose(rope.theta, [0.5, 0.5 * 100.0 ** -0.5 / 2])
    keys = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)  # 2 heads
    delta = np.array([5, -7, 0])
    moved = rope.rotate(keys, delta)
    first, second = (0, 1) if rope_type == ROPE_NORM else (0, 2)  # the first pair's dims
    angle = 5 * rope.theta[0]
    x0, x1 = keys[0, first], keys[0, second]
    assert np.isclose(moved[0, first], x0 * np.cos(angle) - x1 * np.sin(angle), atol=1e-5)
    assert np.isclose(moved[0, second], x0 * np.sin(angle) + x1 * np.cos(angle), atol=1e-5)
    np.testing.assert_array_equal(moved[:, 4:6], keys[:, 4:6])  # past n_rot: untouched
    np.testing.assert_array_equal(moved[2], keys[2])
    np.testing.assert_allclose(rope.rotate(moved, -delta), keys, atol=1e-5)
    with pytest.raises(ValueError):
        Rope.plain(8, n_rot=4, head_dim=6, base=100.0, freq_scale=1.0)  # M-RoPE: not plain


def test_a_state_with_no_cell_moved_is_written_back_byte_for_byte(real_engine) -> None:
    conv = real_engine.new_conversation()
    conv.add_turn("user", "Hello there, how are you today?")
    ctx = real_engine.activate(conv)
    data = np.frombuffer(ctx.get_state(), dtype=np.uint8)
    state = SeqState(data)
    assert state.cells == conv.held and list(state.positions) == list(range(conv.held))
    rope = real_engine.model.rope
    assert rope is not None
    same = state.moved(np.arange(state.cells), state.positions.copy(), rope)
    np.testing.assert_array_equal(same, data)
    keep = np.arange(2, state.cells)
    part = SeqState(state.moved(keep, state.positions[keep] - 2, rope))
    assert part.cells == state.cells - 2 and list(part.positions) == list(range(part.cells))
    with pytest.raises(ValueError):
        SeqState(data[:-1])


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_keys_decode_and_encode_as_llama_cpp_stores_them(kv_type) -> None:
    """Keys llama.cpp quantized re-encode to the same bytes, and a rotation through the
    codec lands within one step of each block of the rotated values."""
    window = CompressionConfig("balanced", "window", {"sink": 4, "window": 60}, kv_type)
    with Engine.load(n_ctx=256, device=TEST_DEVICE, compression=window) as engine:
        conv = engine.new_conversation()
        conv.add_turn("user", "Hello there, how are you today? Tell me about the sea.")
        state = SeqState(np.frombuffer(engine.activate(conv).get_state(), dtype=np.uint8))
        rope = engine.model.rope
    codec = state.codec
    assert state.key_kind == {"q8_0": GGML_Q8_0, "q4_0": GGML_Q4_0}[kv_type]
    rows = state.k[0][1][0]  # the first layer's keys, a row per cell
    values = codec.decode(rows)
    assert values.shape == (state.cells, state.key_elements // len(state.k))
    np.testing.assert_array_equal(codec.encode(values), rows)
    delta = np.arange(state.cells) % 7 - 3
    turned = codec.encode(rope.rotate(values, delta))
    exact = rope.rotate(values, delta)
    assert (np.abs(codec.decode(turned) - exact) <= codec.scales(turned) * 1.01 + 1e-6).all()


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_turning_every_layer_in_one_pass_writes_what_a_pass_per_layer_writes(kv_type) -> None:
    window = CompressionConfig("balanced", "window", {"sink": 4, "window": 60}, kv_type)
    with Engine.load(n_ctx=256, device=TEST_DEVICE, compression=window) as engine:
        conv = engine.new_conversation()
        conv.add_turn("user", "Hello there, how are you today? Tell me about the sea.")
        data = np.frombuffer(engine.activate(conv).get_state(), dtype=np.uint8)
        rope, basis = engine.model.rope, engine.model.key_basis(kv_type)
    assert (basis is None) == (kv_type == "f16")
    cells = np.arange(1, 9)
    positions = np.arange(1, 9) + np.array([40, -1, 3, 7, 40, 2, 9, 11])
    together, alone = SeqState(data.copy()), SeqState(data.copy())
    together.turn(cells, positions, rope, basis)
    delta = positions - alone.positions[cells]
    assert together.key_rows is not None  # every layer alike: one block of all of them
    for _, layer in alone.k:
        alone._turn_rows([layer], cells, delta, rope, basis)
    alone.positions[cells] = positions
    assert not np.array_equal(together.buf, data)  # it did turn them, in the state's bytes
    np.testing.assert_array_equal(together.buf, alone.buf)
    assert list(together.positions[cells]) == list(positions)


def synthetic_state(row_elements: list[int], cells: int) -> np.ndarray:
    """A one-sequence state in llama.cpp's layout with f16 K and V rows of the given
    lengths, one layer each, random values, cells at positions 0.."""
    rng = np.random.default_rng(1)
    parts = [struct.pack("<IiII", MAGIC, 0, 1, cells),
             np.array([[i, 1, 0] for i in range(cells)], dtype=np.int32).tobytes(),
             struct.pack("<II", 0, len(row_elements))]
    for _ in ("K", "V"):
        for n in row_elements:
            parts.append(struct.pack("<iQ", GGML_F16, 2 * n))
            parts.append(rng.normal(size=(cells, n)).astype(np.float16).tobytes())
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def test_a_state_whose_layers_differ_is_read_layer_by_layer_and_turns_as_each_alone() -> None:
    rope = Rope.plain(ROPE_NORM, n_rot=4, head_dim=4, base=100.0, freq_scale=1.0)
    data = synthetic_state([8, 4, 8], cells=5)
    state = SeqState(data.copy())
    assert state.key_rows is None and [d.shape for _, d in state.k] == [
        (1, 5, 16), (1, 5, 8), (1, 5, 16)]
    assert state.key_elements == 20
    cells, positions = np.array([1, 3]), np.array([7, 2])
    state.turn(cells, positions, rope)
    original = SeqState(data)
    for (_, turned), (_, before) in zip(state.k, original.k, strict=True):
        keys = F16Keys().decode(before[0][cells])
        expected = F16Keys().encode(rope.rotate(keys, positions - np.array([1, 3])))
        np.testing.assert_array_equal(turned[0][cells], expected)
    alike = SeqState(synthetic_state([8, 8], cells=5))
    assert alike.key_rows is not None and alike.key_rows.shape == (2, 5, 16)
    assert np.shares_memory(alike.key_rows, alike.buf)
    with pytest.raises(ValueError):
        SeqState(data[:-2])


def test_the_hadamard_basis_is_orthonormal_and_its_own_inverse() -> None:
    h = hadamard(128)
    np.testing.assert_allclose(h @ h, np.eye(128), atol=1e-6)
    assert set(np.unique(np.abs(h))) == {np.float32(1 / np.sqrt(128))}


def test_the_default_models_rope_is_plain_and_reproduced() -> None:
    with Engine.load(n_ctx=256, device=TEST_DEVICE) as engine:
        rope = engine.model.rope
        assert rope is not None and not rope.neox and rope.n_rot == rope.head_dim == 64


def test_the_host_buffer_grows_with_headroom_and_is_pinned_where_cuda_runs() -> None:
    buf = HostBuffer(pin=True)
    first = buf.at_least(1000)
    assert len(first) >= 1000 and buf.at_least(1100) is first  # headroom: no regrowth
    view = buf.array(10)
    view[:] = 7
    assert bytes(first[:10]) == b"\x07" * 10
    assert buf.pinned == (_cuda_runtime() is not None)  # registered wherever it can be
    assert len(buf.at_least(10_000)) >= 10_000
    buf.free()
    assert not buf.pinned
    assert not HostBuffer(pin=False).pinned
