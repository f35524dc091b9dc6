"""OpenAI's wire format for `llmkit serve`: request bodies (pydantic), errors, responses and stream chunks.

Only shapes live here; what happens to a request is in `llmkit.serving.engine`, the routes in `llmkit.serving.app`.

    >>> req = ChatRequest.model_validate_json('{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}')
    >>> req.prompts(), req.options(chat=True, max_tokens=8)
    >>> Output("smollm2-135m", True, req, job).final(gens)         # the response body, from a Job's Generations
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from llmkit.inference.sampling import Generation, SamplingOptions
from llmkit.models.templates import Prompt
from llmkit.serving.job import Job

_ERROR_TYPES = {429: "requests", 500: "server_error", 503: "server_error"}  # the rest: "invalid_request_error", as OpenAI


class APIError(Exception):
    """An error as OpenAI returns it: HTTP status + {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ------------------------------------------------------------------------------------------- requests


class _Body(BaseModel):
    # strict: "5" is not a number and 1 is not true, as in OpenAI's API; fields llmkit does not use are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampling, not greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # llama.cpp-server extension; 0 = off, like OpenAI
    repetition_penalty: float = Field(1.0, gt=0)  # extension, as in llama.cpp's server and vLLM
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def options(self, chat: bool, max_tokens: int) -> SamplingOptions:
        if self.presence_penalty or self.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty (>1 discourages repeats)",
                           param="presence_penalty" if self.presence_penalty else "frequency_penalty")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops) or len(stops) > 4:
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
        return SamplingOptions(max_new_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               repetition_penalty=self.repetition_penalty, num_return_sequences=self.n,
                               stop=tuple(stops), seed=self.seed, chat=chat)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name for max_tokens

    def prompts(self) -> list[Prompt]:
        for i, m in enumerate(self.messages):
            if m.content is None:  # OpenAI refuses it too; taking it for "" would answer a question nobody asked
                raise APIError(400, f"messages.{i}.content is null or missing: give the {m.role} message's text as a string "
                               "(or a list of text parts)", param=f"messages.{i}.content")

        def text(m: Message) -> str:
            return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])

        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter
        return [[{"role": "system" if m.role == "developer" else m.role, "content": text(m)} for m in self.messages]]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False

    def prompts(self) -> list[Prompt]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or a non-empty list of them", param="prompt")
        return list(prompts)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's errors as one line naming the field, e.g. `messages.0.role: Input should be 'system', ...`."""
    problems, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        where = ".".join(str(p) for p in err.get("loc", ())[1:] if not isinstance(p, str) or p not in ("str", "list[TextPart]"))
        param = param or where or None
        problems.append(f"{where or 'body'}: {err.get('msg')}")
    return "; ".join(dict.fromkeys(problems))[:1000], param


# ------------------------------------------------------------------------------------------ responses


class Output:
    """OpenAI response bodies: one JSON object, or server-sent chunks."""

    def __init__(self, model: str, chat: bool, req: ChatRequest | CompletionRequest, job: Job) -> None:
        self.model, self.chat, self.req, self.job = model, chat, req, job
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, gens: list[Generation]) -> dict[str, int]:
        prompt, completion = sum(self.job.prompt_tokens), sum(g.new_tokens for g in gens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, index: int, text: str, finish: str | None, delta: bool = False) -> dict[str, Any]:
        if not self.chat:
            echo = self.job.prompts[index // self.job.opts.num_return_sequences] if self.req.echo and not delta else ""
            return {"index": index, "text": f"{echo}{text}", "logprobs": None, "finish_reason": finish}
        body = {"content": text} if delta else {"role": "assistant", "content": text}
        return {"index": index, "delta" if delta else "message": body, "logprobs": None, "finish_reason": finish}

    def final(self, gens: list[Generation]) -> dict[str, Any]:
        choices = [self._choice(i, g.text, g.finish_reason) for i, g in enumerate(gens)]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(gens)}

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body = {"id": self.id, "object": self.object + ("" if not self.chat else ".chunk"), "created": self.created,
                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        gens: list[Generation] = []
        try:
            n = self.job.opts.num_return_sequences
            for i in range(len(self.job.prompts) * n):
                if self.chat:  # OpenAI opens each choice with the role
                    yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                elif self.req.echo:
                    yield self._chunk([self._choice(i, str(self.job.prompts[i // n]), None, delta=True)])
            while True:
                event = await self.job.events.get()
                if event[0] == "text":
                    yield self._chunk([self._choice(event[1], event[2], None, delta=True)])
                elif event[0] == "gen":
                    gens.append(event[2])
                    last = {"index": event[1], "delta": {}, "logprobs": None, "finish_reason": event[2].finish_reason}
                    yield self._chunk([last if self.chat else self._choice(event[1], "", event[2].finish_reason)])
                elif event[0] == "error":  # headers are gone: the error travels in the stream, as OpenAI does
                    yield f"data: {json.dumps(event[1].body())}\n\n"
                    return
                else:
                    break
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                yield self._chunk([], self.usage(gens))
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled.set()  # a no-op when finished; otherwise the client left: stop generating
