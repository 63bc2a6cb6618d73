"""The terminal driver the app runs on Linux and macOS: Textual's, but input that is not
UTF-8 never kills it.

Textual's LinuxDriver decodes stdin strictly in its input thread, so one invalid byte in a
paste (a binary file, a Latin-1 text) raises UnicodeDecodeError there and the whole app
stops. This driver runs the same loop (Textual 8.2's run_input_thread) with a decoder that
turns such bytes into U+FFFD; the message box then strips what should not be sent.
"""

from __future__ import annotations

import os
import selectors
from codecs import getincrementaldecoder

from textual._parser import ParseError
from textual._xterm_parser import XTermParser
from textual.drivers.linux_driver import LinuxDriver

READ_SIZE = 1024 * 4  # bytes read at a time, as Textual's driver reads


class LenientLinuxDriver(LinuxDriver):
    """LinuxDriver whose input thread decodes with errors="replace"."""

    def run_input_thread(self) -> None:
        """Wait for input and dispatch its events until the driver stops."""
        parser = XTermParser(self._debug)
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
                    for event in parser.feed(text):
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
