"""``tokenmill serve PIPELINE --replicas N``: start (or join) a Ray cluster, run the replicas app, wait for a
stop signal, then shut Serve down (each replica drains first)."""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


def run_replicas(paths: list[str], *, replicas: int, host: str, port: int, address: str | None,
                 replica_cpus: float | None, config: Any, log_level: str = "info") -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("error: --replicas needs Ray Serve: pip install 'tokenmill[ray]'") from None
    from tokenmill.replicas.deployments import build_app
    from tokenmill.serve.cli import load_specs

    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    specs = load_specs(paths)  # every file is checked before Ray starts
    names = [s.name for s in specs]
    cpus = replica_cpus if replica_cpus is not None else float(max((s.threads or 1) for s in specs))
    ray.init(address=address, include_dashboard=False, logging_level=log_level.upper(), log_to_driver=True,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("TOKENMILL_")}})
    try:
        serve.start(http_options={"host": host, "port": port})
        print(f"[tokenmill] starting {replicas} replica(s) of {', '.join(names)} on Ray Serve "
              f"({cpus:g} CPU each)", file=sys.stderr)
        serve.run(build_app([os.path.abspath(p) for p in paths], replicas=replicas, replica_cpus=cpus,
                            config=config), name="tokenmill", route_prefix="/")
        print(f"[tokenmill] serving on http://{host}:{port} ({replicas} replica(s))", file=sys.stderr)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("[tokenmill] stopping: replicas drain their requests", file=sys.stderr)
        serve.shutdown()
        return 0
    finally:
        ray.shutdown()
