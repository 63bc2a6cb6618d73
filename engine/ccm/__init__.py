"""Compressed Context Memory (Kim et al., ICLR 2024): the compressor the chat runs, in PyTorch.

The pieces the runtime needs (a <COMP> table, a conditional LoRA, the episode layouts of
CCM-concat and CCM-merge, the masked attention, the compressor folders); training, its data,
evaluation and export to llama.cpp live apart in `ccm_chat.training` (the train extra), which
imports this package and never the other way round. Loaded on first use: the engine imports
`engine.ccm.files` (torch-free) at every start, and torch only when a compressor runs.
"""

from ccm_chat.engine.lazy import lazy_attributes

_EXPORTS = {
    "Compressor": "ccm_chat.engine.ccm.compressor", "METHODS": "ccm_chat.engine.ccm.layout",
    "Layout": "ccm_chat.engine.ccm.layout", "episode_layout": "ccm_chat.engine.ccm.layout",
    "CompGate": "ccm_chat.engine.ccm.lora", "ConditionalLoRALinear": "ccm_chat.engine.ccm.lora",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes("ccm_chat.engine.ccm", _EXPORTS)
