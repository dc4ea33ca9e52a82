"""Server lifecycle: 503 (requests and /metrics) while the model loads; an engine process that dies fails
every stream with its reason and stops the server; `python -m radixc.serve` answering until SIGTERM (to its
whole process group) during load, then exiting 0 with every stream ended and no process left behind; a chat
request to a model without a chat template getting 400."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from radixc.engine.llm import LLM
from radixc.models.presets import preset_config, word_tokenizer
from radixc.serve import AsyncEngine, build_app


def llm_once_released(release: Path) -> LLM:
    """tiny-llama, built once `release` exists (in the engine process: a file is what both processes see)."""
    deadline = time.monotonic() + 60
    while not release.exists():
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.01)
    return LLM("tiny-llama", compile=False, page_size=4, max_batch_size=8, progress=False)


def slow_llm(step_seconds: float) -> LLM:
    """tiny-llama with a word tokenizer (so a stream sends a chunk per step), whose every step takes
    `step_seconds` more: its requests are still running when a test acts."""
    tokenizer = word_tokenizer(preset_config("tiny-llama")["vocab_size"])
    llm = LLM("tiny-llama", compile=False, page_size=4, max_batch_size=8, progress=False, tokenizer=tokenizer)
    step = llm.step

    def slow_step():
        time.sleep(step_seconds)
        return step()

    llm.step = slow_step
    return llm


def test_requests_get_503_while_the_model_loads_then_are_served(serve_harness, tmp_path):
    release = tmp_path / "release"
    engine = AsyncEngine(functools.partial(llm_once_released, release))
    thread = serve_harness.ServerThread(build_app(engine, "m")).start(wait_ready=False)
    try:
        body = {"model": "m", "prompt": [3, 4], "max_tokens": 2}
        response = httpx.post(f"{thread.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert "loading" in response.json()["error"]["message"]
        health = httpx.get(f"{thread.url}/health", timeout=30)
        assert health.json() == {"status": "loading"}, health.text
        metrics = httpx.get(f"{thread.url}/metrics", timeout=30)  # the engine process cannot answer yet
        assert metrics.status_code == 503, metrics.text
        release.touch()
        serve_harness.wait_healthy(thread.url, 60)
        response = httpx.post(f"{thread.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
    finally:
        release.touch()
        thread.stop()
    assert_gone([engine.pid])


def test_a_dead_engine_process_fails_every_stream_and_stops_the_server(serve_harness):
    failures: list[str] = []

    def stop_server(message: str) -> None:  # what `radixc serve` does, which then exits 1
        failures.append(message)
        thread.server.should_exit = True

    engine = AsyncEngine(functools.partial(slow_llm, 0.02), on_failure=stop_server)
    thread = serve_harness.ServerThread(build_app(engine, "m")).start()
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 400, "stream": True, "ignore_eos": True}
    try:
        ends: list[str] = []
        errors: list[str] = []
        started = [threading.Event() for _ in range(3)]
        clients = [
            threading.Thread(target=stream_until_end, args=(thread.url, body, s, ends, errors))
            for s in started
        ]
        for client in clients:
            client.start()
        assert all(s.wait(30) for s in started)
        os.kill(engine.pid, signal.SIGKILL)
        for client in clients:
            client.join(30)
        assert ends == ["error"] * 3
        assert all("the engine process exited unexpectedly (exit code -9)" in e for e in errors), errors
        assert failures == ["the engine process exited unexpectedly (exit code -9)"]
        thread.thread.join(30)
        assert not thread.thread.is_alive(), "the server did not stop"
    finally:
        thread.stop()


def assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Every process of `pids` ends within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while alive := [pid for pid in pids if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, f"processes {alive} still run"
        time.sleep(0.02)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            todo += map(int, children)
            found += map(int, children)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_until_end(
    url: str, body: dict, first_chunk: threading.Event, ends: list[str], errors: list[str] | None = None
) -> None:
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
                    if errors is not None:
                        errors.append(line)
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
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
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
        below = descendants(server.pid)
        assert below, "no engine process below the server"
        os.killpg(
            server.pid, signal.SIGTERM
        )  # to the whole group, as systemd does: the engine waits its turn
        output, _ = server.communicate(timeout=30)
        for client in clients:
            client.join(30)
        assert server.returncode == 0, output
        assert len(ends) == 4 and not any(c.is_alive() for c in clients)
        assert_gone(below)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
