"""Server lifecycle: 503 while the model loads, `python -m radixc.serve` answering until SIGTERM during load,
then exiting 0 with every stream ended, and a chat request to a model without a chat template getting 400."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import httpx

from radixc.engine.llm import LLM
from radixc.models.presets import build_preset
from radixc.serve import AsyncEngine, build_app


def test_requests_get_503_while_the_model_loads_then_are_served(serve_harness):
    release = threading.Event()

    def slow_llm() -> LLM:
        assert release.wait(30)
        return LLM(build_preset("tiny-llama"), compile=False, progress=False)

    thread = serve_harness.ServerThread(build_app(AsyncEngine(slow_llm), "m")).start(wait_ready=False)
    try:
        body = {"model": "m", "prompt": [3, 4], "max_tokens": 2}
        response = httpx.post(f"{thread.url}/v1/completions", json=body)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        assert "loading" in response.json()["error"]["message"]
        assert httpx.get(f"{thread.url}/health").json() == {"status": "loading"}
        release.set()
        serve_harness.wait_healthy(thread.url, 30)
        response = httpx.post(f"{thread.url}/v1/completions", json=body)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    finally:
        release.set()
        thread.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_until_end(url: str, body: dict, first_chunk: threading.Event, ends: list[str]) -> None:
    """Read one SSE stream to its end; record how it ended ([DONE], an error event, or a closed connection)."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                first_chunk.set()
                if line == "data: [DONE]":
                    ends.append("done")
                    return
                if line.startswith('data: {"error"'):
                    ends.append("error")
                    return
        ends.append("closed")
    except httpx.TransportError:
        ends.append("closed")
    finally:
        first_chunk.set()


def test_sigterm_during_load_finishes_or_cancels_streams_and_exits_0(checkpoint, tmp_path, serve_harness):
    plain = tmp_path / "no_chat_template"  # the checkpoint without tokenizer_config.json
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (plain / name).symlink_to(checkpoint / name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([p for p in sys.path if p])}
    command = [
        sys.executable,
        "-m",
        "radixc.serve",
        str(plain),
        "--port",
        str(port),
        "--no-compile",
        "--page-size",
        "4",
        "--shutdown-timeout",
        "1",
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        serve_harness.wait_healthy(url, 90)
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": str(plain), "messages": [{"role": "user", "content": "w5"}]},
        )
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "no_chat_template"
        body = {
            "model": str(plain),
            "prompt": "w5 w6 w7",
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        }
        ends: list[str] = []
        started = [threading.Event() for _ in range(4)]
        clients = [threading.Thread(target=stream_until_end, args=(url, body, s, ends)) for s in started]
        for client in clients:
            client.start()
        assert all(s.wait(30) for s in started)
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        for client in clients:
            client.join(30)
        assert server.returncode == 0, output
        assert len(ends) == 4 and not any(c.is_alive() for c in clients)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
