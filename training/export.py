"""Write a compressor's LoRA as a llama.cpp GGUF LoRA adapter, and its <COMP> vectors.

For Llama-architecture models (Llama, Mistral, SmolLM) llama.cpp stores Q and K rows
permuted for its RoPE layout (convert_hf_to_gguf.py), so the LoRA's B matrices for q and k get
the same permutation; A matrices act on the input side and stay as they are. Qwen2 keeps the
transformers row order.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ccm_chat.engine.ccm.files import GGUF_NAMES
from ccm_chat.engine.ccm.lora import ConditionalLoRALinear

ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: within each head, the two rotary halves interleaved."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def export_lora_gguf(model, path: Path, alpha: float) -> Path:
    """The conditional LoRA of `model` (a Compressor's) as a GGUF adapter at `path`."""
    config = model.config
    if config.model_type not in ARCHES:
        raise ValueError(f"No llama.cpp adapter export for {config.model_type!r} models; "
                         f"supported: {', '.join(ARCHES)}.")
    arch, permuted = ARCHES[config.model_type]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for i, layer in enumerate(model.model.layers):
        for name, short in GGUF_NAMES.items():
            lora = getattr(layer.self_attn, name)
            assert isinstance(lora, ConditionalLoRALinear), name
            a = lora.lora_a.detach().float().cpu().numpy()
            b = lora.lora_b.detach().float().cpu().numpy()
            if permuted and name in ("q_proj", "k_proj"):
                b = permute_rows(b, n_head if name == "q_proj" else n_kv)
            writer.add_tensor(f"blk.{i}.{short}.weight.lora_a", np.ascontiguousarray(a))
            writer.add_tensor(f"blk.{i}.{short}.weight.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
