"""A multi-turn chat in the terminal on llmkit's generation backends: the session behind `llmkit chat`.

    >>> from llmkit.inference.backends import open_backend
    >>> from llmkit.inference.sampling import SamplingOptions
    >>> from llmkit.models import resolve
    >>> from llmkit.inference.terminal_chat import ChatSession, run
    >>> opts = SamplingOptions(max_new_tokens=256, temperature=0.7, chat=True)
    >>> backend = open_backend(resolve("smollm2-135m"), ["x" * 4000], opts)
    >>> session = ChatSession(backend, opts, limit=4096, system="Answer in one sentence.")
    >>> session.ask("What is the capital of France?", print).answer   # streams through the callback
    >>> run(session)                                             # the interactive loop: /system, /reset, /exit, Ctrl-C

Every turn sends the whole conversation, rendered with the model's own chat template, so the model sees its
history. Each turn must leave room for a full answer (`opts.max_new_tokens`) within `limit` tokens: when the
conversation grows past that, its oldest turns are dropped (and the user told); a message that does not fit even
alone is refused, and the session goes on. Ctrl-C while an answer streams stops that answer only.

With tools (`llmkit chat --tools tools.json`), the session offers them in the format `llmkit serve` and training use
(`llmkit.models.tools`): a reply that calls a tool is shown as the call, the user types each call's result (or
presses Enter to skip it), and the model answers from the results, as an agent framework would drive it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from llmkit.errors import UsageError
from llmkit.inference.sampling import SamplingOptions
from llmkit.models.tools import parse_calls, result_turn, with_tools

HELP = """commands:
  /system TEXT   set the system prompt (the conversation so far is kept); /system alone removes it
  /reset         forget the conversation (the system prompt stays)
  /exit          leave (also /quit, Ctrl-D, or Ctrl-C at the prompt)
  /help          this list
Ctrl-C while the model answers stops the answer; what it said so far stays in the conversation."""

# Model output goes to a terminal: control characters (escape sequences above all) are shown, never obeyed.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def printable(text: str) -> str:
    """`text` with every control character except newline and tab replaced by U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


class TooLong(Exception):
    """A message that does not fit the context even with no history before it."""


@dataclass
class Fitted:
    """A turn's prompt, fitted into the context."""

    messages: list[dict[str, str]]
    dropped: int  # oldest turns (a user message and its answer) left out to make room
    tokens: int  # prompt tokens


@dataclass
class Turn:
    """What one call to `ChatSession.ask` did."""

    answer: str
    stopped: bool = False  # Ctrl-C (KeyboardInterrupt) during the answer
    dropped: int = 0  # oldest turns dropped from the conversation to make room
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)  # tool calls the answer made ({"name", "arguments"})


@dataclass
class ChatSession:
    """A conversation with one loaded model: the history, the system prompt, and fitting them into `limit` tokens."""

    backend: Any  # llmkit.inference.backends.Backend
    opts: SamplingOptions
    limit: int
    """Most tokens one turn may take: the rendered conversation plus `opts.max_new_tokens` for the answer."""
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    """user / assistant messages, in pairs, oldest first (the system prompt is kept apart)."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """Tools offered to the model ({"name", "description", "parameters"} each, `llmkit.models.tools.tool_spec`)."""

    def __post_init__(self) -> None:
        if not self.opts.chat:
            raise ValueError("ChatSession needs SamplingOptions(chat=True)")
        if self.opts.max_new_tokens >= self.limit:
            raise UsageError(f"--max-new-tokens {self.opts.max_new_tokens} leaves no room for the conversation in a context of "
                             f"{self.limit} tokens: lower it (e.g. -n {max(1, self.limit // 4)})")
        try:  # a model without a chat template fails here, at start-up
            self.messages([{"role": "user", "content": "Hi"}])
        except UsageError as e:
            if "no chat template" not in str(e):
                raise
            raise UsageError("this model has no chat template, so it cannot hold a conversation: use a chat (instruct) model "
                             "or a chat fine-tune, or `llmkit generate` to continue plain text") from None

    def messages(self, tail: list[dict[str, str]], history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        msgs = with_tools(system + (self.history if history is None else history) + tail, self.tools)
        self.backend.format(msgs, self.opts)  # the template's own refusal (e.g. no system role) as a UsageError
        return msgs

    def tokens(self, msgs: list[dict[str, str]]) -> int:
        """Prompt tokens of this conversation, counted exactly as the backend's generate() counts them."""
        return self.backend.prompt_lengths([msgs], self.opts)[0]

    def set_system(self, text: str | None) -> None:
        """A new system prompt, refused (UsageError) when the model's chat template does not take one."""
        old, self.system = self.system, text or None
        try:
            self.messages([{"role": "user", "content": "Hi"}], history=[])
        except UsageError:
            self.system = old
            raise

    def reset(self) -> None:
        self.history.clear()

    def fit(self, user: str) -> Fitted:
        """The messages to send for `user`: without the oldest turns, as many as must go for the answer to have room.

        Raises TooLong when even the system prompt and `user` alone do not fit. Changes nothing: `answer` does.
        """
        room = self.limit - self.opts.max_new_tokens
        tail = [{"role": "user", "content": user}]
        kept = list(self.history)
        while True:
            msgs = self.messages(tail, kept)
            n = self.tokens(msgs)
            if n <= room:
                return Fitted(msgs, (len(self.history) - len(kept)) // 2, n)
            if not kept:
                what = "your message" + (" with the system prompt" if self.system else "")
                raise TooLong(f"{what} is {n} tokens; with {self.opts.max_new_tokens} tokens kept for the answer (--max-new-tokens) "
                              f"it does not fit the context of {self.limit} tokens: shorten it"
                              + (", or the system prompt (/system TEXT)" if self.system else "")
                              + ", or start again with a smaller -n")
            kept = kept[2:]  # one user message and the answer to it

    def answer(self, user: str, fitted: Fitted, on_text: Callable[[str], None]) -> Turn:
        """Generate the answer to `user` (as `fit` prepared it), streaming through `on_text`; the turn joins the history.

        A KeyboardInterrupt while generating stops the answer: the text so far is kept, and `Turn.stopped` says so.
        """
        del self.history[: 2 * fitted.dropped]
        parts: list[str] = []

        def collect(index: int, text: str) -> None:
            parts.append(text)
            on_text(text)

        turn = Turn("", dropped=fitted.dropped, prompt_tokens=fitted.tokens)
        try:
            for gen in self.backend.generate([fitted.messages], self.opts, collect):
                turn.answer, turn.new_tokens, turn.seconds = gen.text, gen.new_tokens, gen.seconds
        except KeyboardInterrupt:
            turn.answer, turn.stopped = "".join(parts), True
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": turn.answer}]
        if self.tools and not turn.stopped:
            turn.calls = parse_calls(turn.answer, [t["name"] for t in self.tools])[1]
        return turn

    def ask(self, user: str, on_text: Callable[[str], None]) -> Turn:
        """`fit` then `answer`. TooLong and UsageError (the template refused the conversation) change nothing."""
        return self.answer(user, self.fit(user), on_text)


def run(session: ChatSession, *, show_prompt: bool = False, read: Callable[[str], str] = input,
        out: TextIO | None = None, err: TextIO | None = None) -> None:
    """The interactive loop: read a line, answer it (streamed), until /exit, EOF or Ctrl-C at the prompt."""
    out, err = out or sys.stdout, err or sys.stderr
    prompt = ">>> " if sys.stdin.isatty() else ""

    def note(text: str) -> None:
        err.write(f"[{text}]\n")
        err.flush()

    def write(text: str) -> None:
        out.write(printable(text))
        out.flush()

    while True:
        try:
            line = read(prompt)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: the session ends, normally
            if prompt:  # leave the terminal on a fresh line
                out.write("\n")
                out.flush()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return
            if command == "/help":
                err.write(HELP + "\n")
            elif command == "/reset":
                session.reset()
                note("conversation cleared" + ("; the system prompt stays" if session.system else ""))
            elif command == "/system":
                try:
                    session.set_system(arg.strip())
                except UsageError as e:
                    note(f"system prompt not set: {e}")
                else:
                    note(f"system prompt set: {session.system}" if session.system else "system prompt removed")
            else:
                note(f"unknown command {command}; /help lists them")
            continue
        try:
            turn = _turn(session, text, show_prompt, write, note, err)
            while turn is not None and turn.calls:  # the model called tools: their results go back, then it answers
                turn = _turn(session, _results(turn.calls, read, note), show_prompt, write, note, err)
        except KeyboardInterrupt:  # Ctrl-C just before or after the answer streamed: it too stops only this turn
            write("\n")
            note("stopped")
        except EOFError:  # input ended while a tool's result was asked for
            return


def _results(calls: list[dict[str, Any]], read: Callable[[str], str], note: Callable[[str], None]) -> str:
    """The user turn that carries the results of `calls`, each typed by the user (the tools run outside llmkit)."""
    import json

    parts = []
    for k, call in enumerate(calls, 1):
        note(f"tool call: {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}): type its result")
        text = read(f"{call['name']}> " if sys.stdin.isatty() else "").strip()
        parts.append(result_turn(f"call_{k}", text or "(no result)")["content"])
    return "\n".join(parts)


def _turn(session: ChatSession, text: str, show_prompt: bool, write: Callable[[str], None], note: Callable[[str], None],
          err: TextIO) -> Turn | None:
    """One message: fit it (dropping old turns, or refusing it), then stream the answer; None when it was refused."""
    try:
        fitted = session.fit(text)
    except TooLong as e:
        note(str(e))
        return None
    except UsageError as e:
        note(f"error: {e}")
        return None
    if fitted.dropped:
        note(f"the conversation outgrew the context of {session.limit} tokens: dropped the oldest "
             f"{fitted.dropped} turn{'s' if fitted.dropped > 1 else ''}")
    if show_prompt:
        err.write(f"--- prompt ({fitted.tokens} tokens, context {session.limit}, answer up to {session.opts.max_new_tokens}) ---\n"
                  f"{printable(session.backend.format(fitted.messages, session.opts))}\n--- end of prompt ---\n")
        err.flush()
    try:
        turn = session.answer(text, fitted, write)
    except UsageError as e:
        note(f"error: {e}")
        return None
    write("\n")
    if turn.stopped:
        note("stopped")
    return turn
