"""Shared fixtures: a temporary database, a fixed clock, the scripted and the real engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ccm_chat.app.service import ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.engine import Engine
from ccm_chat.storage import Store
from tests.device import TEST_DEVICE
from tests.scripted_engine import ScriptedEngine


class TickingClock:
    """A clock that moves one second per reading, so order by time is deterministic."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the user's real data dir, database or model setting."""
    monkeypatch.setenv("CCM_CHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CCM_CHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CCM_CHAT_DB", raising=False)
    monkeypatch.delenv("CCM_CHAT_MODEL", raising=False)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path, clock=TickingClock())
    yield s
    s.close()


@pytest.fixture
def scripted() -> ScriptedEngine:
    return ScriptedEngine()


def scripted_factory(engine: ScriptedEngine) -> Callable[[Settings, str | None], ScriptedEngine]:
    return lambda settings, model: engine


@pytest.fixture
def service(store: Store, scripted: ScriptedEngine) -> ChatService:
    return ChatService(store, engine_factory=scripted_factory(scripted))


@pytest.fixture(scope="session")
def real_engine() -> Iterator[Engine]:
    """The embedded default model on the CPU, loaded once for the whole run."""
    eng = Engine.load(n_ctx=2048, device=TEST_DEVICE)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def hf_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The embedded default GGUF on the transformers back end (CPU, float32), loaded once.

    The first load converts the GGUF into a cache dir, as the app does under the user's.
    """
    eng = Engine.load(backend="hf", n_ctx=512, device="cpu", compression="balanced",
                      cache_dir=tmp_path_factory.mktemp("hf-cache"), compressor=False)
    yield eng
    eng.close()
