"""Cross-cutting runtime helpers: device choice, distributed setup, progress display."""
