"""The ``tokenmill`` command: run, serve, validate, plugins, ... and the commands packages add (``tokenmill.commands``)."""
from __future__ import annotations

import argparse
import sys
import time

from tokenmill.errors import ModelLoadError, PipelineError, RequestError


def _cmd_run(args: argparse.Namespace) -> int:
    from tokenmill import Pipeline, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=args.stop or [])
    with Pipeline.from_yaml(args.pipeline, progress=not args.quiet) as pipe:  # closing stops any worker ranks
        t0 = time.perf_counter()
        out = None
        for chunk in pipe.stream(args.prompt, params, chat=args.chat):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            out = chunk.output or out
        sys.stdout.write("\n")
        wall = time.perf_counter() - t0
    assert out is not None
    n = out.num_output_tokens
    rate = out.decode_tokens_per_s
    ttft = f"{out.ttft_s * 1000:.0f} ms" if out.ttft_s is not None else "-"
    print(f"[tokenmill] {n} tokens | TTFT {ttft} | decode {rate:.1f} tok/s | total {wall:.2f} s | "
          f"finish: {out.finish_reason}" if rate else
          f"[tokenmill] {n} tokens | TTFT {ttft} | total {wall:.2f} s | finish: {out.finish_reason}",
          file=sys.stderr)
    if out.error:
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from tokenmill.serve.cli import run_serve, serve_config

    api_key = args.api_key if args.api_key is not None else os.environ.get("TOKENMILL_API_KEY")
    try:
        config = serve_config(api_key=api_key or None, max_queued_requests=args.max_queued_requests,
                              request_timeout=args.request_timeout, drain_timeout=args.drain_timeout,
                              max_body_bytes=args.max_body_bytes)
        if args.replicas is not None:
            from tokenmill.replicas.launch import run_replicas

            return run_replicas(args.pipelines, replicas=args.replicas, host=args.host, port=args.port,
                                address=args.ray_address, replica_cpus=args.replica_cpus, config=config,
                                log_level=args.log_level)
        return run_serve(args.pipelines, host=args.host, port=args.port, config=config, log_level=args.log_level,
                         progress=not args.quiet)
    except OSError as exc:  # the address is taken or not ours
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _cmd_validate(args: argparse.Namespace) -> int:
    from tokenmill.spec import load_spec

    status = 0
    for path in args.pipelines:
        try:
            spec = load_spec(path)
        except PipelineError as exc:
            print(f"INVALID {exc}", file=sys.stderr)
            status = 2
            continue
        plugins = ", ".join(p.name for p in spec.plugins) or "defaults only"
        print(f"OK {path}: '{spec.name}' model={spec.model} dtype={spec.dtype} device={spec.device} "
              f"plugins=[{plugins}] compile={'on' if spec.compile.enabled else 'off'}")
    return status


def _cmd_plugins(args: argparse.Namespace) -> int:
    from tokenmill.host import DEFAULT_PLUGINS, discover_plugins, hooks_implemented, hooks_wrapped

    rows = []
    for name, entry in sorted(discover_plugins().items()):
        try:
            obj = entry.load()
            hooks = ", ".join(sorted(hooks_implemented(obj) + [f"{h} (wrapper)" for h in hooks_wrapped(obj)]))
        except Exception as exc:  # a broken third-party plugin is listed, not fatal
            hooks = f"<failed to load: {type(exc).__name__}: {exc}>"
        mark = " (default)" if name in DEFAULT_PLUGINS else ""
        rows.append((name + mark, entry.distribution, hooks))
    widths = [max(len(r[i]) for r in rows + [("PLUGIN", "DISTRIBUTION", "HOOKS")]) for i in range(2)]
    for r in [("PLUGIN", "DISTRIBUTION", "HOOKS")] + rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from tokenmill import Pipeline
    from tokenmill.plugins.quant.checkpoint import save_quantized

    pipe = Pipeline.from_yaml(args.pipeline, progress=not args.quiet)
    manifest, yaml_path = save_quantized(pipe, args.out, source_yaml=args.pipeline)
    info = pipe.info()
    print(f"wrote {manifest.parent}: {len(pipe.quantized_layers)} quantized layers, "
          f"{info['weight_bytes'] / 2**20:.1f} MiB of weights as loaded; load it with {yaml_path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    import time

    from tokenmill import Pipeline
    from tokenmill.evaluate import (DEFAULT_TOKENS, HELDOUT_TOKENS, pipeline_perplexity, progress_line,
                                    strided_windows)

    tokens = HELDOUT_TOKENS if args.full else args.tokens or DEFAULT_TOKENS
    pipe = Pipeline.from_yaml(args.pipeline, progress=not args.quiet)
    tick = None
    if not args.quiet:
        window = min(args.window, pipe.limits.max_model_len)
        windows = len(strided_windows(tokens + 1, window, min(args.stride, window)))
        print(f"scoring {tokens} tokens in {windows} windows of {window}"
              + ("" if args.full else f" (--full: all {HELDOUT_TOKENS})"), file=sys.stderr)
        t0 = time.perf_counter()
        tick = (lambda done, total: print(f"\r{progress_line(done, total, time.perf_counter() - t0)}", end="",
                                          file=sys.stderr, flush=True))
    res = pipeline_perplexity(pipe, num_tokens=tokens, window=args.window, stride=args.stride, progress=tick)
    if tick:
        print(file=sys.stderr)
    print(f"perplexity {res['perplexity']:.4f} over {res['tokens']} tokens ({res['windows']} windows of "
          f"{res['window']}, stride {res['stride']}) on {res['text']} | {res['pipeline']} "
          f"({res['model']}, {res['quantized_layers']} quantized layers) | {res['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
    return 0


BENCHMARKS = ("latency", "throughput", "speculative", "quant", "perplexity", "serve_load")


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent / "benchmarks"
    for root in (Path.cwd() / "benchmarks", here):
        script = root / f"{args.name}.py"
        if script.is_file():
            return subprocess.call([sys.executable, str(script), *args.args])
    print(f"error: benchmarks/{args.name}.py not found; benchmarks ship with the source tree, run from its root",
          file=sys.stderr)
    return 2


COMMANDS_GROUP = "tokenmill.commands"


def _add_package_commands(sub) -> None:
    """Subcommands packages ship through the ``tokenmill.commands`` entry-point group: each entry point is a
    ``register(subparsers)`` callable adding its parsers (``set_defaults(func=...)``, returning an exit code).
    One that fails to load or register is reported and skipped; it cannot replace a built-in command."""
    import importlib.metadata as md
    import warnings

    for ep in md.entry_points(group=COMMANDS_GROUP):
        if ep.name in sub.choices:
            warnings.warn(f"{COMMANDS_GROUP} entry point {ep.name!r} ({ep.value}) is skipped: `tokenmill "
                          f"{ep.name}` is already a command", RuntimeWarning, stacklevel=2)
            continue
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken package never takes the whole CLI down
            warnings.warn(f"{COMMANDS_GROUP} entry point {ep.name!r} ({ep.value}) failed: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate from one prompt, streaming to the terminal")
    run.add_argument("pipeline")
    run.add_argument("--prompt", required=True)
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--max-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--stop", action="append", help="stop string (repeatable)")
    run.add_argument("--ignore-eos", action="store_true")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)
    srv = sub.add_parser("serve", help="serve pipelines over HTTP: native and OpenAI-compatible routes, metrics")
    srv.add_argument("pipelines", nargs="+", help="pipeline YAML files; requests pick one by its `name:`")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: "
                                                      "$TOKENMILL_API_KEY; none if unset)")
    srv.add_argument("--max-queued-requests", type=int, default=1024,
                     help="requests allowed to wait for a batch slot per pipeline; more get 503 + Retry-After")
    srv.add_argument("--request-timeout", type=float, default=600.0,
                     help="seconds before a request is aborted with 504 (0: never)")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    srv.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                     help="larger request bodies are refused with 413 (default: 16 MiB)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("--quiet", action="store_true", help="no progress bars while loading")
    srv.add_argument("--replicas", type=int, default=None,
                     help="serve N data-parallel replicas on Ray Serve (needs tokenmill[ray]); requests go to the "
                          "replica holding their prefix, else the least loaded one")
    srv.add_argument("--ray-address", default=None,
                     help="with --replicas: join this Ray cluster (e.g. 'auto' after `ray start --head`; "
                          "default: start a local one)")
    srv.add_argument("--replica-cpus", type=float, default=None,
                     help="with --replicas: CPUs Ray reserves per replica (default: the pipelines' `threads:`)")
    srv.set_defaults(func=_cmd_serve)
    val = sub.add_parser("validate", help="check pipeline files without loading the model")
    val.add_argument("pipelines", nargs="+")
    val.set_defaults(func=_cmd_validate)
    quant = sub.add_parser("quantize", help="quantize a pipeline's model once and save it (load with `load: DIR`)")
    quant.add_argument("pipeline", help="a pipeline with one quantization plugin (int8, int4 or nf4)")
    quant.add_argument("--out", required=True, help="directory for manifest.json, quantized.safetensors and a "
                                                    "pipeline.yaml that loads them")
    quant.add_argument("--quiet", action="store_true")
    quant.set_defaults(func=_cmd_quantize)
    ev = sub.add_parser("eval", help="measure model quality")
    ev_sub = ev.add_subparsers(dest="metric", required=True)
    ppl = ev_sub.add_parser("perplexity", help="perplexity on held-out English shipped with Python "
                                               "(pydoc_data.topics), through the pipeline's loaded model")
    ppl.add_argument("pipeline")
    size = ppl.add_mutually_exclusive_group()
    size.add_argument("--tokens", type=int, default=None,
                      help="scored tokens, a fixed slice from the start (default 4096: a minute or two on CPU)")
    size.add_argument("--full", action="store_true", help="score the whole held-out slice (20480 tokens)")
    ppl.add_argument("--window", type=int, default=1024, help="tokens per forward window")
    ppl.add_argument("--stride", type=int, default=512, help="tokens the window advances by")
    ppl.add_argument("--json", default=None, help="also write the result to this JSON file")
    ppl.add_argument("--quiet", action="store_true")
    ppl.set_defaults(func=_cmd_eval)
    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/ (writes JSON + PNG to results/)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    bench.set_defaults(func=_cmd_bench)
    _add_package_commands(sub)
    plug = sub.add_parser("plugins", help="list discovered plugins and the hooks they implement (wrappers marked)")
    plug.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PipelineError, ModelLoadError, RequestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
