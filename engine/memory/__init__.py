"""Memory policies: what a conversation's KV memory keeps after each turn.

One small class per method behind one interface (like kvpress's presses). A policy never
touches a back end directly: it edits the memory through the handle the conversation gives
it (engine.kv_memory.KVMemory), so the same policy runs on any back end that offers those
edits. What a policy needs (a compressor, a context that merges) and how its memory is
rebuilt, it declares as class attributes (`MemoryPolicy`).
"""

from ccm_chat.engine.memory.base import MemoryPolicy
from ccm_chat.engine.memory.ccm import CCMMergePolicy, CCMPolicy
from ccm_chat.engine.memory.full import FullPolicy
from ccm_chat.engine.memory.hybrid import HybridPolicy
from ccm_chat.engine.memory.window import WindowPolicy

POLICIES: dict[str, type[MemoryPolicy]] = {
    FullPolicy.name: FullPolicy,
    WindowPolicy.name: WindowPolicy,
    CCMPolicy.name: CCMPolicy,
    CCMMergePolicy.name: CCMMergePolicy,
    HybridPolicy.name: HybridPolicy,
}


def make_policy(method: str, **params: object) -> MemoryPolicy:
    try:
        cls = POLICIES[method]
    except KeyError:
        raise ValueError(
            f"Unknown memory method {method!r}; this engine has {', '.join(POLICIES)}."
        ) from None
    return cls(**params)


__all__ = ["POLICIES", "CCMMergePolicy", "CCMPolicy", "FullPolicy", "HybridPolicy", "MemoryPolicy",
           "WindowPolicy", "make_policy"]
