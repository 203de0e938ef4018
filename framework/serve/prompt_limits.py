"""Refusing a prompt that cannot fit the model's context before tokenizing it.

Tokenizing is linear in the text but not cheap (a few MB of text take seconds), so a prompt whose character
count alone proves that it has more tokens than the context allows is refused at once. The proof: when every
character of the text ends up in some token (nothing is stripped, merged by Unicode composition or folded into
one unknown token), a token covers at most as many characters as its own text has, so a text of ``c``
characters has at least ``ceil(c / L)`` tokens, ``L`` being the longest token text of the vocabulary.
:func:`max_token_chars` returns ``L`` for tokenizers where that holds (byte-level BPE as in GPT-2, Llama 3,
Qwen, SmolLM; SentencePiece-style BPE with byte fallback as in Llama 2, Mistral, Gemma) and ``None`` otherwise
(then only the tokenized length is checked).
"""
from __future__ import annotations

import json
import math
from typing import Any

# normalizers that never turn several characters into fewer (Replace is checked separately)
_SAFE_NORMALIZERS = {"Sequence", "Prepend", "Lowercase", "NFD", "NFKD", "Replace"}
# pre-tokenizers that keep every character (Split is checked separately)
_SAFE_PRE_TOKENIZERS = {"Sequence", "ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"}


def _types_ok(node: Any, allowed: set[str]) -> bool:
    if node is None:
        return True
    if isinstance(node, list):
        return all(_types_ok(n, allowed) for n in node)
    kind = node.get("type")
    if kind not in allowed:
        return False
    if kind == "Replace":  # one character for at least one character
        pattern = node.get("pattern") or {}
        if "String" not in pattern or len(pattern["String"]) != 1 or not node.get("content"):
            return False
    if kind == "Split" and node.get("behavior") == "Removed":
        return False
    children = [node[k] for k in ("normalizers", "pretokenizers") if k in node]
    return all(_types_ok(c, allowed) for c in children)


def max_token_chars(tokenizer: Any) -> int | None:
    """The longest token text of ``tokenizer``'s vocabulary, added tokens included, when a text of ``c``
    characters provably has at least ``ceil(c / that)`` tokens; ``None`` when that cannot be shown."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no structure to inspect
        return None
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, AttributeError):
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("unk_token") is not None and not model.get("byte_fallback")):
        return None  # unknown characters could collapse into one token
    if not _types_ok(spec.get("normalizer"), _SAFE_NORMALIZERS) or \
            not _types_ok(spec.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS):
        return None
    texts = list(tokenizer.get_vocab())
    return max((len(t) for t in texts), default=0) or None


def prompt_chars(prompt: Any) -> int:
    """Characters of a text prompt, or of the text contents of chat messages (0 for token ids)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        total = 0
        for message in prompt:
            content = message.get("content")
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(part["text"]) for part in content
                             if isinstance(part, dict) and isinstance(part.get("text"), str))
        return total
    return 0


def min_tokens(prompt: Any, max_chars_per_token: int | None) -> tuple[int, int]:
    """``(characters or ids, the fewest tokens the prompt can have)``: exact for token ids, ``ceil(chars / L)``
    for text when ``L`` is known, else 0."""
    if isinstance(prompt, list) and not (prompt and isinstance(prompt[0], dict)):
        return len(prompt), len(prompt)
    chars = prompt_chars(prompt)
    return chars, (math.ceil(chars / max_chars_per_token) if max_chars_per_token else 0)
