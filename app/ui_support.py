"""The engine's constants the UI shows, re-exported so that ui/ imports only from app/."""

from ccm_chat.engine import BACKENDS, LEVELS

__all__ = ["BACKENDS", "LEVELS"]
