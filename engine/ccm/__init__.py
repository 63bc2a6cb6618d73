"""Compressed Context Memory (Kim et al., ICLR 2024): the trainable compressor, in PyTorch.

The pieces (a <COMP> table, a conditional LoRA, the episode layouts of CCM-concat and
CCM-merge), the parallel masked forward used in training and the recursive loop it must
match, training, and export to llama.cpp. Loaded on first use: the engine imports
`engine.ccm.files` (torch-free) at every start, and torch only when a compressor runs.
"""

from engine.lazy import lazy_attributes

_EXPORTS = {
    "Compressor": "engine.ccm.compressor", "METHODS": "engine.ccm.layout",
    "Layout": "engine.ccm.layout", "episode_layout": "engine.ccm.layout",
    "CompGate": "engine.ccm.lora", "ConditionalLoRALinear": "engine.ccm.lora",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes("engine.ccm", _EXPORTS)
