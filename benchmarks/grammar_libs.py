"""Grammar libraries for structured output, measured on this CPU with the default model's tokenizer.

    python benchmarks/grammar_libs.py [--repeats 5] [--threads 2] [--libs xgrammar,llguidance]

For each library (``pip install xgrammar llguidance``; xgrammar's triton dependency is not needed on the CPU):

* ``setup``: build the tokenizer info (and the compiler) from the SmolLM2 tokenizer (49152 tokens).
* ``compile``: from a spec to a grammar ready to match (JSON compact, ``", "`` / ``": "`` separators and no free
  whitespace, as the ``structured_output`` plugin compiles it), for the JSON schemas of
  ``benchmarks/data/json_schemas.json``, ``json_object`` (any JSON), a regex, a choice list and an EBNF
  grammar: *cold* (first time) and *cached* (the same spec again). For xgrammar that is
  ``GrammarCompiler.compile_*`` (its own cache answers the second call) plus a ``GrammarMatcher``; for
  llguidance the grammar text plus an ``LLMatcher`` (the matcher builds its parser; nothing is cached but the
  tokenizer, so the second call costs the same).
* ``per token``: fill the vocabulary bitmask, check the next token is allowed, accept it; averaged over the
  tokens of a ~200-token JSON document (the ``order`` schema and ``json_object``), then EOS must be allowed.

Medians over ``--repeats`` runs (cold compiles run on a fresh compiler each time). Writes
results/grammar_libs.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SCHEMAS = json.loads((HERE / "data" / "json_schemas.json").read_text())
REGEX = r"[A-Z][a-z]{2,9} [0-9]{1,3}(\.[0-9]{2})? (EUR|USD)"
CHOICES = ["positive", "negative", "neutral", "mixed"]
EBNF = r'''root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+ ("." [0-9]+)?
'''


def order_document() -> dict:
    items = [{"sku": f"SKU-{i:04d}", "qty": i + 1, "price": 9.5 * (i + 1)} for i in range(6)]
    return {"id": 4242, "customer": {"name": "Ada Lovelace", "tier": "pro"}, "items": items,
            "notes": "leave at the door, ring twice"}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr, self.threads = xgr, threads
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = self.new_compiler()

    def new_compiler(self):
        return self.xgr.GrammarCompiler(self.info, max_threads=self.threads)

    def compile(self, kind: str, spec, compiler=None):
        c = compiler or self.compiler
        if kind == "json_schema":  # as the structured_output plugin compiles JSON: compact, strict
            g = c.compile_json_schema(json.dumps(spec), any_whitespace=False, strict_mode=True)
        elif kind == "json_object":
            g = c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        elif kind == "regex":
            g = c.compile_regex(spec)
        elif kind == "choice":
            g = c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in spec))
        else:
            g = c.compile_grammar(spec)
        return self.xgr.GrammarMatcher(g)

    def fill(self, m, bitmask) -> None:
        m.fill_next_token_bitmask(bitmask, 0)

    def accept(self, m, tok: int) -> bool:
        return m.accept_token(tok)


COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, threads: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def new_compiler(self):
        return None

    def compile(self, kind: str, spec, compiler=None):
        llg = self.llg
        if kind in ("json_schema", "json_object"):
            text = llg.LLMatcher.grammar_from_json_schema(spec if kind == "json_schema" else {"type": "object"},
                                                          overrides=COMPACT)
        elif kind == "regex":
            text = llg.LLMatcher.grammar_from_regex(spec)
        elif kind == "choice":
            text = llg.grammar_from("choice", json.dumps(spec))
        else:
            text = llg.grammar_from("gbnf", spec)
        m = llg.LLMatcher(self.tok, text, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, m, bitmask) -> None:
        m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.shape[1] * 4)

    def accept(self, m, tok: int) -> bool:
        return m.consume_token(tok)


def specs() -> list[tuple[str, str, object]]:
    out = [(f"json_schema:{k}", "json_schema", v) for k, v in SCHEMAS.items()]
    return out + [("json_object", "json_object", None), ("regex", "regex", REGEX), ("choice", "choice", CHOICES),
                  ("ebnf", "grammar", EBNF)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_token(lib, kind: str, spec, ids: list[int], eos: int, vocab: int) -> dict:
    m = lib.compile(kind, spec)
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    fill = accept = 0.0
    for tok in ids:
        t0 = time.perf_counter()
        lib.fill(m, bitmask)
        t1 = time.perf_counter()
        assert (int(bitmask[0, tok // 32]) >> (tok % 32)) & 1, f"{lib.name} masked a token of the valid document"
        assert lib.accept(m, tok), f"{lib.name} refused a token of the valid document"
        accept += time.perf_counter() - t1
        fill += t1 - t0
    lib.fill(m, bitmask)
    assert (int(bitmask[0, eos // 32]) >> (eos % 32)) & 1, f"{lib.name}: EOS not allowed after the document"
    n = len(ids)
    return {"tokens": n, "fill_us": 1e6 * fill / n, "accept_us": 1e6 * accept / n,
            "total_us": 1e6 * (fill + accept) / n}


def measure(cls, tokenizer, vocab: int, args) -> dict:
    setup = [timed(lambda: cls(tokenizer, vocab, args.threads)) for _ in range(args.repeats)]
    lib = cls(tokenizer, vocab, args.threads)
    res = {"setup_s": statistics.median(setup), "compile": {}, "per_token": {}}
    for label, kind, spec in specs():
        cold, cached = [], []
        for _ in range(args.repeats):
            compiler = lib.new_compiler()
            cold.append(timed(lambda: lib.compile(kind, spec, compiler)))
            cached.append(timed(lambda: lib.compile(kind, spec, compiler)))
        res["compile"][label] = {"cold_ms": 1e3 * statistics.median(cold), "cached_ms": 1e3 * statistics.median(cached)}
    doc = json.dumps(order_document())
    ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
    for label, kind, spec in (("json_schema:order", "json_schema", SCHEMAS["order"]), ("json_object", "json_object", None)):
        runs = [per_token(lib, kind, spec, ids, tokenizer.eos_token_id, vocab) for _ in range(args.repeats)]
        res["per_token"][label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads and xgrammar compiler threads")
    ap.add_argument("--libs", default="xgrammar,llguidance")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoConfig, AutoTokenizer

    from common import write
    from tokenmill.model.resolve import resolve_model

    path, _ = resolve_model(args.model, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = AutoConfig.from_pretrained(path).vocab_size
    libs = {"xgrammar": XGrammar, "llguidance": LLGuidance}
    results = {}
    for name in args.libs.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        results[name] = measure(libs[name], tokenizer, vocab, args)
    versions = {}
    for name in results:
        from importlib.metadata import version
        versions[name] = version(name)
    out = write("grammar_libs", {"model": args.model, "vocab": vocab, "repeats": args.repeats, "versions": versions,
                                 "regex": REGEX, "choices": CHOICES, "ebnf": EBNF, "results": results})
    names = list(results)
    print("\n| measure | " + " | ".join(f"{n} {versions[n]}" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    print("| setup (tokenizer info + compiler) | " + " | ".join(f"{results[n]['setup_s'] * 1e3:.0f} ms" for n in names) + " |")
    for label, *_ in specs():
        cells = [f"{results[n]['compile'][label]['cold_ms']:.1f} / {results[n]['compile'][label]['cached_ms']:.2f} ms"
                 for n in names]
        print(f"| compile {label} (cold / cached) | " + " | ".join(cells) + " |")
    for label in results[names[0]]["per_token"]:
        cells = [f"{r['total_us']:.0f} us (fill {r['fill_us']:.0f} + accept {r['accept_us']:.0f})"
                 for r in (results[n]["per_token"][label] for n in names)]
        print(f"| per token, {label} ({results[names[0]]['per_token'][label]['tokens']} tokens) | "
              + " | ".join(cells) + " |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
