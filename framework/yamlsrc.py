"""YAML parsing that remembers the line of every key, so errors can point at it."""
from __future__ import annotations

from typing import Any

import yaml

from tokenmill.errors import PipelineError

Path = tuple  # a path of keys / list indexes into the document


def load_with_lines(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse ``text`` safely; return the data and a map from key path to 1-based line number.

    :raises PipelineError: on a YAML syntax error, with the line and column.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        col = f" (column {mark.column + 1})" if mark is not None else ""
        ctx_mark = getattr(exc, "context_mark", None)
        ctx = getattr(exc, "context", None)
        started = f" ({ctx} at line {ctx_mark.line + 1})" if ctx and ctx_mark is not None else ""
        raise PipelineError(f"YAML syntax error{col}: {problem}{started}", source=source, line=line) from None
    lines: dict[Path, int] = {}
    constructor = yaml.SafeLoader("")

    def convert(node: yaml.Node, path: Path) -> Any:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                if key in out:
                    raise PipelineError(f"duplicate key '{key}'", source=source, line=key_node.start_mark.line + 1)
                out[key] = convert(value_node, path + (key,))
                lines[path + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [convert(item, path + (i,)) for i, item in enumerate(node.value)]
        return constructor.construct_object(node, deep=True)

    return (convert(root, ()) if root is not None else None), lines
