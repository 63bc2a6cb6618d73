"""The Textual user interface. It talks to app.ChatService only: no model or SQL code here."""
