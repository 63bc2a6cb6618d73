"""Conversations out of the app: Markdown for reading, JSON for tools."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import platformdirs

from ccm_chat.storage import ConversationRecord, MessageRecord

FORMATS = ("md", "json")
EXPORT_DIR_ENV = "CCM_CHAT_EXPORT_DIR"


def default_export_dir() -> Path:
    """Where an export goes unless the user says otherwise: $CCM_CHAT_EXPORT_DIR, else the
    user's documents folder, else downloads, else home (never the current directory, which
    under `make chat` is the clone)."""
    override = os.environ.get(EXPORT_DIR_ENV)
    if override:
        return Path(override).expanduser()
    for folder in (platformdirs.user_documents_dir(), platformdirs.user_downloads_dir()):
        if folder and Path(folder).is_dir():
            return Path(folder)
    return Path.home()


def default_export_path(conv: ConversationRecord, fmt: str = "md") -> Path:
    """A file name for a conversation's export in default_export_dir()."""
    stem = re.sub(r"[^\w-]+", "-", conv.title.lower()).strip("-")[:40] or "chat"
    return default_export_dir() / f"ccm-chat-{conv.id}-{stem}.{fmt}"


PRIVATE_FILE = 0o600  # a chat is private: only its owner reads an export


def write_export(path: Path, text: str) -> None:
    """Write an export readable by its owner only: the file is created 0600 (never briefly
    wider), and a file already there is narrowed to 0600 before its new text goes in."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        if hasattr(os, "fchmod"):  # POSIX; Windows has no such modes
            os.fchmod(out.fileno(), PRIVATE_FILE)
        out.write(text)


def to_markdown(conv: ConversationRecord, messages: Sequence[MessageRecord],
                model_name: str | None = None) -> str:
    model = model_name or conv.model or "unknown"
    lines = [f"# {conv.title}", "", f"_Created {conv.created}; model: {model}_"]
    if conv.system_prompt:
        lines += ["", f"> System: {conv.system_prompt}"]
    for msg in messages:
        head = "User" if msg.role == "user" else msg.role.capitalize()
        if msg.interrupted:
            head += " (interrupted)"
        lines += ["", f"## {head}", "", msg.content]
    return "\n".join(lines) + "\n"


def to_json(conv: ConversationRecord, messages: Sequence[MessageRecord],
            model_name: str | None = None) -> str:
    doc = {
        "id": conv.id,
        "title": conv.title,
        "created": conv.created,
        "updated": conv.updated,
        "model": model_name or conv.model,
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
    conv: ConversationRecord, messages: Sequence[MessageRecord], fmt: str,
    model_name: str | None = None,
) -> str:
    """`model_name`: the model's real name, when the stored one is a path or "default"."""
    if fmt == "md":
        return to_markdown(conv, messages, model_name)
    if fmt == "json":
        return to_json(conv, messages, model_name)
    raise ValueError(f"Unknown export format {fmt!r}; pick one of {FORMATS}.")
