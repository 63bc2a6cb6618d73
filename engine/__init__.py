"""ccm-chat's engine: a local model, conversations with managed KV memory, exact save/restore.

Usable on its own, without the UI:

    from engine import Engine
    eng = Engine.load()                       # the embedded default model
    conv = eng.new_conversation(system="You are terse.")
    for piece in conv.send("What is the capital of France?", temperature=0):
        print(piece, end="")
"""

# llama_cpp goes first: on a CUDA host, loading a model segfaulted in init_tokenizer when numpy
# had been imported before llama_cpp (H100 host, numpy 2.5.2, llama-cpp-python 0.3.36).
import llama_cpp  # noqa: F401  isort: skip

from engine.config import LEVELS, CompressionConfig, SamplingParams
from engine.conversation import Conversation, MemoryStats, ReplyStats
from engine.engine import BACKENDS, DEFAULT_SYSTEM_PROMPT, Engine, EngineInfo
from engine.errors import ContextFullError, EngineError, ModelError, StateError
from engine.models import default_model_path, resolve_model_path

__all__ = [
    "BACKENDS",
    "DEFAULT_SYSTEM_PROMPT",
    "LEVELS",
    "CompressionConfig",
    "ContextFullError",
    "Conversation",
    "Engine",
    "EngineError",
    "EngineInfo",
    "MemoryStats",
    "ModelError",
    "ReplyStats",
    "SamplingParams",
    "StateError",
    "default_model_path",
    "resolve_model_path",
]
