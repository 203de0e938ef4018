"""Prefix keys of a request: what the replica router matches to find the replica that holds a prefix.

The router never sees tokens (the ingress has no tokenizer), so the key is text: the pipeline name, then
the chat messages (role and content) or the prompt, cut into ``CHUNK`` characters and hashed as a chain
(key i covers chunks 0..i). Two requests that share their first k chunks share their first k keys, the
way two prompts that share a token prefix share KV blocks.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

CHUNK = 64          # characters per key
MAX_KEYS = 256      # keys per request (16 k characters): deeper prefixes add little to the choice


@dataclass(slots=True)
class PrefixKeys:
    keys: tuple[bytes, ...]
    chars: int      # characters the keys cover


def request_text(body: dict) -> str | None:
    """The text a request's KV prefix depends on, or None when the body has no prompt or messages."""
    model = str(body.get("model") or body.get("optimization") or "")
    if isinstance(body.get("messages"), list):
        parts = []
        for m in body["messages"]:
            if isinstance(m, dict):
                content = m.get("content")
                text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
                parts.append(f"{m.get('role', '')}\x1f{text}\x1e")
        return model + "\x1d" + "".join(parts)
    prompt = body.get("prompt")
    if prompt is None and isinstance(body.get("prompts"), list) and body["prompts"]:
        prompt = body["prompts"][0]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # OpenAI completions: a list of one prompt
    if isinstance(prompt, list):
        prompt = " ".join(str(t) for t in prompt)
    if isinstance(prompt, str):
        return model + "\x1d" + prompt
    return None


def prefix_keys(body: bytes) -> PrefixKeys:
    """The chained chunk hashes of a JSON request body (none for a body that is not a generation request)."""
    try:
        parsed = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
    text = request_text(parsed) if isinstance(parsed, dict) else None
    if not text:
        return PrefixKeys((), 0)
    keys, h = [], hashlib.blake2b(digest_size=16)
    for start in range(0, min(len(text), CHUNK * MAX_KEYS), CHUNK):
        h.update(text[start:start + CHUNK].encode("utf-8", "surrogatepass"))
        keys.append(h.copy().digest())
    return PrefixKeys(tuple(keys), min(len(text), CHUNK * MAX_KEYS))
