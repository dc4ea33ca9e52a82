"""The OpenAI request bodies the server accepts (pydantic models with strict types) and its error answers.

Fields are checked for type and range here; fields of the API that radixc does not implement are refused
when set to anything but their neutral value, never silently ignored. Extensions shared with vLLM: top_k,
stop_token_ids, ignore_eos (the `openai` client sends them through `extra_body`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

NonNegativeInt = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]


def _one_prompt_form(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One error naming the accepted forms instead of one per union member."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "prompt_form",
            "must be a string, a list of strings, a list of token ids (ints >= 0) or a list of such lists, "
            "none of them empty",
        ) from None


Prompts = Annotated[
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)],
    WrapValidator(_one_prompt_form),
]


class APIError(Exception):
    """An error answered the OpenAI way: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    # fields of the API with the only value radixc implements; any other value is refused by name
    neutral_values: ClassVar[dict[str, Any]] = {}


Body = TypeVar("Body", bound=_Body)


def parse_body(model: type[Body], raw: bytes) -> Body:
    """The request body as `model`; APIError 400 naming the field for bad JSON, types, ranges or unsupported
    values."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise APIError(
                400, f"request body is not valid JSON: {first['msg']}", code="invalid_json"
            ) from None
        param = ".".join(str(part) for part in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else f"request body: {first['msg']}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        raise APIError(400, message, param=param, code="invalid_value") from None
    for name, neutral in model.neutral_values.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise APIError(
                400,
                f"{name}={value!r} is not supported by radixc (leave it unset)",
                param=name,
                code="unsupported_parameter",
            )
    return body


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class _SamplingBody(_Body):
    """Sampling fields shared by completions and chat completions (None: the API's default)."""

    model: str
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegativeInt] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_SamplingBody):
    prompt: Prompts
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    neutral_values = {
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "echo": False,
        "suffix": "",
        "logprobs": None,
        "best_of": 1,
    }


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, str]:
        """The message as chat templates expect it: text content joined into one string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingBody):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    neutral_values = {
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "logprobs": False,
        "top_logprobs": 0,
        "tools": [],
        "functions": [],
        "response_format": {"type": "text"},
    }


class EmbeddingRequest(_Body):
    model: str
    input: Prompts
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None

    neutral_values = {"dimensions": None}
