"""Untrusted text on the command line's terminal (issue 26): stored titles and messages, and
model output, reach the terminal without escape sequences; exports are private files; and
a prompt that is not UTF-8 is answered. The real `ccm-chat` entry point, run as a process
where the bytes on its stdout are what is checked."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ccm_chat.app.cli import main
from ccm_chat.app.terminal_text import PlainStream, plain_text
from ccm_chat.storage import Store

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_TITLE = "Owl notes \x1b]0;PWNED\x07"
HOSTILE_MESSAGE = "owls hunt \x1b]52;c;UFdORUQ=\x07at night\x1b[2J, quietly"


@pytest.fixture
def hostile_db(db_path: Path) -> Path:
    store = Store(db_path)
    conv = store.create_conversation(HOSTILE_TITLE)
    store.add_message(conv.id, "user", HOSTILE_MESSAGE)
    store.add_message(conv.id, "assistant", "They do \x9b31m\x1b[1mindeed\x7f.")
    store.close()
    return db_path


def run_cli(*argv: str | bytes, stdin: bytes = b"", env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """`ccm-chat ARGV` in its own process: stdout and stderr as the bytes it wrote."""
    return subprocess.run([sys.executable, "-m", "ccm_chat.app.cli", *argv], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=timeout, check=False,
                          env=env)


def test_stored_escape_sequences_never_reach_the_terminal(hostile_db: Path) -> None:
    shown = {}
    for argv in (["list"], ["search", "owls"], ["export", "1"]):
        done = run_cli(*argv, "--db", str(hostile_db))
        assert done.returncode == 0, done.stderr
        assert b"\x1b" not in done.stdout + done.stderr, argv
        assert b"\x07" not in done.stdout and b"\xc2\x9b" not in done.stdout, argv
        shown[argv[0]] = done.stdout.decode()
    assert "Owl notes" in shown["list"] and "Owl notes" in shown["search"]
    assert "owls hunt at night, quietly" in shown["export"]
    assert "They do indeed." in shown["export"]


def test_an_export_to_a_file_keeps_the_text_and_is_private(hostile_db: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "exp.md"
    old_umask = os.umask(0o022)
    try:
        assert main(["export", "1", "-o", str(out), "--db", str(hostile_db)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert HOSTILE_MESSAGE in out.read_text()  # a file keeps the text as it is
        # a file that was there, readable by all, is narrowed before the chat goes in
        shared = tmp_path / "shared.md"
        shared.write_text("old")
        shared.chmod(0o644)
        assert main(["export", "1", "-o", str(shared), "--db", str(hostile_db)]) == 0
        assert stat.S_IMODE(shared.stat().st_mode) == 0o600
        assert HOSTILE_TITLE in shared.read_text()
    finally:
        os.umask(old_umask)


def test_an_error_naming_hostile_text_is_printed_plain(tmp_path: Path, capsys) -> None:
    """An error message can carry a path the user gave (here a model path): it is shown
    without its escape sequences too."""
    model = tmp_path / "m\x1b]0;PWNED\x07.gguf"
    assert main(["ask", "hi", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "Model file not found" in err


def test_a_stream_split_inside_an_escape_sequence_shows_none_of_it() -> None:
    """ask writes the reply as it comes, a few characters at a time: a sequence cut between
    two pieces is removed whole, its text not left behind."""
    reply = "Sure\x1b]0;PWNED\x07 here\x1b[2J it is\x1b]52;c;UFdORUQ=\x1b\\ done\x1b"
    for size in (1, 2, 3, 5, 8):
        stream = PlainStream()
        shown = "".join(stream.feed(reply[i:i + size]) for i in range(0, len(reply), size))
        shown += stream.close()
        assert shown == "Sure here it is done" == plain_text(reply), size


def test_ask_with_invalid_utf8_on_stdin_and_argv_answers(tmp_path: Path, capsys) -> None:
    """Bytes that are not UTF-8 become U+FFFD (audit cases 30 and 31 failed with
    "surrogates not allowed"); escape sequences in the prompt do not come back out."""
    env = dict(os.environ, CCM_CHAT_DATA_DIR=str(tmp_path))
    done = run_cli("ask", "-", "--temperature", "0", "--max-tokens", "12", env=env,
                   stdin=b"Say: hi \xff\xfe there \x1b]0;PWNED\x07\x1b[2J")
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert done.stdout.strip() and b"\x1b" not in done.stdout
    # what Python makes of the argument b"hi \xff\xfe there" (surrogateescape)
    argument = b"Say: hi \xff\xfe there".decode("utf-8", "surrogateescape")
    assert main(["ask", argument, "--temperature", "0", "--max-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.err == ""
