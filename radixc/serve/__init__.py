"""An OpenAI-compatible HTTP server over one `radixc.LLM` (needs the `serve` extra: starlette, uvicorn, jinja2).

`build_app(AsyncEngine(make_llm), model_name)` is the ASGI app; `radixc serve MODEL` runs it on uvicorn.
"""

from radixc.serve.app import build_app
from radixc.serve.chat import ChatTemplate
from radixc.serve.engine import AsyncEngine, EngineState

__all__ = ["AsyncEngine", "ChatTemplate", "EngineState", "build_app"]
