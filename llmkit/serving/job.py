"""One request's work in `llmkit serve`: what the worker thread generates, and the events it sends back.

    >>> job = Job(["Once upon a time"], SamplingOptions(max_new_tokens=8), stream=True, loop=asyncio.get_running_loop())
    >>> job.post("text", 0, "there")            # from the worker thread
    >>> await job.events.get()                  # on the event loop: ("text", 0, "there")

Events, in order: ("text", output index, new text) while streaming; ("gen", output index, Generation) as each
output completes; then exactly one of ("end",) or ("error", APIError). The engine (`llmkit.serving.engine`)
produces them; the response writer (`llmkit.serving.protocol.Output`) consumes them.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from llmkit.inference.sampling import SamplingOptions
from llmkit.models.templates import Prompt


@dataclass
class Job:
    """One request's work, from the queue to the worker, and its events back to the event loop."""

    prompts: list[Prompt]
    opts: SamplingOptions
    stream: bool
    loop: asyncio.AbstractEventLoop
    prompt_tokens: list[int] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    adapter: str | None = None  # the LoRA adapter the request named (llmkit.serving.adapters); None: the base

    def post(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown past its deadline): nobody is listening
            self.cancelled.set()
