"""OpenAI API shapes (requests, responses, streaming chunks, errors) as pydantic models.

Requests accept the fields we implement and ignore the others (``user``, ``logit_bias``, tools...),
like the OpenAI API accepts fields it does not use. Every error leaves the server in OpenAI's
shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16  # choices per call: each one is a full request in the engine
MAX_STOP = 16
MAX_BATCH_PROMPTS = 64  # prompts in one /v1/completions call


def openai_error(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    """An error response in OpenAI's shape (the ``openai`` client raises it with this message)."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def model_not_found(model: str | None, served: str) -> JSONResponse | None:
    """404 ``model_not_found`` when a request names a model other than the one served (None:
    the request named none), else None."""
    if model is None or model == served:
        return None
    return openai_error(
        404,
        f"the model '{model}' does not exist; this server serves '{served}'",
        param="model",
        code="model_not_found",
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# -- requests ---------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the served model's id (see GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="most new tokens per choice (default: what the context leaves)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy (default: 1)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (default: 1)")
    n: int | None = Field(None, ge=1, le=MAX_N, description="choices to generate (default: 1)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="stop at any of these strings (not included)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same output; choice i uses seed + i")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a list of texts, token ids or a list of token-id lists"
    )
    echo: bool | None = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt list is empty")
            if isinstance(v[0], list | str) and len(v) > MAX_BATCH_PROMPTS:
                raise ValueError(f"at most {MAX_BATCH_PROMPTS} prompts per request")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this call, one per batch entry."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


ROLES = ("system", "developer", "user", "assistant")  # "developer": OpenAI's newer name for system


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    """One message. Its content is a string or a list of ``{"type": "text", "text": ...}``
    parts; anything the model cannot read (images, audio, files, tool turns) is refused with a
    400 rather than silently dropped, which would answer a different question."""

    model_config = ConfigDict(extra="ignore")
    role: str = Field(description="system, developer (read as system), user or assistant", json_schema_extra={"enum": list(ROLES)})
    content: str | list[TextPart] | None = Field(None, description="a string or a list of text parts; null only on an assistant message")

    @field_validator("role")
    @classmethod
    def _check_role(cls, v: str) -> str:
        if v in ("tool", "function"):
            raise ValueError(f"'{v}' messages are not supported: this server does not call tools")
        if v not in ROLES:
            raise ValueError(f"unknown role '{v}'; use one of {', '.join(ROLES)}")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _check_parts(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of text parts")
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                what = f"type '{kind}'" if isinstance(kind, str) else "no 'type'"
                raise ValueError(f"content part {i} has {what}; this server's model reads text only (parts of type 'text')")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} (type 'text') needs a 'text' string")
        return v

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or text parts), got none")
        return self

    def template_role(self) -> str:
        """The role as the chat template knows it."""
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")


# -- responses ----------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models: OpenAI's fields plus what the model is for.

    ``type``: "chat" (a generative model: /v1/chat/completions, /v1/completions, /v1/rag) or
    "embedding" (/v1/embeddings). ``capabilities``: what it answers, by name: "chat",
    "completion", "rag" (chat models) or "embedding".
    """

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlsyskit"
    type: Literal["chat", "embedding"] = Field(description='"chat" (generates text) or "embedding" (/v1/embeddings)')
    capabilities: list[Literal["chat", "completion", "rag", "embedding"]] = Field(
        description="what the model answers: chat (/v1/chat/completions), completion (/v1/completions), "
        "rag (/v1/rag), embedding (/v1/embeddings)"
    )
    max_model_len: int | None = Field(None, description="tokens the model reads at most (its context)")
    dimensions: int | None = Field(None, description="embedding length (embedding models)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish reasons are "stop" and "length"; an aborted request ended early: "stop"."""
    return None if reason is None else ("length" if reason == "length" else "stop")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "queue full; retry after Retry-After seconds"),
        (503, "shutting down"),
    )
}
