"""What the chat pane's parts share: how a failed service call becomes a notice (attempt,
fault) and the pane's timings and words."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ccm_chat.app.errors import ChatError

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
CHECK_EVERY_S = 2.0  # how often an idle pane asks whether another window changed its chat
QUIT_WAIT_S = 3.0  # how long quitting waits for a running reply to stop and be saved
UNSAVED_MARK = "not saved yet"
TAKE_OVER_HINT = 'Ctrl+P, "Take over chat"'


def fault(exc: BaseException) -> str:
    """What to tell the user about a failure: a ChatError says it itself."""
    if isinstance(exc, ChatError):
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}): {exc}"


def attempt(call: Callable[[], Any]) -> tuple[Any, str | None]:
    """(result, None), or (None, what went wrong): the boundary between the UI and the service."""
    try:
        return call(), None
    except Exception as exc:  # noqa: BLE001 - no failure of a service call may end the app
        return None, fault(exc)
