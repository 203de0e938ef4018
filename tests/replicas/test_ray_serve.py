"""A two-replica Ray Serve app on loopback (``tokenmill serve --replicas 2``), driven with the ``openai`` client:
prefix-aware routing, and a replica killed mid-stream."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.helpers import wait_until

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

SYSTEM = "You answer in one short sentence and never use lists. " * 6


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    yaml = tmp / "tiny.yaml"
    yaml.write_text(f"name: tiny\nmodel: {tiny_llama_dir}\ndtype: float32\nthreads: 1\n"
                    "limits: {max_model_len: 512, max_num_seqs: 8, max_num_batched_tokens: 512}\n"
                    "plugins:\n  - continuous_batching: {}\n"
                    "  - paged_kv: {block_size: 8, num_blocks: 256, prefix_caching: true}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", str(yaml), "--replicas", "2",
                             "--replica-cpus", "0.5", "--port", str(port), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, TOKENMILL_API_KEY="", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0"),
                            cwd=Path(__file__).resolve().parents[2])

    def started():
        assert proc.poll() is None, Path(log.name).read_text()
        return "serving on" in Path(log.name).read_text()

    try:
        wait_until(started, timeout=240, interval=0.5, what="two Ray Serve replicas")
        yield proc, f"http://127.0.0.1:{port}", Path(log.name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=90) == 0, Path(log.name).read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def two_at_once(base: str, tag) -> set[int]:
    """The replica pids serving a held-open stream and a request sent while it runs."""
    with httpx.Client(base_url=base, timeout=120) as h, h.stream("POST", "/v1/completions", json={
            "model": "tiny", "prompt": f"{tag} unrelated prompt {tag} " * 3, "max_tokens": 40, "stream": True}) as s:
        other = h.post("/v1/completions", json={"model": "tiny", "prompt": f"other {tag} " * 9, "max_tokens": 2})
        assert s.status_code == 200 and other.status_code == 200, other.text
        s.read()
        return {int(s.headers["x-tokenmill-replica-pid"]), int(other.headers["x-tokenmill-replica-pid"])}


def chat(client, user: str, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        max_tokens=kw.pop("max_tokens", 8), temperature=0, **kw)
    return raw.headers["x-tokenmill-replica"], raw.headers["x-tokenmill-replica-pid"], raw.parse()


def test_openai_client_prefix_routing_and_a_killed_replica(replicas):
    proc, base, log = replicas
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    first, pid, out = chat(client, "Name a colour.")
    assert out.choices[0].message.content and out.usage.completion_tokens == 8
    # the same long system prompt: every follow-up goes where that prefix is cached
    assert {chat(client, f"Name a colour. Then a number: {i}.")[0] for i in range(4)} == {first}
    # distinct texts go to the least loaded replica: with a stream in flight, the other one serves
    assert len(set().union(*(two_at_once(base, i) for i in range(4)))) == 2

    # kill the replica serving a stream: that stream ends with an error event, later requests succeed
    stream = client.chat.completions.create(model="tiny", stream=True, max_tokens=400, temperature=0,
                                            messages=[{"role": "user", "content": "Tell me a long story."}],
                                            extra_body={"ignore_eos": True})
    raw = stream.response
    victim = int(raw.headers["x-tokenmill-replica-pid"])
    next(iter(stream))
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="replica serving this stream failed"):
        for _ in stream:
            pass
    later = [chat(client, f"After the failure {i}.") for i in range(6)]
    assert all(o.usage.completion_tokens == 8 for _, _, o in later)
    assert all(int(p) != victim for _, p, _ in later)
    # Ray Serve replaces the dead replica: once it is up, it takes the load the survivor cannot
    survivor = int(later[0][1])
    wait_until(lambda: two_at_once(base, time.time()) - {victim, survivor}, timeout=120, interval=0.2,
               what="Ray Serve to replace the killed replica")
