"""The dialogue sets training and evaluation read ship inside the package (issue 26): a fresh
clone, or an installed wheel, needs no folder beside it."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import pytest

from ccm_chat.training.data import DATA_ENV, default_data_dir, load_corpora

SETS = ("topical_chat", "synthetic_persona_chat", "memorybank_en")


def test_the_dialogue_sets_are_read_from_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    folder = default_data_dir()
    assert str(folder) == str(resources.files("ccm_chat.assets") / "dialogue")
    for name in SETS:  # each with the licence it is shared under
        assert "Licen" in (folder / name / "LICENSE").read_text(errors="replace")
    conversations = load_corpora()
    sources = {key.split(":")[0] for key in conversations}
    assert {"topical_chat", "synthetic_persona_chat", "memorybank"} <= sources
    assert sum(k.startswith("topical_chat:") for k in conversations) > 2000


def test_another_folder_of_dialogue_sets_can_be_named(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """$CCM_CHAT_DATA still points it elsewhere, plain or gzipped files alike."""
    (tmp_path / "topical_chat").mkdir()
    conv = {"id": "t1", "turns": [{"speaker": "a", "text": t} for t in ("hi", "hello", "bye",
                                                                         "see you")]}
    (tmp_path / "topical_chat" / "conversations.jsonl").write_text(json.dumps(conv) + "\n")
    (tmp_path / "memorybank_en").mkdir()
    bank = {"ann": {"history": {"2023-05-01": [{"query": "q1", "response": "r1"},
                                               {"query": "q2", "response": "r2"}]}}}
    (tmp_path / "memorybank_en" / "memory_bank_en.json.gz").write_bytes(
        gzip.compress(json.dumps(bank).encode()))
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    monkeypatch.setenv("CCM_CHAT_CHITCHAT", str(tmp_path / "none.json"))
    (tmp_path / "none.json").write_text("{}")
    assert load_corpora() == {"topical_chat:t1": [("hi", "hello"), ("bye", "see you")],
                              "memorybank:ann": [("q1", "r1"), ("q2", "r2")]}
