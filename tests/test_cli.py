"""The `ccm-chat` command line, in process and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccm_chat.app.cli import main
from ccm_chat.storage import Store


@pytest.fixture
def filled_db(db_path: Path) -> Path:
    store = Store(db_path)
    conv = store.create_conversation("Trip planning")
    store.add_message(conv.id, "user", "Where should I go in Portugal?")
    store.add_message(conv.id, "assistant", "Lisbon and Porto are great.")
    store.close()
    return db_path


def test_help_everywhere(capsys) -> None:
    for argv in ([], ["ask"], ["list"], ["export"], ["search"], ["paths"],
                 ["train-compressor"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        # a bare "%" in a help text makes argparse print its own internals instead
        assert "usage: ccm-chat" in out and "option_strings" not in out


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


def test_search_takes_fts_syntax_literally(db_path: Path, capsys) -> None:
    store = Store(db_path)
    conv = store.create_conversation("Languages")
    store.add_message(conv.id, "user", "Is C++ harder than C?")
    store.add_message(conv.id, "assistant", "Rust AND OR Go are fine too.")
    store.close()
    assert main(["search", "c++", "--db", str(db_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["1\tLanguages\tuser: Is [C]++ harder than [C]?"]  # c++ as written, only
    for query in ('AND OR "', "NOT", '"', "(", "*"):
        assert main(["search", query, "--db", str(db_path)]) == 0, query
        captured = capsys.readouterr()
        assert "error" not in captured.err, query
        assert captured.out or f"No messages match {query!r}." in captured.err
    assert main(["search", "AND OR", "--db", str(db_path)]) == 0
    assert "Rust [AND] [OR] Go" in capsys.readouterr().out


def test_list_into_a_closed_pipe_ends_quietly(db_path: Path) -> None:
    store = Store(db_path)
    store.db["conversations"].insert_all(  # more than a pipe buffer of output
        {"title": f"Conversation number {i} with a longish title", "created": "t",
         "updated": f"2026-01-01T{i:05d}"} for i in range(3000))
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccm_chat.app.cli", "list", "--db", str(db_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does once it has its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert b"Conversation number 2999" in first
    assert err == ""  # no "Broken pipe", no traceback
    assert proc.returncode in (0, 141)


def test_paths_shows_the_database_size(db_path: Path, capsys) -> None:
    assert main(["paths", "--db", str(db_path)]) == 0
    assert f"database:  {db_path}   (not created yet)" in capsys.readouterr().out
    Store(db_path).close()
    assert main(["paths", "--db", str(db_path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("database"))
    assert line.endswith(" kB)") and float(line.rsplit("(", 1)[1].split()[0]) > 1


def test_ask_loads_the_engine_the_app_loads(db_path: Path, capsys, monkeypatch) -> None:
    """Level, GPU layers, back end and threads from the settings, with the flags on top."""
    from ccm_chat.app.settings import Settings
    from tests.scripted_engine import ScriptedEngine

    store = Store(db_path)
    Settings(compression="balanced", n_gpu_layers=0, threads=2).save(store)
    store.close()
    loaded = []

    def load(settings, model):
        loaded.append((settings, model))
        return ScriptedEngine()

    monkeypatch.setattr("ccm_chat.app.cli.load_engine", load)
    assert main(["ask", "hello", "--db", str(db_path)]) == 0
    assert capsys.readouterr().out == "You said: hello\n"
    assert main(["ask", "hi", "--db", str(db_path), "--threads", "1", "--backend", "hf",
                 "--model", "m.gguf"]) == 0
    (first, none), (second, model) = loaded
    assert (first.compression, first.n_gpu_layers, first.threads) == ("balanced", 0, 2)
    assert none is None and model == "m.gguf"
    assert (second.threads, second.backend, second.compression) == (1, "hf", "balanced")
    assert main(["ask", "hi", "--db", str(db_path), "--threads", "-1"]) == 2
    assert "Threads must be" in capsys.readouterr().err


def test_chat_takes_threads_and_backend_for_the_session_only() -> None:
    from ccm_chat.app.cli import build_parser, session_settings
    from ccm_chat.app.settings import Settings

    saved = Settings(threads=2, backend="llamacpp", compression="light")
    args = build_parser().parse_args(["--threads", "3", "--continue"])
    assert args.resume
    assert session_settings(saved, args) == Settings(threads=3, backend="llamacpp",
                                                     compression="light")
    assert session_settings(saved, build_parser().parse_args([])) == saved
    with pytest.raises(ValueError, match="Threads"):
        session_settings(saved, build_parser().parse_args(["--threads", "-1"]))


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
    monkeypatch.setenv("CCM_CHAT_EXPORT_DIR", str(tmp_path / "out"))
    main(["paths"])
    assert f"exports:   {tmp_path / 'out'}   ($CCM_CHAT_EXPORT_DIR)" in capsys.readouterr().out


def test_damaged_database_is_a_clear_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    assert main(["list", "--db", str(bad)]) == 2
    assert "damaged or is not a ccm-chat database" in capsys.readouterr().err


@pytest.mark.real_model  # `main(["ask", ...])` on the real engine factory: no rule sees it
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
        [sys.executable, "-m", "ccm_chat.app.cli", "ask", "-", "--temperature", "0",
         "--max-tokens", "20"],
        input="What is the capital of France?", capture_output=True, text=True, env=env,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert done.stderr == ""  # llama.cpp's log stays quiet
