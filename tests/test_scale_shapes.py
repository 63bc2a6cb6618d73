"""The RTX-scale shapes (bench/scale_shapes.py): published sizes, and a tiny random-weight GGUF
plus random compressor that llama.cpp loads and the engine chats with, at off and under CCM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ccm_chat.engine import Engine, SamplingParams  # isort: skip  (llama_cpp before numpy)
from ccm_chat.engine.config import LEVEL_BUDGETS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scale_shapes  # noqa: E402
from scale_shapes import SHAPES, hf_config, tensor_plan, tiny_shape  # noqa: E402

# Parameter counts of the published checkpoints (their model cards: 1.24B / 3.21B / 8.03B /
# 7.62B) and the sizes of the usual Q4_K_M downloads (0.81 / 2.02 / 4.92 / 4.68 GB).
PUBLISHED = {"llama-3.2-1b": (1_235_814_400, 0.81e9), "llama-3.2-3b": (3_212_749_824, 2.02e9),
             "llama-3.1-8b": (8_030_261_248, 4.92e9), "qwen2.5-7b": (7_615_616_512, 4.68e9)}
BYTES = {"Q4_K": 144, "Q6_K": 210}


@pytest.mark.parametrize("name", list(SHAPES))
def test_configs_have_the_published_shapes(name):
    import torch
    from transformers import AutoModelForCausalLM

    shape = SHAPES[name]
    config = hf_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params, download = PUBLISHED[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert config.model_type == shape.arch and config.tie_word_embeddings == shape.tied
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == shape.qkv_bias
    assert attn.k_proj.out_features == shape.kv_heads * shape.head_dim
    weights = sum(d[0] * d[1] // 256 * BYTES[k] if k in BYTES else 4 * d[0]
                  for _, d, k in tensor_plan(shape))
    assert abs(weights - download) / download < 0.02


def test_llama3_rope_factors_follow_the_scaling():
    factors = scale_shapes.llama3_rope_factors(SHAPES["llama-3.1-8b"])
    assert factors.shape == (64,)
    assert factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies kept, low ones scaled
    assert (factors[1:] >= factors[:-1]).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    shape = tiny_shape("llama")
    info = scale_shapes.write_gguf(shape, folder / "tiny.gguf")
    scale_shapes.write_compressor(shape, folder / "tiny.gguf", folder / "ccm", info["sha256"])
    return shape, folder


def test_tiny_gguf_has_the_planned_layout(tiny):
    import gguf

    shape, folder = tiny
    reader = gguf.GGUFReader(str(folder / "tiny.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.attn_v.weight"] == "Q6_K"  # use_more_bits: the last of two layers
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_q.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q6_K"  # tied: it is the output matrix too
    assert "output.weight" not in types and "rope_freqs.weight" in types
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == shape.vocab and tokens[shape.vocab - 256] == "<|begin_of_text|>"
    assert "<|start_header_id|>" in reader.fields["tokenizer.chat_template"].contents()


def test_tiny_gguf_chats_through_the_engine_with_and_without_ccm(tiny):
    shape, folder = tiny
    held = {}
    for level, compressor in (("off", False), ("balanced", folder / "ccm")):
        with Engine.load(folder / "tiny.gguf", compression=level, device="cpu", n_ctx=2048,
                         compressor=compressor) as engine:
            conv = engine.new_conversation()
            for _ in range(6):
                conv.add_turn("user", "How was your day at work today? Tell me all of it. " * 4)
                conv.add_turn("assistant", "Fine, thanks: a long meeting, then lunch. " * 4)
            pieces = list(conv.send("What did I ask?", SamplingParams(temperature=0.0,
                                                                     max_tokens=8)))
            view = conv.memory_view()
            if level == "off":
                assert view.tokens[0] == shape.specials["<|begin_of_text|>"]
            else:
                assert view.slots > 0  # <COMP> slots of the compressed exchanges lead
            assert shape.specials["<|start_header_id|>"] in view.tokens  # llama 3's template
            assert pieces and conv.last_reply.tokens == 8
            held[engine.compression.method] = conv.stats().memory_tokens
    # the level holds its budget (the recent exchanges fill what the slots leave), not more
    assert held["ccm-hybrid"] <= LEVEL_BUDGETS["balanced"][0] < held["full"]
