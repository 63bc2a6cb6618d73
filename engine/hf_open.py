"""Opening the transformers back end: the model and the context that suits its device.

engine.backend's entry point for "hf". It sits apart from engine.hf_backend so that the
eager context (there) and the CUDA-graph one built on it (engine.hf_fast) import one way.
"""

from __future__ import annotations

import os

import torch

from ccm_chat.engine.backend import BackendOptions, Opened
from ccm_chat.engine.errors import EngineError
from ccm_chat.engine.hf_backend import HFContext, HFModel
from ccm_chat.engine.hf_fast import FastHFContext
from ccm_chat.engine.models import model_cache_dir


def open_backend(options: BackendOptions) -> Opened:
    """The model and one context for it (engine.backend's entry point)."""
    if options.kv_type != "f16":
        raise EngineError(f"The hf back end keeps its KV cache unquantized; {options.kv_type} "
                          "is for llama.cpp.")
    if options.device == "gpu" and not torch.cuda.is_available():
        raise EngineError("--device gpu was asked for, but torch sees no CUDA device.")
    model = HFModel(options.path, options.device, options.cache_dir or model_cache_dir())
    use_cuda = model.device.type == "cuda"
    if use_cuda and os.environ.get("CCM_CHAT_HF_FAST", "1") != "0":
        ctx: HFContext = FastHFContext(model, options.n_ctx)
        label = "GPU (CUDA, bfloat16, CUDA graphs)"
    else:  # the CPU path, and CUDA with CCM_CHAT_HF_FAST=0: eager on a DynamicCache
        ctx = HFContext(model, options.n_ctx)
        label = "GPU (CUDA, bfloat16)" if use_cuda else "CPU (float32)"
    return Opened(model, ctx, label, -1 if use_cuda else 0)
