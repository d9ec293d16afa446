"""Request bodies of the OpenAI-compatible endpoints, as pydantic models (unknown fields are ignored).

Defaults are OpenAI's (`max_tokens` 16 for completions, `temperature` 1.0) and so are the limits (at most
2,048 prompts in a list, 4 stop strings, `logit_bias` values from -100 to 100, penalties from -2 to 2).
Field checks here are the ones a schema can say; the rest (token ids inside the vocabulary, prompt
lengths, `max_tokens` inside the context) happen when the prompt is read. No number may be NaN or infinite,
and no text may hold a lone surrogate (which no encoding can write).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from .errors import APIError

MAX_LOGPROBS = 5
MAX_PROMPTS = 2048
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024


def _surrogate_path(value, path: str) -> str | None:
    """The field holding a string with a lone surrogate (JSON lets "\\ud800" through), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _surrogate_path(key, path) or _surrogate_path(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for item in value:
            found = _surrogate_path(item, path)
            if found:
                return found
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        # An APIError is not a ValueError, so pydantic lets it through to the error handler as it is.
        field = _surrogate_path(data, "")
        if field is not None:
            param = field.split(".")[0]
            raise APIError(400, f"{field} holds a lone surrogate, which is not text; send valid UTF-8", param)
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields both generation endpoints share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # vLLM spells "off" as -1, OpenAI has no top_k; 0 and -1 both mean every token.
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    # Below 0.01 (or above 100) the divided logits overflow to infinity.
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)] | list[StrictStr] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if isinstance(stop, list) and any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
        return stop

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: OpenAI's legacy completions."""

    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(max_length=MAX_PROMPTS)]
        | list[StrictInt]
        | Annotated[list[list[StrictInt]], Field(max_length=MAX_PROMPTS)]
    )
    # None: OpenAI's 16, or fewer when the context has less room left.
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix is not None:
            raise APIError(400, "suffix (insertion) is not supported by this model", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported; leave it out or set it equal to n", "best_of")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`: messages written as the `mlx-xglm chat` transcript."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Body):
    """`POST /tokenize` (vLLM's): `prompt` text, or chat `messages`."""

    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    """`POST /detokenize` (vLLM's)."""

    model: str | None = None
    tokens: list[StrictInt]
