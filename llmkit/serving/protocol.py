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
from dataclasses import replace
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from llmkit.inference.sampling import Generation, SamplingOptions
from llmkit.models.templates import Prompt
from llmkit.models.tools import with_tools
from llmkit.serving.job import Job
from llmkit.serving.logprob_shapes import chat_logprobs, completion_logprobs
from llmkit.serving.tools import ToolError, call_constraint, check_schemas, chosen_tools, format_constraint, parse_reply, render_messages, tool_specs

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
    # strict: "5" is not a number and 1 is not true, as in OpenAI's API; inside a field, names llmkit does not use
    # are ignored (a message's "refusal": null); at the top level see _Sampling.unsupported
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None


class FunctionSpec(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class ToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


# OpenAI request fields that change nothing about the answer: accepted and ignored. Any other field llmkit does
# not implement is a 400 naming it, never silently dropped (it used to be: tools and logprobs came back as text).
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}


class _Sampling(_Body):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0: completions with echo, scoring only
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

    def unsupported(self) -> None:
        for name in self.model_extra or {}:
            if name not in HARMLESS:
                raise APIError(400, f"'{name}' is not supported by llmkit serve; remove it from the request", param=name,
                               code="unsupported_parameter")

    def options(self, chat: bool, max_tokens: int) -> SamplingOptions:
        self.unsupported()
        if self.presence_penalty or self.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty (>1 discourages repeats)",
                           param="presence_penalty" if self.presence_penalty else "frequency_penalty")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops) or len(stops) > 4:
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
        return SamplingOptions(max_new_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               repetition_penalty=self.repetition_penalty, num_return_sequences=self.n,
                               stop=tuple(stops), seed=self.seed, chat=chat)


def _text(m: Message) -> str:
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # 0 (scoring only) is for completions
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoice | None = None

    def tool_names(self) -> tuple[list[str], bool]:
        """(tools the model may call, whether it must); APIError 400 naming the field when they cannot be used."""
        try:
            return chosen_tools(self.tools, self.tool_choice)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None

    def prompts(self) -> list[Prompt]:
        for i, m in enumerate(self.messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                # OpenAI refuses it too; taking it for "" would answer a question nobody asked
                raise APIError(400, f"messages.{i}.content is null or missing: give the {m.role} message's text as a string "
                               "(or a list of text parts)", param=f"messages.{i}.content")
        try:
            messages = render_messages(self.messages, _text)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None
        names, _ = self.tool_names()
        # the tools go into the system turn, ahead of the user's own system prompt, as training data puts them
        specs = tool_specs([t for t in self.tools or [] if t.function.name in names])
        return [with_tools(messages, list(specs.values()))]

    def options(self, chat: bool, max_tokens: int) -> SamplingOptions:
        opts = super().options(chat, max_tokens)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        names, forced = self.tool_names()
        try:
            check_schemas(self.tools or [])
            constraint = format_constraint(self.response_format)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None
        if forced:
            if constraint is not None:
                raise APIError(400, "response_format cannot be combined with a tool_choice that forces a call", param="response_format")
            constraint = call_constraint(self.tools or [], names)
        return replace(opts, logprobs=(self.top_logprobs or 0) if self.logprobs else None, constraint=constraint)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def prompts(self) -> list[Prompt]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or a non-empty list of them", param="prompt")
        return list(prompts)

    def options(self, chat: bool, max_tokens: int) -> SamplingOptions:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 generates nothing: it is only for scoring the prompt with echo and logprobs",
                           param="max_tokens")
        opts = super().options(chat, max_tokens)
        return replace(opts, logprobs=self.logprobs, prompt_logprobs=self.echo and self.logprobs is not None)


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
        # max_tokens 0 (completions, echo): the prompt is scored; the one token generated alongside is dropped
        self.score_only = not chat and req.max_tokens == 0
        self.tools, self.forced = req.tool_names() if isinstance(req, ChatRequest) else ([], False)

    def usage(self, gens: list[Generation]) -> dict[str, int]:
        prompt = sum(self.job.prompt_tokens)
        completion = 0 if self.score_only else sum(g.new_tokens for g in gens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _prompt(self, index: int) -> str:
        return str(self.job.prompts[index // self.job.opts.num_return_sequences])

    def _completion(self, index: int, gen: Generation, echo: bool) -> dict[str, Any]:
        assert isinstance(self.req, CompletionRequest)
        prompt = self._prompt(index) if echo else ""
        text = "" if self.score_only else gen.text
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = completion_logprobs(gen.prompt_logprobs if echo else None, None if self.score_only else gen.logprobs,
                                           0 if echo else len(self._prompt(index)))
        return {"index": index, "text": prompt + text, "logprobs": logprobs,
                "finish_reason": "length" if self.score_only else gen.finish_reason}

    def _message(self, gen: Generation) -> tuple[dict[str, Any], str]:
        """The assistant message of a chat choice (tool calls parsed out of the text) and its finish_reason."""
        content, calls = parse_reply(gen.text, self.tools, self.forced) if self.tools else (gen.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return message, "tool_calls" if calls else gen.finish_reason

    def _chat_logprobs(self, gen: Generation) -> dict[str, Any] | None:
        return chat_logprobs(gen.logprobs) if isinstance(self.req, ChatRequest) and self.req.logprobs else None

    def final(self, gens: list[Generation]) -> dict[str, Any]:
        choices = []
        for i, g in enumerate(gens):
            if self.chat:
                message, finish = self._message(g)
                choices.append({"index": i, "message": message, "logprobs": self._chat_logprobs(g), "finish_reason": finish})
            else:
                choices.append(self._completion(i, g, self.req.echo if isinstance(self.req, CompletionRequest) else False))
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(gens)}

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body = {"id": self.id, "object": self.object + ("" if not self.chat else ".chunk"), "created": self.created,
                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _delta(self, index: int, text: str) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": None}

    def _last(self, index: int, gen: Generation) -> list[dict[str, Any]]:
        """A choice's closing chunks: with tools, its whole reply (content or tool-call deltas, known only once the
        reply is complete); with logprobs, all its tokens' log-probabilities; then the finish_reason."""
        chunks = []
        if not self.chat:
            echo = isinstance(self.req, CompletionRequest) and self.req.echo
            whole = self._completion(index, gen, echo)
            if whole["logprobs"] is not None:  # the text went out already: the log-probs of all of it come here
                chunks.append({"index": index, "text": "", "logprobs": whole["logprobs"], "finish_reason": None})
            return [*chunks, {"index": index, "text": "", "logprobs": None, "finish_reason": whole["finish_reason"]}]
        message, finish = self._message(gen)
        if self.tools:
            if message.get("tool_calls"):
                for k, call in enumerate(message["tool_calls"]):
                    head = {"index": k, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
                    chunks.append({"index": index, "delta": {"tool_calls": [head]}, "logprobs": None, "finish_reason": None})
                    chunks.append({"index": index, "delta": {"tool_calls": [{"index": k, "function": {"arguments": call["function"]["arguments"]}}]},
                                   "logprobs": None, "finish_reason": None})
            if message["content"]:
                chunks.append(self._delta(index, message["content"]))
        if (logprobs := self._chat_logprobs(gen)) is not None:
            chunks.append({"index": index, "delta": {}, "logprobs": logprobs, "finish_reason": None})
        return [*chunks, {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]

    async def sse(self) -> AsyncIterator[str]:
        gens: list[Generation] = []
        # a reply that may be a tool call is held back until it is complete: its text is either content or a call
        hold = bool(self.tools) or self.score_only
        try:
            n = self.job.opts.num_return_sequences
            for i in range(len(self.job.prompts) * n):
                if self.chat:  # OpenAI opens each choice with the role
                    yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                elif isinstance(self.req, CompletionRequest) and self.req.echo:
                    yield self._chunk([self._delta(i, self._prompt(i))])
            while True:
                event = await self.job.events.get()
                if event[0] == "text":
                    if not hold:
                        yield self._chunk([self._delta(event[1], event[2])])
                elif event[0] == "gen":
                    gens.append(event[2])
                    for choice in self._last(event[1], event[2]):
                        yield self._chunk([choice])
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
