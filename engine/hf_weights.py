"""Loading weights for transformers: a model folder, or a GGUF converted once and cached.

One place decides the device and dtype (bfloat16 on CUDA, float32 on the CPU), for the hf back
end, compressor training and the benchmarks alike.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ccm_chat.engine.errors import ModelError
from ccm_chat.engine.models import model_fingerprint


def torch_placement(device: str) -> tuple[torch.device, torch.dtype]:
    """CUDA in bfloat16 when asked for ("gpu"/"auto"/"cuda") and present, else CPU in float32."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def converted_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where a GGUF's weights, converted for transformers, are kept (by content hash)."""
    return cache_dir / "hf-converted" / model_fingerprint(gguf)[:16]


def load_pretrained(path: Path, cache_dir: Path, dtype: torch.dtype):
    """(model, tokenizer) from a transformers folder, or from a GGUF via a converted cache.

    Converting a GGUF takes over a minute on a small CPU, so the result is saved once under
    the cache dir and loaded from there afterwards.
    """
    hf_logging.set_verbosity_error()  # progress bars and warnings would scribble on the UI
    hf_logging.disable_progress_bar()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a transformers model folder (no config.json). Pass a folder "
                "saved with save_pretrained, or a .gguf file."
            )
        source, extra = path, {}
    else:
        cached = converted_dir(path, cache_dir)
        if (cached / "config.json").exists() and (cached / "done").exists():
            source, extra = cached, {}
        else:
            source, extra = path.parent, {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"transformers could not load {path}: {exc}") from exc
    if extra:
        # The weights were dequantized to `dtype` on load; what is left of the GGUF
        # "quantizer" only stops save_pretrained from writing them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cached = converted_dir(path, cache_dir)
        shutil.rmtree(cached, ignore_errors=True)
        model.save_pretrained(cached)
        tokenizer.save_pretrained(cached)
        (cached / "done").write_text(json.dumps({"from": str(path)}))
    return model, tokenizer
