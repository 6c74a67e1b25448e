"""The web page: `jarvis serve` (see `jarvis.web.server`)."""
