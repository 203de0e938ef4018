"""What a plugin is: a class with an ``Options`` dataclass and ``@hookimpl`` methods.

A plugin class is instantiated once per pipeline with its validated options, so two pipelines in one
process never share plugin state. Plain modules with hookimpls work too (they take no options).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pluggy

from tokenmill.hookspecs import PROJECT

hookimpl = pluggy.HookimplMarker(PROJECT)


class Plugin:
    """Base class for plugins that take options from the pipeline YAML.

    Subclasses set ``name`` and may define a nested ``Options`` dataclass whose typed fields are the
    allowed YAML options (its ``__post_init__`` raises ``ValueError`` for bad values). Set
    ``autoload = True`` for a cross-cutting plugin that joins every pipeline without being named.
    """

    name: ClassVar[str] = ""
    autoload: ClassVar[bool] = False

    @dataclass(slots=True)
    class Options:
        pass

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def __repr__(self) -> str:
        return f"<plugin {self.name or type(self).__name__} {self.options}>"
