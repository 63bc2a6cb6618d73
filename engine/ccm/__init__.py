"""Compressed Context Memory (Kim et al., ICLR 2024): the trainable compressor, in PyTorch.

Work in progress (issue 4): the pieces below, the parallel masked forward and the recursive
loop it must match. Training, export to llama.cpp and the memory policies come next.
"""

from engine.ccm.compressor import Compressor
from engine.ccm.layout import Layout, concat_layout
from engine.ccm.lora import CompGate, ConditionalLoRALinear

__all__ = ["CompGate", "Compressor", "ConditionalLoRALinear", "Layout", "concat_layout"]
