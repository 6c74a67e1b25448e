"""Environment detection and logging helpers."""
