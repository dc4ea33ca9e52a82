"""An OpenAI-compatible HTTP server over one `radixc.LLM` (needs the `serve` extra: starlette, uvicorn, jinja2).

`build_app(AsyncEngine(make_llm), model_name)` is the ASGI app; `radixc serve MODEL` runs it on uvicorn. The LLM
runs in an engine process of its own (`engine_process`), so the model step overlaps the HTTP event loop; this
process keeps HTTP, chat templates, tokenizing and streaming (`app`), and talks to it through `AsyncEngine`.
"""

from radixc.serve.app import build_app
from radixc.serve.chat import ChatTemplate
from radixc.serve.engine import AsyncEngine, EngineState

__all__ = ["AsyncEngine", "ChatTemplate", "EngineState", "build_app"]
