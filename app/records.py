"""The stored records the UI shows, re-exported so that ui/ imports only from app/."""

from ccm_chat.storage import ConversationRecord, MessageRecord, SearchHit

__all__ = ["ConversationRecord", "MessageRecord", "SearchHit"]
