"""Bridges to other libraries' APIs (``trl``)."""
