"""ccm-chat's engine: a local model, conversations with managed KV memory, exact save/restore.

Usable on its own, without the UI:

    from ccm_chat.engine import Engine
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

from ccm_chat.engine.lazy import lazy_attributes

_EXPORTS = {
    "LEVELS": "ccm_chat.engine.config", "CompressionConfig": "ccm_chat.engine.config",
    "SamplingParams": "ccm_chat.engine.config",
    "Conversation": "ccm_chat.engine.conversation", "MemoryStats": "ccm_chat.engine.conversation",
    "MemoryView": "ccm_chat.engine.kv_sequence", "Reply": "ccm_chat.engine.reply",
    "ReplyStats": "ccm_chat.engine.reply",
    "BACKENDS": "ccm_chat.engine.engine", "DEFAULT_SYSTEM_PROMPT": "ccm_chat.engine.engine",
    "Engine": "ccm_chat.engine.engine", "EngineInfo": "ccm_chat.engine.engine",
    "CancelledError": "ccm_chat.engine.errors",
    "ContextFullError": "ccm_chat.engine.errors", "EngineError": "ccm_chat.engine.errors",
    "ModelError": "ccm_chat.engine.errors", "StateError": "ccm_chat.engine.errors",
    "LlamaOptions": "ccm_chat.engine.llama_options",
    "default_model_path": "ccm_chat.engine.models", "resolve_model_path": "ccm_chat.engine.models",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes("ccm_chat.engine", _EXPORTS)

