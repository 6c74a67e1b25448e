"""JARVIS's tools: plain Python functions the model may call (see `registry` and `builtin`)."""
