"""The chat endpoint's translation (vLLM-Omni's text-to-image chat, as OpenAI clients read it): a
chat body -> its prompt, image parameters and input image URLs; a request's images -> `n`
choices, whole (chat.completion) or streamed (chat.completion.chunk events, OpenAI's SSE: data
lines only, then `data: [DONE]`). Pure functions: the serving object admits and waits."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..errors import RequestError
from .encoding import data_url
from .protocol import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatImageParams,
    ChatUsage,
    ChunkChoice,
    ImagePart,
    ImageURL,
)

DONE = "data: [DONE]\n\n"  # OpenAI's end of a chat stream


def chat_request(body: ChatBody) -> tuple[str, ChatImageParams, list[str]]:
    """The prompt (the user messages' text), the image parameters (top level and extra_body) and
    the URLs of the user's images (a chat with an image is an edit of it)."""
    prompt = body.prompt()
    if not prompt:
        raise RequestError("no user text in messages: send a message with role 'user' and text content", "messages", status=422)  # as an empty prompt is
    try:
        params = ChatImageParams.model_validate(body.params())
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    return prompt, params, body.image_urls()


@dataclass(frozen=True)
class ChatShape:
    """What the answer looks like: its id, model name, n choices of `per_choice` images each,
    the format of the images' data: URLs and the usage."""

    id: str
    model: str
    n: int
    per_choice: int
    output_format: str
    usage: ChatUsage

    def choice_of(self, image: int) -> int:
        """The choice image `image` of the request belongs to (an edit of several input images
        makes n x per_choice images for each, in order)."""
        return (image // self.per_choice) % self.n

    def part(self, b64: str) -> ImagePart:
        return ImagePart(image_url=ImageURL(url=data_url(b64, self.output_format)))


def chat_response(shape: ChatShape, images: list[str]) -> ChatCompletionResponse:
    """The whole answer: n choices, each an assistant message of its images."""
    parts: list[list[ImagePart]] = [[] for _ in range(shape.n)]
    for j, b64 in enumerate(images):
        parts[shape.choice_of(j)].append(shape.part(b64))
    choices = [ChatChoice(index=i, message=AssistantMessage(content=p)) for i, p in enumerate(parts)]
    return ChatCompletionResponse(id=shape.id, created=int(time.time()), model=shape.model, choices=choices, usage=shape.usage)


def _chunk(shape: ChatShape, choices: list[ChunkChoice], usage: ChatUsage | None = None) -> str:
    chunk = ChatCompletionChunk(id=shape.id, created=int(time.time()), model=shape.model, choices=choices, usage=usage)
    return f"data: {json.dumps(chunk.model_dump(exclude_none=True), separators=(',', ':'))}\n\n"


async def chat_chunks(shape: ChatShape, images: AsyncIterator[tuple[int, int | None, str]], include_usage: bool) -> AsyncIterator[str]:
    """The streamed answer: a role chunk per choice, a chunk per image as it is made (previews are
    not sent: a chat message has no partial images), a finish_reason chunk per choice, the usage
    (with include_usage), then [DONE]."""
    yield _chunk(shape, [ChunkChoice(index=i, delta=ChatDelta(role="assistant")) for i in range(shape.n)])
    async for index, partial, b64 in images:
        if partial is None:
            yield _chunk(shape, [ChunkChoice(index=shape.choice_of(index), delta=ChatDelta(content=[shape.part(b64)]))])
    yield _chunk(shape, [ChunkChoice(index=i, delta=ChatDelta(), finish_reason="stop") for i in range(shape.n)])
    if include_usage:
        yield _chunk(shape, [], shape.usage)
    yield DONE
