"""The terminal driver the app runs on Linux and macOS: Textual's, but input that is not
UTF-8 never kills it.

Textual's LinuxDriver decodes stdin strictly in its input thread, so one invalid byte in a
paste (a binary file, a Latin-1 text) raises UnicodeDecodeError there and the whole app
stops. This driver runs the same loop (Textual 8.2's run_input_thread) with a decoder that
turns such bytes into U+FFFD; the message box then strips what should not be sent. It also
takes bracketed pastes out before the key parser sees them (`PasteSplitter`): the parser
reads an ESC inside a paste as the start of a key sequence, so a pasted text holding escape
sequences came out as keys and a paste in the wrong order.
"""

from __future__ import annotations

import os
import selectors
from codecs import getincrementaldecoder
from collections.abc import Iterator

from textual import events
from textual._parser import ParseError
from textual._xterm_parser import XTermParser
from textual.drivers.linux_driver import LinuxDriver

READ_SIZE = 1024 * 4  # bytes read at a time, as Textual's driver reads
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # xterm's bracketed paste


def _partial_end(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker` (it may come split)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class PasteSplitter:
    """Splits terminal input into key text and whole bracketed pastes, in order."""

    def __init__(self) -> None:
        self._paste: list[str] | None = None  # inside a paste: what came of it so far
        self._held = ""  # the start of what may be the end marker

    def feed(self, text: str) -> Iterator[tuple[bool, str]]:
        """(is_paste, text) pieces. Key text passes at once, but for what may be the start
        of a paste's marker (two characters or more of it: a lone Esc must not wait)."""
        data, self._held = self._held + text, ""
        while data:
            if self._paste is None:
                at = data.find(PASTE_START)
                if at < 0:
                    keep = _partial_end(data, PASTE_START)
                    keep = keep if keep >= 2 else 0
                    if len(data) > keep:
                        yield False, data[: len(data) - keep]
                    self._held = data[len(data) - keep:]
                    return
                if at:
                    yield False, data[:at]
                data, self._paste = data[at + len(PASTE_START):], []
                continue
            at = data.find(PASTE_END)
            if at < 0:
                keep = _partial_end(data, PASTE_END)
                self._paste.append(data[: len(data) - keep])
                self._held = data[len(data) - keep:]
                return
            self._paste.append(data[:at])
            yield True, "".join(self._paste)
            data, self._paste = data[at + len(PASTE_END):], None


class LenientLinuxDriver(LinuxDriver):
    """LinuxDriver whose input thread decodes with errors="replace"."""

    def run_input_thread(self) -> None:
        """Wait for input and dispatch its events until the driver stops."""
        parser = XTermParser(self._debug)
        pastes = PasteSplitter()
        decode = getincrementaldecoder("utf-8")(errors="replace").decode
        selector = selectors.SelectSelector()
        selector.register(self.fileno, selectors.EVENT_READ)

        def dispatch(ready: list[tuple[selectors.SelectorKey, int]], final: bool = False) -> None:
            for index, (_key, mask) in enumerate(ready):
                if mask & selectors.EVENT_READ:
                    last = index == len(ready) - 1
                    text = decode(os.read(self.fileno, READ_SIZE), final=final and last)
                    if not text:  # stdin is a pipe that was closed
                        break
                    for is_paste, piece in pastes.feed(text):
                        if is_paste:
                            self.process_message(events.Paste(piece))
                            continue
                        for event in parser.feed(piece):
                            self.process_message(event)
            for event in parser.tick():
                self.process_message(event)

        try:
            while not self.exit_event.is_set():
                dispatch(selector.select(0.1))
            selector.unregister(self.fileno)
            dispatch(selector.select(0.1), final=True)
        finally:
            selector.close()
            try:
                for _event in parser.feed(""):
                    pass
            except (EOFError, ParseError):
                pass
