"""The chat on llama.cpp runs without the [hf] and [train] extras, and asking for the hf back
end without them says which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent("""
    import sys
    EXTRAS = ("torch", "transformers", "accelerate", "gguf", "safetensors", "chitchat_dataset",
              "tqdm")
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in EXTRAS:
                raise ImportError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
""")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_the_chat_runs_without_the_extras() -> None:
    done = run("""
        from ccm_chat.engine import Engine
        import ccm_chat.ui.app  # the terminal UI too
        with Engine.load(n_ctx=256, compression="balanced", device="cpu") as eng:
            conv = eng.new_conversation()
            text = "".join(conv.send("Hi!", max_tokens=4, temperature=0))
            again = eng.restore_conversation(conv.save_state())
            print("OK", bool(text), again.stats().method)
        print(sorted(m for m in sys.modules if m.split(".")[0] in EXTRAS))
    """)
    assert done.returncode == 0, done.stderr
    assert "OK True ccm-hybrid" in done.stdout and "[]" in done.stdout


def test_the_hf_back_end_without_its_extra_names_it() -> None:
    done = run("""
        from ccm_chat.engine import Engine, EngineError
        try:
            Engine.load(backend="hf", device="cpu")
        except EngineError as exc:
            print("ERR", exc)
    """)
    assert done.returncode == 0, done.stderr
    assert "ERR" in done.stdout and "ccm-chat[hf]" in done.stdout


def test_training_without_its_extra_names_it() -> None:
    done = run("""
        from ccm_chat.app.cli import main
        sys.exit(main(["train-compressor", "--steps", "1", "--kl-weight", "0.5"]))
    """)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ccm-chat[train]" in done.stderr and "Traceback" not in done.stderr


def test_the_training_flags_reach_its_config() -> None:
    from ccm_chat.app.cli import build_parser

    args = build_parser().parse_args(["train-compressor", "--kl-weight", "0", "--max-window",
                                      "4", "--last-reply-only", "--max-seconds", "60"])
    assert (args.kl_weight, args.max_window, args.last_reply_only, args.max_seconds) == (
        0.0, 4, True, 60.0)
