"""Search of every message: full-text through the FTS5 index, the query taken literally."""

from __future__ import annotations

from ccm_chat.storage.records import SearchHit


class SearchMixin:
    """Store.search, on the store's read path (_read)."""

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Search every message; the query is taken literally, never as FTS syntax.

        Each word must appear (full-text, so "eggs" finds "egg"); a word with punctuation in
        it ("c++") must also appear as written, and punctuation alone ('"') is found as text.
        """
        words = query.split()
        if not words:
            return []
        literal = [w for w in words if not w.isalnum()]
        tokens = [w for w in words if any(ch.isalnum() for ch in w)]
        exact = " AND ".join(["instr(lower(m.content), lower(?)) > 0"] * len(literal)) or "1"
        if tokens:
            fts_query = " ".join('"' + w.replace('"', '""') + '"' for w in tokens)
            sql = f"""
                SELECT m.id, m.conversation_id, m.role, c.title,
                       snippet(messages_fts, 0, '[', ']', '…', 12) AS snippet
                FROM messages_fts
                JOIN messages m ON m.rowid = messages_fts.rowid
                JOIN conversations c ON c.id = m.conversation_id
                WHERE messages_fts MATCH ? AND {exact}
                ORDER BY c.updated DESC, m.id
                LIMIT ?
            """
            params: tuple = (fts_query, *literal, limit)
        else:  # nothing the index holds (punctuation only): scan for it as text
            sql = f"""
                SELECT m.id, m.conversation_id, m.role, c.title, m.content AS snippet
                FROM messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE {exact}
                ORDER BY c.updated DESC, m.id
                LIMIT ?
            """
            params = (*literal, limit)
        rows = self._read(sql, params)
        return [
            SearchHit(r["conversation_id"], r["title"], r["id"], r["role"],
                      r["snippet"] if tokens else _snippet(r["snippet"], literal[0]))
            for r in rows
        ]


def _snippet(text: str, found: str, width: int = 40) -> str:
    """Around the first place `found` is in `text`, marked like FTS5's snippet()."""
    at = text.lower().find(found.lower())
    start, end = max(0, at - width), min(len(text), at + len(found) + width)
    return ("…" if start else "") + text[start:at] + f"[{text[at:at + len(found)]}]" + (
        text[at + len(found):end]) + ("…" if end < len(text) else "")
