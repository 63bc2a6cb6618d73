"""`full`: keep every token; the conversation ends when the context window is full."""

from __future__ import annotations

from typing import Any

from ccm_chat.engine.memory.base import MemoryPolicy


class FullPolicy(MemoryPolicy):
    name = "full"
    rebuilds = "prefill"

    def params(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return "full context, nothing evicted"
