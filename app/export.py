"""Conversations out of the app: Markdown for reading, JSON for tools."""

from __future__ import annotations

import json
from collections.abc import Sequence

from storage import ConversationRecord, MessageRecord

FORMATS = ("md", "json")


def to_markdown(conv: ConversationRecord, messages: Sequence[MessageRecord]) -> str:
    lines = [f"# {conv.title}", "", f"_Created {conv.created}; model: {conv.model or 'default'}_"]
    if conv.system_prompt:
        lines += ["", f"> System: {conv.system_prompt}"]
    for msg in messages:
        head = "User" if msg.role == "user" else msg.role.capitalize()
        if msg.interrupted:
            head += " (interrupted)"
        lines += ["", f"## {head}", "", msg.content]
    return "\n".join(lines) + "\n"


def to_json(conv: ConversationRecord, messages: Sequence[MessageRecord]) -> str:
    doc = {
        "id": conv.id,
        "title": conv.title,
        "created": conv.created,
        "updated": conv.updated,
        "model": conv.model,
        "system_prompt": conv.system_prompt,
        "messages": [
            {
                "id": m.id,
                "role": m.role,
                "content": m.content,
                "created": m.created,
                "status": m.status,
                "token_count": m.token_count,
            }
            for m in messages
        ],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def export_conversation(
    conv: ConversationRecord, messages: Sequence[MessageRecord], fmt: str
) -> str:
    if fmt == "md":
        return to_markdown(conv, messages)
    if fmt == "json":
        return to_json(conv, messages)
    raise ValueError(f"Unknown export format {fmt!r}; pick one of {FORMATS}.")
