"""The ``tokenmill`` command: run, validate, plugins."""
from __future__ import annotations

import argparse
import sys
import time

from tokenmill.errors import ModelLoadError, PipelineError, RequestError


def _cmd_run(args: argparse.Namespace) -> int:
    from tokenmill import Pipeline, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=args.stop or [])
    pipe = Pipeline.from_yaml(args.pipeline, progress=not args.quiet)
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
    from tokenmill.host import DEFAULT_PLUGINS, discover_plugins, hooks_implemented

    rows = []
    for name, entry in sorted(discover_plugins().items()):
        try:
            hooks = ", ".join(hooks_implemented(entry.load()))
        except Exception as exc:  # a broken third-party plugin is listed, not fatal
            hooks = f"<failed to load: {type(exc).__name__}: {exc}>"
        mark = " (default)" if name in DEFAULT_PLUGINS else ""
        rows.append((name + mark, entry.distribution, hooks))
    widths = [max(len(r[i]) for r in rows + [("PLUGIN", "DISTRIBUTION", "HOOKS")]) for i in range(2)]
    for r in [("PLUGIN", "DISTRIBUTION", "HOOKS")] + rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    return 0


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
    val = sub.add_parser("validate", help="check pipeline files without loading the model")
    val.add_argument("pipelines", nargs="+")
    val.set_defaults(func=_cmd_validate)
    plug = sub.add_parser("plugins", help="list discovered plugins and the hooks they implement")
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
