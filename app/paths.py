"""Where ccm-chat keeps its files: platformdirs locations, overridable by flag or env var."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from ccm_chat.engine.models import CACHE_DIR_ENV, model_cache_dir

__all__ = ["CACHE_DIR_ENV", "cache_dir", "data_dir", "db_path"]

APP_NAME = "ccm-chat"
DATA_DIR_ENV = "CCM_CHAT_DATA_DIR"
DB_ENV = "CCM_CHAT_DB"
DB_FILENAME = "ccm-chat.db"


def data_dir() -> Path:
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    return model_cache_dir()


def db_path(override: str | os.PathLike[str] | None = None) -> Path:
    """--db beats $CCM_CHAT_DB beats the data dir."""
    chosen = override or os.environ.get(DB_ENV)
    return Path(chosen).expanduser() if chosen else data_dir() / DB_FILENAME
