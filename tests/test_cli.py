"""The `ccm-chat` command line, in process and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from storage import Store


@pytest.fixture
def filled_db(db_path: Path) -> Path:
    store = Store(db_path)
    conv = store.create_conversation("Trip planning")
    store.add_message(conv.id, "user", "Where should I go in Portugal?")
    store.add_message(conv.id, "assistant", "Lisbon and Porto are great.")
    store.close()
    return db_path


def test_help_everywhere(capsys) -> None:
    for argv in ([], ["ask"], ["list"], ["export"], ["search"], ["paths"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        assert "usage: ccm-chat" in capsys.readouterr().out


def test_list(filled_db: Path, capsys) -> None:
    assert main(["list", "--db", str(filled_db)]) == 0
    out = capsys.readouterr().out
    assert "Trip planning" in out and "2 messages" in out


def test_list_empty_says_how_to_start(db_path: Path, capsys) -> None:
    assert main(["--db", str(db_path), "list"]) == 0
    assert "Start one with `ccm-chat`" in capsys.readouterr().err


def test_export_markdown_and_json(filled_db: Path, capsys, tmp_path: Path) -> None:
    assert main(["export", "1", "--db", str(filled_db)]) == 0
    assert "# Trip planning" in capsys.readouterr().out
    out_file = tmp_path / "t.json"
    assert main(["export", "1", "--format", "json", "-o", str(out_file), "--db",
                 str(filled_db)]) == 0
    doc = json.loads(out_file.read_text())
    assert doc["messages"][1]["content"] == "Lisbon and Porto are great."


def test_export_unknown_id_is_a_clear_error(filled_db: Path, capsys) -> None:
    assert main(["export", "99", "--db", str(filled_db)]) == 2
    assert "No conversation with id 99" in capsys.readouterr().err


def test_search(filled_db: Path, capsys) -> None:
    assert main(["search", "porto", "--db", str(filled_db)]) == 0
    assert "Trip planning" in capsys.readouterr().out
    assert main(["search", "zebra", "--db", str(filled_db)]) == 0  # no hits is an answer
    captured = capsys.readouterr()
    assert captured.out == "" and "No messages match 'zebra'." in captured.err


def test_paths_follow_flags_and_env(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CCM_CHAT_DATA_DIR", str(tmp_path / "d"))
    assert main(["paths"]) == 0
    out = capsys.readouterr().out
    assert f"database:  {tmp_path / 'd' / 'ccm-chat.db'}" in out
    assert "SmolLM2-135M-Instruct.Q4_1.gguf (embedded default)" in out
    monkeypatch.setenv("CCM_CHAT_DB", str(tmp_path / "env.db"))
    main(["paths"])
    assert f"database:  {tmp_path / 'env.db'}" in capsys.readouterr().out
    main(["paths", "--db", str(tmp_path / "flag.db")])
    assert f"database:  {tmp_path / 'flag.db'}" in capsys.readouterr().out


def test_damaged_database_is_a_clear_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    assert main(["list", "--db", str(bad)]) == 2
    assert "damaged or is not a ccm-chat database" in capsys.readouterr().err


def test_ask_answers_on_stdout_with_the_real_model(capsys) -> None:
    assert main(["ask", "What is the capital of France?", "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_ask_with_a_missing_model_says_what_to_do(tmp_path: Path, capsys) -> None:
    assert main(["ask", "hi", "--model", str(tmp_path / "none.gguf")]) == 2
    err = capsys.readouterr().err
    assert "Model file not found" in err and "embedded default" in err


def test_installed_console_script_reads_stdin(tmp_path: Path) -> None:
    env = dict(os.environ, CCM_CHAT_DATA_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "ask", "-", "--temperature", "0", "--max-tokens", "20"],
        input="What is the capital of France?", capture_output=True, text=True, env=env,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert done.stderr == ""  # llama.cpp's log stays quiet
