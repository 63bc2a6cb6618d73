"""What lets training fit big models: gradient checkpointing and the chunked loss give the
gradients of the plain path (tiny random Llama, CPU, float32)."""

from __future__ import annotations

import torch

from ccm_chat.engine.ccm import ConditionalLoRALinear
from ccm_chat.training import train as train_module
from tests.test_ccm import recall_dialogue, tiny_config, with_active_lora


def _grads(checkpointing: bool, chunk: int | None = None, method: str = "concat"):
    from ccm_chat.training.train import Plan, dialogue_loss, enable_checkpointing

    model, comp = with_active_lora(n_comp=2, std=0.2, method=method)
    if checkpointing:
        enable_checkpointing(comp)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in comp.trainable():
        p.requires_grad_(True)
    old = train_module.LOGIT_CHUNK
    if chunk:
        train_module.LOGIT_CHUNK = chunk * model.config.vocab_size
    try:
        parts = dialogue_loss(comp, recall_dialogue(3), Plan(1, [1, 2], [2]), tiny_config())
        parts["loss"].backward()
    finally:
        train_module.LOGIT_CHUNK = old
    return float(parts["loss"].detach()), [p.grad.clone() for p in comp.trainable()]


def test_checkpointed_layers_and_chunked_loss_give_the_plain_gradients() -> None:
    for method in ("concat", "merge"):
        loss, plain = _grads(False, method=method)
        for checkpointing, chunk in ((True, None), (False, 2), (True, 3)):  # rows a chunk
            other_loss, other = _grads(checkpointing, chunk, method)
            assert abs(other_loss - loss) < 1e-5
            for a, b in zip(plain, other, strict=True):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert any(float(g.abs().sum()) > 0 for g in plain[1:])  # the LoRA learns too


def test_a_recomputed_layer_sees_the_comp_rows_of_its_forward() -> None:
    """Without putting the gate back, a recomputed layer would run with no <COMP> rows (the
    LoRA off) and the normal attention: the LoRA's gradient would be wrong or fail."""
    from ccm_chat.training.train import enable_checkpointing

    model, comp = with_active_lora(n_comp=2, std=0.2)
    enable_checkpointing(comp)
    seen = []
    lora = next(m for m in model.modules() if isinstance(m, ConditionalLoRALinear))
    lora.register_forward_pre_hook(lambda m, args: seen.append(m.gate.mask is not None))
    _grads_on(comp)
    assert len(seen) == 2 and all(seen)  # the forward and its recomputation, both gated


def _grads_on(comp) -> None:
    from ccm_chat.training.train import Plan, dialogue_loss

    comp.model.train()
    for p in comp.trainable():
        p.requires_grad_(True)
    dialogue_loss(comp, recall_dialogue(3), Plan(0, [1, 2], []), tiny_config(kl_weight=0.0)
                  )["loss"].backward()
