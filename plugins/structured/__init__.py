"""Structured output: requests constrained by a JSON schema, any JSON object, a regex, a choice list or an EBNF
grammar (``plugin_args["structured_output"]``), compiled and matched with xgrammar."""
from tokenmill.plugins.structured.plugin import StructuredOutput

__all__ = ["StructuredOutput"]
