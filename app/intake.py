"""Taking a user's message into a chat's memory before anything of it is saved: stopped
between decode batches when the user cancels, refused (in words) when it does not fit, and
undone on any failure so that the memory never keeps half of it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ccm_chat.app.engine_api import EngineConversation, Progress
from ccm_chat.app.errors import NotSavedError, RebuildCancelled
from ccm_chat.engine import ContextFullError, EngineError
from ccm_chat.engine.errors import CancelledError

STOPPED_BEFORE_SENT = "Stopped before the message was sent; it is back in the box."


class SendCancelled(NotSavedError):
    """The user stopped a send while the model took the message in: nothing was saved."""


def take_in(live: EngineConversation, text: str, cancel: threading.Event | None,
            undo: Callable[[int, bool], None], level: str) -> None:
    """Decode the user's message into memory, or refuse it (nothing is saved yet).

    `cancel` is checked between decode batches: a long message stops within one batch, and
    the engine rolls its memory back to where it was. On any failure `undo(n, usable)` cuts
    the memory back to its `n` messages; `usable` says the engine rolled its cells back
    cleanly (a cancel), else they may be half-written. `level`: the compression setting."""
    n = len(live.messages)
    try:
        if cancel is None:  # nothing to stop it with: the plain call every engine takes
            live.add_turn("user", text)
        else:
            live.add_turn("user", text, cancel=cancel)
    except CancelledError as exc:
        undo(n, True)  # the engine rolled its cells back: the memory stays usable
        raise SendCancelled(STOPPED_BEFORE_SENT) from exc
    except ContextFullError as exc:
        undo(n, False)
        raise NotSavedError(too_long(level, exc)) from exc
    except (EngineError, ValueError) as exc:
        undo(n, False)
        why = f"Your message was not sent: the model failed on it ({exc})."
        raise NotSavedError(why) from exc
    except BaseException:  # Ctrl+C in a terminal: the memory must not keep half of it
        undo(n, False)
        raise
    if cancel is not None and cancel.is_set():  # stopped as the intake ended: not sent
        undo(n, False)
        raise SendCancelled(STOPPED_BEFORE_SENT)


def too_long(level: str, exc: Exception, outcome: str = "it was not saved") -> str:
    """Why a message (or an edit) longer than the memory takes in was refused."""
    if level == "off":
        return (f"This message is longer than the context window can hold with compression "
                f"off, so {outcome}. Pick a compression level in settings (Ctrl+S) to take "
                "long messages in, start a new chat, or raise the context size.")
    return (f"This message is longer than the {level} memory can take in ({exc}), so "
            f"{outcome}. Start a new chat, raise the context size, or send it in parts.")


def stop_if_cancelled(cancel: threading.Event | None) -> None:
    """A send stopped before its message reached the model: nothing to undo."""
    if cancel is not None and cancel.is_set():
        raise SendCancelled(STOPPED_BEFORE_SENT)


def cancellable(progress: Progress | None, cancel: threading.Event | None) -> Progress | None:
    """A progress callback that stops a rebuild (RebuildCancelled) once `cancel` is set."""
    if cancel is None:
        return progress

    def report(done: int, total: int) -> None:
        if cancel.is_set() and done < total:  # at the end the work is done: keep it
            raise RebuildCancelled(
                "Stopped rebuilding the memory. The chat is unchanged; its memory is rebuilt "
                "when you open it or send a message.")
        if progress is not None:
            progress(done, total)

    return report
