"""Shared building blocks of the segflow stages (no I/O side effects on import)."""
