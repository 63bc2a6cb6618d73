"""Where ccm-chat keeps its files: platformdirs locations, overridable by flag or env var."""

from __future__ import annotations

import os
from pathlib import Path

from ccm_chat.engine.models import CACHE_DIR_ENV, DATA_DIR_ENV, model_cache_dir, user_data_dir

__all__ = ["CACHE_DIR_ENV", "DATA_DIR_ENV", "cache_dir", "data_dir", "db_path"]

DB_ENV = "CCM_CHAT_DB"
DB_FILENAME = "ccm-chat.db"


def data_dir() -> Path:
    return user_data_dir()


def cache_dir() -> Path:
    return model_cache_dir()


def db_path(override: str | os.PathLike[str] | None = None) -> Path:
    """--db beats $CCM_CHAT_DB beats the data dir."""
    chosen = override or os.environ.get(DB_ENV)
    return Path(chosen).expanduser() if chosen else data_dir() / DB_FILENAME
