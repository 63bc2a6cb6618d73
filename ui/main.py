"""The `ccm-chat` entry point: the composition root that gives the command line its chat."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ccm_chat.app.cli import main as cli_main
from ccm_chat.app.service import ChatService
from ccm_chat.ui.app import ChatApp


def run_chat(service: ChatService, conversation_id: int | None, resume_last: bool) -> None:
    ChatApp(service, conversation_id=conversation_id, resume_last=resume_last).run()


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(argv, chat_runner=run_chat)


if __name__ == "__main__":
    sys.exit(main())
