"""Typed errors with messages meant for people."""
from __future__ import annotations


class PipelineError(ValueError):
    """A pipeline file or dict is invalid. The message names the file, line, problem and what is allowed."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        where = ""
        if source:
            where = f"{source}:{line}: " if line else f"{source}: "
        super().__init__(where + message)
        self.source = source
        self.line = line


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to fix it."""


class RequestError(ValueError):
    """One request was invalid; it fails alone.

    ``field`` names the request field the refusal is about (``stop_token_ids``, ``plugin_args``...) and
    ``plugin`` the plugin that refused it in ``check_request``, when known, so a server can point at them.
    """

    def __init__(self, message: str, *, field: str | None = None, plugin: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.plugin = plugin
