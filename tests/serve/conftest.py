"""Serve-test harness: a tiny-llama checkpoint with a word-level tokenizer and a chat template, and servers run
on a free loopback port in a thread of the test process (each with its engine process below it)."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from radixc.models.presets import preset_config, word_tokenizer

# the serve extra (pip install radixc[serve]) and the HTTP client the tests speak through: a machine without
# them (the GPU machine) does not collect these tests, and pytest's header says why (the harness below imports
# them where it uses them, so that this file imports without them, even when the directory is named on the
# command line)
MISSING = [name for name in ("uvicorn", "starlette", "httpx") if importlib.util.find_spec(name) is None]
if MISSING:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header() -> str | None:
    return (
        f"tests/serve not collected: {', '.join(MISSING)} not installed (radixc[serve])" if MISSING else None
    )


# the template writes every role as a word of the vocabulary: "w2 <system text> w3 <user text> ... w5"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w2', 'user': 'w3', 'assistant': 'w4'}[m['role']] }} "
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny Llama saved by transformers, with tokenizer.json and a chat template in
    tokenizer_config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama_chat")
    config = preset_config("tiny-llama")
    hf = LlamaForCausalLM._from_config(LlamaConfig(**config), attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    hf.save_pretrained(path)
    word_tokenizer(config["vocab_size"]).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "w1"})
    )
    return path


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) from a thread; `stop()` shuts it down gracefully."""

    def __init__(self, app, timeout_graceful_shutdown: float = 5.0):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        import uvicorn

        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=timeout_graceful_shutdown)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        if wait_ready:
            wait_healthy(self.url, deadline - time.monotonic())
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server thread did not stop"
        self.socket.close()


def wait_healthy(url: str, timeout: float) -> None:
    """Poll /health until 200 (bounded in time; a failed engine fails at once)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            if health.status_code == 200:
                return
            assert health.json()["status"] != "failed", health.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} not healthy after {timeout:.0f} s"
        time.sleep(0.05)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name: value}."""
    import httpx

    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {
        name: float(value) for name, value in (line.split() for line in lines if not line.startswith("#"))
    }


@pytest.fixture(scope="package")
def serve_harness() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        ServerThread=ServerThread,
        metrics=metrics,
        wait_healthy=wait_healthy,
        words=words,
        CHAT_TEMPLATE=CHAT_TEMPLATE,
    )
