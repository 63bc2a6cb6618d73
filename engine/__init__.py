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
# The rest loads on first use, so training (engine.ccm) runs where only torch is installed.
from contextlib import suppress  # isort: skip

with suppress(ImportError):  # without it, the llama.cpp back end says what to install
    import llama_cpp  # noqa: F401  isort: skip

from engine.lazy import lazy_attributes

_EXPORTS = {
    "LEVELS": "engine.config", "CompressionConfig": "engine.config",
    "SamplingParams": "engine.config",
    "Conversation": "engine.conversation", "MemoryStats": "engine.conversation",
    "MemoryView": "engine.kv_sequence", "Reply": "engine.reply", "ReplyStats": "engine.reply",
    "BACKENDS": "engine.engine", "DEFAULT_SYSTEM_PROMPT": "engine.engine",
    "Engine": "engine.engine", "EngineInfo": "engine.engine",
    "ContextFullError": "engine.errors", "EngineError": "engine.errors",
    "ModelError": "engine.errors", "StateError": "engine.errors",
    "default_model_path": "engine.models", "resolve_model_path": "engine.models",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes("engine", _EXPORTS)

