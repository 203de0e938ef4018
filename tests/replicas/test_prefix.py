"""Prefix keys and the in-process ASGI forwarding: the parts of the replicas that need no Ray."""
import asyncio
import json

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from tokenmill.replicas.forward import ForwardedRequest, ResponseStart, run_asgi
from tokenmill.replicas.prefix import CHUNK, prefix_keys


def body(**kw) -> bytes:
    return json.dumps(kw).encode()


def test_shared_prefixes_share_keys_and_pipelines_do_not():
    system = "You are a careful assistant. " * 10
    a = prefix_keys(body(model="m", messages=[{"role": "system", "content": system}, {"role": "user", "content": "a"}]))
    b = prefix_keys(body(model="m", messages=[{"role": "system", "content": system}, {"role": "user", "content": "b"}]))
    other = prefix_keys(body(model="n", messages=[{"role": "system", "content": system}, {"role": "user", "content": "a"}]))
    shared = len(system) // CHUNK
    assert a.keys[:shared] == b.keys[:shared] and a.keys[-1] != b.keys[-1]
    assert not set(a.keys) & set(other.keys)
    p = prefix_keys(body(prompt="x" * 200, max_tokens=3))
    assert len(p.keys) == 4 and p.chars == 200 + 1  # the (empty) pipeline name and its separator count
    assert prefix_keys(body(prompt=["x" * 200])).keys == p.keys  # a one-prompt completions list
    assert prefix_keys(b"not json").keys == () and prefix_keys(body(max_tokens=3)).keys == ()


def test_forwarded_requests_stream_and_disconnect():
    app = FastAPI()
    seen = {}

    @app.post("/echo")
    async def echo(payload: dict):
        return {"got": payload, "n": len(payload)}

    @app.get("/stream")
    async def stream():
        async def gen():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0)
            finally:
                seen["closed"] = True
        return StreamingResponse(gen(), media_type="text/event-stream")

    async def main():
        req = ForwardedRequest("POST", "/echo", b"", [(b"content-type", b"application/json")], body(a=1))
        items = [x async for x in run_asgi(app, req, extra_headers=[(b"x-extra", b"1")])]
        assert isinstance(items[0], ResponseStart) and items[0].status == 200
        assert (b"x-extra", b"1") in items[0].headers
        assert json.loads(b"".join(items[1:])) == {"got": {"a": 1}, "n": 1}
        missing = [x async for x in run_asgi(app, ForwardedRequest("GET", "/nope", b"", [], b""))]
        assert missing[0].status == 404
        gen = run_asgi(app, ForwardedRequest("GET", "/stream", b"", [], b""))
        assert (await gen.__anext__()).status == 200
        assert (await gen.__anext__()) == b"data: 0\n\n"
        await gen.aclose()  # the consumer leaves: the app's response generator is closed
        assert seen.get("closed")

    asyncio.run(main())
