"""Compressed Context Memory (Kim et al., ICLR 2024): the trainable compressor, in PyTorch.

The pieces (a <COMP> table, a conditional LoRA, the episode layouts of CCM-concat and
CCM-merge), the parallel masked forward used in training and the recursive loop it must
match, training, and export to llama.cpp.
"""

from engine.ccm.compressor import Compressor
from engine.ccm.layout import METHODS, Layout, episode_layout
from engine.ccm.lora import CompGate, ConditionalLoRALinear

__all__ = ["METHODS", "CompGate", "Compressor", "ConditionalLoRALinear", "Layout",
           "episode_layout"]
