"""Token log-probabilities in the shapes clients expect: OpenAI chat (``logprobs.content[{token, logprob, bytes,
top_logprobs}]``), OpenAI completions (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) and
the native routes (``[{token_id, token, logprob, top}]``).

The values are the engine's (:class:`tokenmill.engine.outputs.TokenLogprob`): each generated token's
log-probability under the model's raw distribution (``log_softmax`` of its logits, before temperature, penalties
or structured output), and the most likely alternatives there. A token's ``token`` is its own decoded text
(special tokens included), ``bytes`` its exact bytes (a byte-level BPE token may hold part of a character).
"""
from __future__ import annotations

import json
import re
from typing import Any

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import TokenLogprob


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: byte-level BPE token characters -> bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class TokenTexts:
    """Each token's text and bytes, computed once per token id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        try:  # the decoder's own JSON (cheap; the whole tokenizer's would be megabytes)
            decoder = json.loads(tokenizer.backend_tokenizer.decoder.__getstate__())
        except (AttributeError, TypeError, ValueError):  # a slow tokenizer, or no decoder
            decoder = {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        self._bytes = _byte_decoder() if "ByteLevel" in kinds else None
        self._fallback = "ByteFallback" in kinds  # SentencePiece pieces <0xAB> are single bytes
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._special.update(getattr(tokenizer, "added_tokens_decoder", None) or {})

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            raw = text.encode("utf-8")
            if token_id not in self._special and (self._bytes is not None or self._fallback):
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                if not isinstance(piece, str):
                    pass
                elif self._bytes is not None and all(c in self._bytes for c in piece):
                    raw = bytes(self._bytes[c] for c in piece)
                elif self._fallback and _BYTE_PIECE.fullmatch(piece):
                    raw = bytes([int(piece[3:5], 16)])
            hit = self._cache[token_id] = (text, list(raw))
        return hit


def token_texts(worker) -> TokenTexts:
    """The worker's :class:`TokenTexts` (made on first use, for its pipeline's tokenizer)."""
    texts = getattr(worker, "_token_texts", None)
    if texts is None or texts.tokenizer is not worker.pipeline.tokenizer:
        texts = worker._token_texts = TokenTexts(worker.pipeline.tokenizer)
    return texts


def chat_logprobs(texts: TokenTexts, lps: list[TokenLogprob] | None) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text, raw = texts.get(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in lps or []], "refusal": None}


class CompletionLogprobs:
    """OpenAI completions ``logprobs`` of one choice, chunk by chunk: ``text_offset`` is where each token's text
    starts in the choice's text (the engine's incremental detokenization, so it matches the text returned)."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.detok = IncrementalDetokenizer(texts.tokenizer)
        self.offset = 0

    def add(self, lps: list[TokenLogprob] | None) -> dict:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps or []:
            out["tokens"].append(self.texts.get(lp.token_id)[0])
            out["token_logprobs"].append(lp.logprob)
            top = {self.texts.get(t)[0]: v for t, v in lp.top}
            top.setdefault(self.texts.get(lp.token_id)[0], lp.logprob)  # OpenAI: the sampled token is always there
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(self.detok.add(lp.token_id))
        return out


def native_logprobs(texts: TokenTexts, lps: list[TokenLogprob] | None) -> list[dict]:
    return [{"token_id": lp.token_id, "token": texts.get(lp.token_id)[0], "logprob": lp.logprob,
             "top": [{"token_id": t, "token": texts.get(t)[0], "logprob": v} for t, v in lp.top]} for lp in lps or []]


def final_logprobs(final) -> list[TokenLogprob] | None:
    """The logprobs of a Final's last tokens (those not sent in a Delta), or None when not asked."""
    lps = final.output.logprobs
    if lps is None:
        return None
    return lps[len(lps) - final.num_tokens:] if final.num_tokens else []
