"""Settings: model (typed, or picked from the models on this machine), the folders the
picker also looks in, back end, the numbers (GPU layers, threads, context, sampling), system
prompt, compression level (with what it means on this model), recall and keys.

Every number field of Settings gets a row, so a new one shows up here without a change; the
form scrolls inside the dialog and Save stays reachable on a 60x20 terminal."""

from __future__ import annotations

from dataclasses import fields, replace

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Switch

from ccm_chat.app.levels import describe_level
from ccm_chat.app.settings import Settings
from ccm_chat.app.ui_support import BACKENDS, LEVELS
from ccm_chat.ui.screens.model_picker import ModelPickerScreen

LABELS = {  # the number fields' labels; one not listed is labelled from its name
    "n_gpu_layers": "GPU layers (-1 all, 0 CPU only)",
    "context_size": "Context size (tokens)",
    "temperature": "Temperature (0 = greedy)",
    "top_p": "Top-p",
    "max_tokens": "Max tokens per reply",
    "threads": "CPU threads (0 = automatic)",
    "repeat_penalty": "Repetition penalty (1 = off)",
    "dry_multiplier": "DRY loop guard (0 = off, llama.cpp)",
}
KINDS = {"int": int, "float": float}


def number_fields() -> dict[str, tuple[str, type, bool]]:
    """name -> (label, int or float, whether empty means None) for each number of Settings."""
    found = {}
    for f in fields(Settings):
        kind = str(f.type).replace(" ", "")
        optional = kind.endswith("|None")
        base = KINDS.get(kind.removesuffix("|None"))
        if base is not None:
            label = LABELS.get(f.name, f.name.replace("_", " ").capitalize())
            found[f.name] = (label + (" (empty = automatic)" if optional else ""), base, optional)
    return found


NUMBER_FIELDS = number_fields()


def parse_keymap(text: str) -> dict[str, str]:
    """'regenerate=ctrl+g, stop=escape' -> {'regenerate': 'ctrl+g', 'stop': 'escape'}."""
    keymap = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, keys = part.partition("=")
        if not sep or not name.strip() or not keys.strip():
            raise ValueError(f"Key binding {part.strip()!r} is not of the form action=keys.")
        keymap[name.strip()] = keys.strip()
    return keymap


def format_keymap(keymap: dict[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in keymap.items())


def parse_folders(text: str) -> list[str]:
    """'~/models; /data/gguf' -> ['~/models', '/data/gguf']."""
    return [part.strip() for part in text.split(";") if part.strip()]


def _row(label: str, *widgets: Input | Select | Button | Switch) -> ComposeResult:
    with Horizontal(classes="row"):
        yield Label(label, classes="field-label")
        yield from widgets


class SettingsScreen(ModalScreen[Settings | None]):
    """Dismisses with the new, validated settings, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]
    DEFAULT_CSS = """
    SettingsScreen #pick_model { width: auto; min-width: 7; margin-left: 1; }
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(classes="dialog wide tall"):
            yield Label("Settings", classes="question")
            with VerticalScroll(classes="form", id="form"):
                yield from _row("Model file (.gguf; empty = embedded default)",
                                Input(value=s.model_path, id="model_path", compact=True,
                                      placeholder="(embedded SmolLM2-135M-Instruct)"),
                                Button("Pick…", id="pick_model", compact=True))
                yield from _row("More folders Pick… looks in (a; b)",
                                Input(value="; ".join(s.model_folders), id="model_folders",
                                      placeholder="~/models; /data/gguf", compact=True))
                yield from _row("Back end", Select(
                    [(b, b) for b in BACKENDS], value=s.backend, allow_blank=False,
                    id="backend", compact=True))
                for name, (label, _, _) in NUMBER_FIELDS.items():
                    value = getattr(s, name)
                    yield from _row(label, Input(value="" if value is None else str(value),
                                                 id=name, compact=True))
                yield from _row("System prompt for new chats",
                                Input(value=s.system_prompt, id="system_prompt", compact=True))
                yield from _row("Compression level", Select(
                    [(level, level) for level in LEVELS], value=s.compression,
                    allow_blank=False, id="compression", compact=True))
                yield Label(describe_level(s.compression, s.backend, s.model_path),
                            id="method_note", markup=False)  # it names the model path
                yield from _row("Recall earlier exchanges a message asks about",
                                Switch(value=s.recall, id="recall"))
                yield from _row("Key bindings (action=keys; …)",
                                Input(value=format_keymap(s.keymap), id="keymap",
                                      placeholder="regenerate=ctrl+g; stop=escape",
                                      compact=True))
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    @on(Select.Changed, "#compression, #backend")
    def _level_changed(self, event: Select.Changed) -> None:
        note = describe_level(str(self.query_one("#compression", Select).value),
                              str(self.query_one("#backend", Select).value),
                              self.query_one("#model_path", Input).value.strip())
        self.query_one("#method_note", Label).update(note)

    def action_pick_model(self) -> None:
        folders = parse_folders(self.query_one("#model_folders", Input).value)
        try:
            context = int(self.query_one("#context_size", Input).value)
        except ValueError:
            context = self.settings.context_size
        self.app.push_screen(ModelPickerScreen(folders, context), self._picked)

    def _picked(self, path: str | None) -> None:
        if path:
            self.query_one("#model_path", Input).value = path
            self.query_one("#method_note", Label).update("Reading the model…")
            self._describe(str(self.query_one("#compression", Select).value),
                           str(self.query_one("#backend", Select).value), path)

    @work(thread=True, exclusive=True, group="method-note", exit_on_error=False)
    def _describe(self, level: str, backend: str, path: str) -> None:
        """What the level means on the picked model: its sha256 is read to find its
        compressor, seconds for a large file, so off the UI thread."""
        note = describe_level(level, backend, path)
        self.app.call_from_thread(self._show_note, note)

    def _show_note(self, note: str) -> None:
        if self.is_attached:  # the dialog may have closed meanwhile
            self.query_one("#method_note", Label).update(note)

    def read_form(self) -> Settings:
        values: dict[str, object] = {}
        for name, (label, kind, optional) in NUMBER_FIELDS.items():
            raw = self.query_one(f"#{name}", Input).value.strip()
            if optional and not raw:
                values[name] = None
                continue
            try:
                values[name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"{label}: {raw!r} is not a number.") from exc
        values["model_path"] = self.query_one("#model_path", Input).value.strip()
        values["model_folders"] = parse_folders(self.query_one("#model_folders", Input).value)
        values["system_prompt"] = self.query_one("#system_prompt", Input).value.strip()
        values["compression"] = str(self.query_one("#compression", Select).value)
        values["recall"] = self.query_one("#recall", Switch).value
        values["backend"] = str(self.query_one("#backend", Select).value)
        values["keymap"] = parse_keymap(self.query_one("#keymap", Input).value)
        candidate = replace(self.settings, **values)  # type: ignore[arg-type]
        problems = candidate.problems()
        if problems:
            raise ValueError(" ".join(problems))
        return candidate

    def action_save(self) -> None:
        try:
            settings = self.read_form()
        except ValueError as exc:
            self.notify(str(exc), title="Settings not saved", severity="error")
            return
        self.dismiss(settings)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        elif event.button.id == "pick_model":
            self.action_pick_model()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
