"""Compiling ``structured_output`` specs with xgrammar, once per spec (an LRU of compiled grammars)."""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from tokenmill.plugins.structured.masks import pack
from tokenmill.plugins.structured.spec import KEY, GrammarSpec, choice_grammar

INSTALL = "pip install --no-deps xgrammar apache-tvm-ffi (scripts/setup.sh does; on a GPU: pip install xgrammar)"
_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # xgrammar's "[time] file.cc:line: " error prefix
WHAT = {"json_object": "JSON object grammar", "json_schema": "JSON schema", "regex": "regex",
        "choice": "choice list", "grammar": "EBNF grammar"}


def import_xgrammar():
    try:
        import xgrammar
    except ImportError as exc:
        raise ValueError(f"{KEY} needs the xgrammar package, which is not installed ({exc}); {INSTALL}") from None
    return xgrammar


def library_message(exc: BaseException) -> str:
    """xgrammar's error text without its time stamp and C++ source location."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return _LOCATION.sub("", lines[0] if lines else type(exc).__name__)


class GrammarCache:
    """xgrammar's tokenizer info and compiler for one pipeline's tokenizer (built at the first constrained
    request: ~1 s for a 49k vocabulary, once per process and tokenizer), and the last ``size`` compiled grammars, keyed by
    :attr:`GrammarSpec.key`.

    JSON is compiled compact (``any_whitespace=False``: ``", "`` and ``": "`` separators, no free whitespace), so
    a bounded schema bounds the output; ``strict_mode`` keeps objects to the properties the schema names.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], size: int) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids, self.size = tokenizer, vocab_size, stop_token_ids, size
        self.xgr: Any = None
        self.info: Any = None  # xgrammar's TokenizerInfo (its decoded_vocab: each token's bytes)
        self.compiler: Any = None
        self.grammars: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.hits = self.misses = 0
        self.json_safe: torch.Tensor | None = None  # bitmask row: tokens without raw control characters

    def _compiler(self):
        if self.compiler is None:
            xgr = import_xgrammar()
            info, self.json_safe = tokenizer_info(xgr, self.tokenizer, self.vocab_size, self.stop_token_ids)
            self.xgr, self.info = xgr, info
            self.compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        return self.compiler

    def get(self, spec: GrammarSpec):
        """The compiled grammar for ``spec`` (compiled now if it is not cached); ValueError if it does not compile."""
        found = self.grammars.get(spec.key)
        if found is not None:
            self.grammars.move_to_end(spec.key)
            self.hits += 1
            return found
        compiled = self._compile(spec)
        self.misses += 1
        self.grammars[spec.key] = compiled
        if len(self.grammars) > self.size:
            self.grammars.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        compiler = self._compiler()
        try:
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(spec.key[1], any_whitespace=False, strict_mode=True)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.body)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.body))
            return compiler.compile_grammar(spec.body)
        except Exception as exc:  # xgrammar reports a bad spec as RuntimeError (its C++ checks) or ValueError
            raise ValueError(f"{KEY}: invalid {WHAT[spec.kind]}: {library_message(exc)}") from None

    def matcher(self, compiled):
        """A fresh matcher over ``compiled`` that ends on the pipeline's EOS tokens."""
        return self.xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids)


_INFOS: OrderedDict[tuple, tuple[Any, torch.Tensor]] = OrderedDict()  # a few tokenizers' infos, per process


def tokenizer_info(xgr, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> tuple[Any, torch.Tensor]:
    """xgrammar's ``TokenizerInfo`` for ``tokenizer`` and its :func:`json_safe_tokens` row (~1 s for 49k tokens),
    shared by the pipelines of one process that load the same tokenizer files."""
    name = getattr(tokenizer, "name_or_path", "")
    key = (type(tokenizer).__name__, name, len(tokenizer), vocab_size, tuple(stop_token_ids))
    if name and key in _INFOS:
        _INFOS.move_to_end(key)
        return _INFOS[key]
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    found = info, json_safe_tokens(info.decoded_vocab, vocab_size, stop_token_ids)
    if name:
        _INFOS[key] = found
        if len(_INFOS) > 4:
            _INFOS.popitem(last=False)
    return found


def json_safe_tokens(decoded_vocab: list[bytes], vocab_size: int, stop_token_ids: list[int]) -> torch.Tensor:
    """The bitmask row of the tokens that may appear in compact JSON: none with a raw control character
    (bytes 0x00-0x1f: JSON escapes them, and compact JSON has no newline or tab between values), plus the stop
    tokens. xgrammar's strings with a ``maxLength`` (0.2.9) would otherwise take them raw: invalid JSON."""
    vocab = [bytes(t) for t in decoded_vocab[:vocab_size]]
    ends = np.cumsum(np.fromiter(map(len, vocab), dtype=np.int64, count=len(vocab)))
    control = np.concatenate([[0], np.cumsum(np.frombuffer(b"".join(vocab), dtype=np.uint8) < 0x20)])
    ok = torch.zeros(-(-vocab_size // 32) * 32, dtype=torch.bool)
    ok[:len(vocab)] = torch.from_numpy(control[ends] == control[np.concatenate([[0], ends[:-1]])])
    ok[list(stop_token_ids)] = True
    return pack(ok)
