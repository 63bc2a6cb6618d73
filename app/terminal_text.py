"""Text from the store or the model made safe to show: no control characters, no escape
sequences.

A title, a message or a reply may hold bytes a terminal obeys (ESC ]0; sets the window
title, ESC ]52; writes the clipboard, ESC [2J clears the screen). Whatever the CLI prints
and whatever the user sends from the chat box goes through `plain_text`, so such text
shows as text and is stored without them; an export written to a file keeps its text as
it is. Newlines and tabs stay.
"""

from __future__ import annotations

import re

# ECMA-48 escape sequences, in their 7-bit (ESC x) and 8-bit (C1) forms. A string
# sequence (OSC, DCS, SOS, PM, APC) runs to BEL or ST, or to the next control character
# when it is not closed (so an unclosed one never swallows the lines after it).
_STRING_BODY = r"[^\x00-\x1f\x7f-\x9f]*(?:\x07|\x1b\\|\x9c)?"
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI: parameters, intermediates, final
    rf"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]){_STRING_BODY}"  # OSC, DCS, SOS, PM, APC
    r"|\x1b[ -/]*[0-~]?"  # any other escape: intermediates and a final character
)
# what is left after the sequences: C0 and C1 controls and DEL, but for \t and \n
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# an escape sequence cut off at the end of a streamed piece (its end is in the next one)
_UNFINISHED = re.compile(
    r"(?:(?:\x1b\[|\x9b)[0-?]*[ -/]*"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x00-\x1f\x7f-\x9f]*\x1b?"
    r"|\x1b[ -/]*)\Z"
)
MAX_HELD = 4096  # characters a stream holds back waiting for a sequence's end


def plain_text(text: str) -> str:
    """`text` without escape sequences and control characters, but for newlines and tabs."""
    return _CONTROL.sub("", _SEQUENCE.sub("", text))


class PlainStream:
    """plain_text for text that arrives in pieces (a streamed reply): a sequence split
    between two pieces is removed whole, not shown half."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, piece: str) -> str:
        """The safe text of what came so far, less an unfinished sequence at its end."""
        text = self._held + piece
        cut = _UNFINISHED.search(text)
        if cut is None or len(text) - cut.start() > MAX_HELD:
            self._held = ""
            return plain_text(text)
        self._held = text[cut.start():]
        return plain_text(text[:cut.start()])

    def close(self) -> str:
        """What is still held, made safe (the stream ended inside a sequence)."""
        text, self._held = self._held, ""
        return plain_text(text)
