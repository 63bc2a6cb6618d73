"""The hf fast path's static cache (engine.hf_fast, engine.static_kv) on the CPU: every edit a
memory policy makes gives the logits the eager DynamicCache path gives, states move between
the two, and the device sampler draws as NumpySampler does. (The CUDA-graph replay itself
runs on a GPU only: bench/hf_fast_check.py checks it there.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ccm_chat.engine.ccm.compressor import Compressor
from ccm_chat.engine.config import SamplingParams
from ccm_chat.engine.errors import EngineError
from ccm_chat.engine.hf_backend import HFContext, NumpySampler
from ccm_chat.engine.hf_fast import FastHFContext, TorchSampler, span_for, split_attention

VOCAB = 97


@pytest.fixture(scope="module")
def tiny() -> SimpleNamespace:
    """A two-layer Llama with grouped-query heads and random weights, plus a random LoRA."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=VOCAB, max_position_embeddings=512, rope_theta=10000.0,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    comp = Compressor(model, n_comp=2, rank=4, alpha=8.0)
    for p in comp.trainable():
        torch.nn.init.normal_(p, std=0.2)
    return SimpleNamespace(torch_model=model, config=config, device=torch.device("cpu"),
                           n_vocab=VOCAB, n_ctx_train=512, compressor=comp)


def pair(tiny) -> tuple[HFContext, FastHFContext]:
    return HFContext(tiny, 256), FastHFContext(tiny, 256)


def assert_same(a: HFContext, b: FastHFContext) -> None:
    assert a.positions.tolist() == b.positions.tolist()
    np.testing.assert_allclose(a.logits(), b.logits(), atol=1e-5, rtol=0)


def test_every_policy_edit_matches_the_dynamic_cache(tiny) -> None:
    eager, fast = pair(tiny)
    both = (eager, fast)
    text = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    for c in both:
        c.decode(text[:40], 0)
    assert_same(eager, fast)
    for tok in text[40:44]:  # one token at a time (a captured step on a GPU)
        for c in both:
            c.decode([tok], len(c.positions))
        assert_same(eager, fast)
    for c in both:  # window eviction: drop [4, 20), shift the rest down
        c.remove(4, 20)
        c.shift(20, -1, -16)
        c.decode(text[44:48], len(c.positions))
    assert_same(eager, fast)
    vectors = tiny.compressor.comp.detach().numpy()
    for c in both:  # <COMP> slots with the adapter on, then the text goes under them
        end = len(c.positions)
        c.decode_embeddings(vectors, end, adapter=object())
        c.remove(4, end)
        c.shift(end, -1, 4 - end)
        c.decode(text[48:56], len(c.positions))
    assert_same(eager, fast)
    rows = [c.decode(text[56:60], len(c.positions), want=[0, 1, 2]) for c in both]
    for i in (0, 1, 2):
        np.testing.assert_allclose(rows[0][i], rows[1][i], atol=1e-5, rtol=0)
    for c in both:  # CCM-merge folds the last n cells into the first n
        c.merge_slots(2, 0.5)
        c.redecode(text[0], len(c.positions) - 1)
    assert_same(eager, fast)
    assert fast.state_size() == eager.state_size()


def test_a_reordered_keep_moves_only_what_follows_the_first_gap(tiny) -> None:
    """Non-contiguous selections (a merge's transient positions) go through index copies."""
    _, fast = pair(tiny)
    fast.decode(list(range(10)), 0)
    before = fast.cache.kv[..., :10, :].clone()
    index = torch.tensor([0, 1, 4, 7, 9])
    fast.cache.keep(index)
    torch.testing.assert_close(fast.cache.kv[..., :5, :], before[..., index, :])
    assert fast.cache.held == 5 and int(fast.cache.length) == 5


def test_states_move_between_the_static_and_the_dynamic_cache(tiny) -> None:
    eager, fast = pair(tiny)
    text = list(range(3, 40))
    eager.decode(text, 0)
    fast.set_state(eager.get_state())  # the same format both ways
    other = HFContext(tiny, 256)
    other.set_state(fast.get_state())
    for c in (eager, fast, other):
        c.decode([5], len(c.positions))
    assert_same(eager, fast)
    assert_same(other, fast)
    with pytest.raises(EngineError):
        fast.set_state(b"not a state")
    assert fast.cache.held == 0 and len(fast.positions) == 0
    with pytest.raises(EngineError, match="do not fit"):
        fast.decode(list(range(257)), 0)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=3),
])
def test_the_device_sampler_draws_as_the_numpy_one(tiny, params) -> None:
    _, fast = pair(tiny)
    fast.decode(list(range(1, 30)), 0)
    torch_sampler, numpy_sampler = TorchSampler(params, fast.model.device), NumpySampler(params)
    for _ in range(12):
        token = torch_sampler.sample(fast)
        assert token == numpy_sampler.sample(fast)
        fast.decode([token], len(fast.positions))


def test_a_seeded_draw_repeats_and_keeps_to_the_top_p_nucleus(tiny) -> None:
    _, fast = pair(tiny)
    fast.decode(list(range(1, 30)), 0)
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=7, repeat_penalty=1.0)
    draws = [[s.sample(fast) for _ in range(5)]
             for s in (TorchSampler(params, fast.model.device) for _ in range(2))]
    assert draws[0] == draws[1]
    sampler = TorchSampler(params, fast.model.device)
    probs = torch.softmax(torch.as_tensor(fast.logits()), -1)
    ordered, order = torch.sort(probs, descending=True)
    nucleus = set(order[: int((ordered.cumsum(0) - ordered < 0.5).sum())].tolist())
    assert {sampler.sample(fast) for _ in range(40)} <= nucleus


def test_split_attention_equals_sdpa_under_the_mask() -> None:
    torch.manual_seed(3)
    query, key, value = torch.randn(1, 6, 1, 8), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    mask = torch.where(torch.arange(32) <= 20, 0.0, torch.finfo(torch.float32).min)
    out, _ = split_attention(None, query, key, value, mask.view(1, 1, 1, 32), scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
        attn_mask=mask.view(1, 1, 1, 32), scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert [span_for(n, 8192) for n in (1, 256, 257, 5000, 9000)] == [256, 256, 512, 8192, 8192]
