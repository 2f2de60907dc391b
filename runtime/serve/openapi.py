"""The API's request and response shapes, for the OpenAPI document served at /openapi.json (and /docs).

The chat handler parses its body itself, so that every client mistake gets an OpenAI-style 4xx body with a message
of ours (protocol.py) rather than FastAPI's 422; these models describe the same fields for the document, and the
tests check real responses against them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageUrl(BaseModel):
    url: str = Field(description="a data: URI; a local path under --allowed-local-media-path; http(s) with "
                                 "--allow-remote-media")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl | str


class VideoUrl(BaseModel):
    url: str = Field(description="a video file (mp4, webm, mkv, avi, gif, ...) as a data: URI; a local path under "
                                 "--allowed-local-media-path; http(s) with --allow-remote-media")
    fps: float | None = Field(None, gt=0, description="frames sampled per second of video (default: the "
                                                       "checkpoint's, 2)")
    num_frames: int | None = Field(None, gt=0, description="sample this many frames instead of an fps")
    max_frames: int | None = Field(None, gt=0, description="the most frames sampled (at most --max-video-frames)")


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoUrl | str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart | VideoPart] = Field(
        description="text, or text, image and video parts in prompt order (several per message are allowed)")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="end the stream with a chunk that carries `usage`")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and ignored

    model: str | None = Field(None, description="any name; the server has one model (see /v1/models)")
    messages: list[Message] = Field(min_length=1, description="the conversation, multi-turn history included")
    max_tokens: int | None = Field(None, ge=1, description="default: up to the compiled context")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (takes precedence)")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, ge=0)
    top_k: int = Field(0, description="0 or less: no top-k cut")
    seed: int | None = Field(None, description="makes sampling reproducible")
    stop: str | list[str] | None = Field(None, description="the text ends before the first of these strings")
    min_tokens: int = Field(0, ge=0, description="end-of-sequence tokens are suppressed before this many tokens")
    ignore_eos: bool = Field(False, description="generate exactly max_tokens tokens")
    stream: bool = Field(False, description="server-sent events of chat.completion.chunk objects, then [DONE]")
    stream_options: StreamOptions | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


ERRORS = {400: {"model": ErrorBody, "description": "a malformed request, an undecodable or disallowed image or "
                                                   "video, a video over the length limit, a prompt over the "
                                                   "compiled budget"},
          401: {"model": ErrorBody, "description": "wrong API key"},
          503: {"model": ErrorBody, "description": "a worker died or is restarting; retry"}}


# The request body's schema; its nested models ($defs) go under components/schemas, where its refs point.
_REQUEST_SCHEMA = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_REQUEST_BODY = {k: v for k, v in _REQUEST_SCHEMA.items() if k != "$defs"}


def chat_route_docs() -> dict:
    """Keyword arguments for the chat route's decorator: the request body's schema and the responses."""
    return {"openapi_extra": {"requestBody": {"required": True,
                                              "content": {"application/json": {"schema": _REQUEST_BODY}}}},
            "responses": {200: {"model": ChatCompletion, "description": "a chat.completion object; with "
                                "`stream: true`, text/event-stream of chat.completion.chunk objects",
                                "content": {"text/event-stream": {}}}, **ERRORS}}


def add_request_schemas(app) -> None:
    """Put the request models' nested schemas under components/schemas, where the body schema's refs point."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()  # FastAPI's own document, which it also caches in app.openapi_schema
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in _REQUEST_SCHEMA["$defs"].items():
                components.setdefault(name, definition)
        return app.openapi_schema

    app.openapi = openapi
