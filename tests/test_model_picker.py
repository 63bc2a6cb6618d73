"""The settings screen's model picker (issue 29, item 4): the real app through Textual's
pilot, on a fake home holding an Ollama model and a folder named in the settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.widgets import Input, Label, OptionList

from ccm_chat.app.settings import Settings
from ccm_chat.storage import Store
from ccm_chat.ui.screens.model_picker import ModelPickerScreen
from ccm_chat.ui.screens.settings import SettingsScreen
from tests.conftest import TickingClock
from tests.test_model_discovery import write_gguf
from tests.test_ui import SIZE, make_app, wait_for


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    for var in ("OLLAMA_MODELS", "HF_HUB_CACHE", "HF_HOME", "LLAMA_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    blob = home / ".ollama" / "models" / "blobs" / f"sha256-{'a' * 64}"
    write_gguf(blob, "Ollama Qwen")
    manifest = home / ".ollama" / "models" / "manifests" / "registry.ollama.ai" / "library" \
        / "qwen2.5" / "1.5b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{'a' * 64}"}]}))
    return home


async def test_pick_a_discovered_model_and_save_it(home: Path, tmp_path: Path,
                                                   db_path: Path, scripted) -> None:
    mine = tmp_path / "mine" / "my-model.gguf"
    write_gguf(mine, "My Own Model", arch="llama", file_type=7)
    store = Store(db_path, clock=TickingClock())
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#model_folders", Input).value = str(tmp_path / "mine")
        await pilot.click("#pick_model")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelPickerScreen)
                       and app.screen.query_one("#models", OptionList).option_count == 2)
        picker = app.screen
        rows = [str(picker.query_one("#models", OptionList).get_option_at_index(i).prompt)
                for i in range(2)]
        mine_row, ollama_row = rows  # the settings' folders come first
        assert ollama_row.startswith("Ollama Qwen  [ollama: qwen2.5:1.5b]")
        assert "qwen2, Q4_K_M" in ollama_row
        assert "context 32768, compressor: no" in ollama_row  # the blob's name is its sha256
        assert "balanced: 512 cells, 11 MB" in ollama_row
        assert "ccm-chat train-compressor --model" in ollama_row and "takes a GPU" in ollama_row
        assert mine_row.startswith("My Own Model") and "llama, Q8_0" in mine_row
        assert "compressor unknown" in mine_row
        assert "2 found" in str(picker.query_one("#picker_note", Label).render())
        await pilot.press("down", "up", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        assert app.screen.query_one("#model_path", Input).value == str(mine)
        await wait_for(pilot, lambda: "Reading" not in str(
            app.screen.query_one("#method_note", Label).render()))
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
    store.close()
    saved = Settings.load(Store(db_path))
    assert saved.model_path == str(mine)
    assert saved.model_folders == [str(tmp_path / "mine")]


async def test_the_picker_closes_with_nothing_chosen(home: Path, store: Store,
                                                     scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        app.screen.query_one("#model_path", Input).value = "typed.gguf"
        await pilot.click("#pick_model")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelPickerScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        assert app.screen.query_one("#model_path", Input).value == "typed.gguf"
