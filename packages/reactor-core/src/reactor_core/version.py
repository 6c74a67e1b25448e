"""The installed reactor-core's version, read from its distribution's metadata:
pyproject.toml holds the only literal."""

from importlib.metadata import version

__version__ = version("reactor-core")
