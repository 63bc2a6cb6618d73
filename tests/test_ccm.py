"""The CCM compressor's pieces on a tiny random Llama made here (CPU, float32)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.ccm import Compressor, ConditionalLoRALinear, concat_layout


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def with_active_lora(n_comp: int, std: float) -> tuple[LlamaForCausalLM, Compressor]:
    """A compressor whose LoRA is not the zero it starts as, so the <COMP> path shows."""
    model = tiny_llama()
    comp = Compressor(model, n_comp=n_comp, rank=4)
    for m in model.modules():
        if isinstance(m, ConditionalLoRALinear):
            torch.nn.init.normal_(m.lora_b, std=std)
    return model, comp


def test_concat_layout_blocks_and_positions() -> None:
    layout = concat_layout([3, 2, 2], n_comp=2)
    assert layout.length == 3 + 2 + 2 + 2 + 2
    assert layout.is_comp.tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    allowed = layout.allowed()
    # turn 2's text sees C1 and itself, not turn 1's text
    assert allowed[5, 3] and allowed[5, 4] and not allowed[5, 0] and allowed[5, 5]
    # C2 sees turn 2's text and C1, not turn 1's text; nothing sees the future
    assert allowed[8, 5] and allowed[8, 3] and not allowed[8, 2] and not allowed[3, 4]
    # the last turn sees every earlier group but no earlier text
    assert allowed[10].nonzero().flatten().tolist() == [3, 4, 7, 8, 9, 10]


def test_lora_is_active_only_at_comp_positions() -> None:
    model, comp = with_active_lora(n_comp=2, std=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        comp.gate.mask = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
        gated_off = model(input_ids=ids).logits
        comp.gate.mask = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
        gated_on = model(input_ids=ids).logits
    comp.gate.mask = None
    torch.testing.assert_close(gated_off, plain)
    torch.testing.assert_close(gated_on[:, :2], plain[:, :2])  # before the slot: unchanged
    assert (gated_on[:, 2:] - plain[:, 2:]).abs().max() > 1e-3


def test_parallel_and_recursive_paths_give_the_same_logits() -> None:
    model, comp = with_active_lora(n_comp=3, std=0.2)
    torch.manual_seed(1)
    turns = [torch.randint(3, 97, (n,)).tolist() for n in (6, 4, 7, 5)]
    with torch.no_grad():
        parallel, layout = comp.parallel_logits(turns)
        recursive = comp.recursive_logits(turns)
    for index, step in zip(layout.text_index, recursive, strict=True):
        torch.testing.assert_close(parallel[index], step, atol=1e-4, rtol=1e-4)
    # and the memory matters: without the <COMP> groups the last turn reads differently
    alone = model(input_ids=torch.tensor([turns[-1]]),
                  position_ids=torch.tensor([layout.text_index[-1]])).logits[0]
    assert (alone - recursive[-1]).abs().max() > 1e-3
