"""A chat message, shared by both back ends and the conversation."""

from __future__ import annotations

from dataclasses import dataclass

# What a NUL in a message is shown to the model as: llama.cpp takes a message as a C string,
# which would end at it, and the model would never see the rest (the transcript keeps it all)
NUL_STAND_IN = "\ufffd"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def for_model(text: str) -> str:
    """`text` as a chat template is given it: whole, a NUL replaced by U+FFFD."""
    return text.replace("\0", NUL_STAND_IN)
