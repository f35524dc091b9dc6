"""`llmkit chat`: the session's rules on a fake backend (fast), then the real command in a pseudo-terminal on a tiny
chat model — streaming, history, /system, /reset, Ctrl-C mid-answer, the context overflowing, and clean exits."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmkit.errors import UsageError
from llmkit.inference.sampling import Generation, SamplingOptions
from llmkit.inference.terminal_chat import ChatSession, TooLong, printable
from tests.chat_models import endless_chat_model

# ------------------------------------------------------------------------------------------- the session's rules


class FakeBackend:
    """Renders `role:content|...`, one token per character; answers with `answer`, one character at a time."""

    name, context, batches = "fake", None, False

    def __init__(self, answer: str = "abcdef", interrupt_after: int | None = None, system_role: bool = True) -> None:
        self.answer, self.interrupt_after, self.system_role = answer, interrupt_after, system_role
        self.prompts: list[str] = []

    def format(self, prompt, opts) -> str:
        if not self.system_role and any(m["role"] == "system" for m in prompt):
            raise UsageError("the chat template refused this conversation: System role not supported")
        return "".join(f"{m['role'][0]}:{m['content']}|" for m in prompt) + "a:"

    def prompt_lengths(self, prompts, opts) -> list[int]:
        return [len(self.format(p, opts)) for p in prompts]

    def generate(self, prompts, opts, on_text=None) -> Iterator[Generation]:
        self.prompts.append(self.format(prompts[0], opts))
        text = self.answer[: opts.max_new_tokens]
        for k, ch in enumerate(text):
            if self.interrupt_after is not None and k == self.interrupt_after:
                raise KeyboardInterrupt  # what Ctrl-C does to the main thread mid-answer
            on_text(0, ch)
        yield Generation(prompts[0], text, len(text), 0.01, "length")


def _session(limit: int = 60, **kw) -> tuple[ChatSession, FakeBackend]:
    backend = FakeBackend(**kw)
    return ChatSession(backend, SamplingOptions(max_new_tokens=6, temperature=0, chat=True), limit=limit), backend


def test_history_is_sent_and_kept():
    session, backend = _session()
    shown: list[str] = []
    assert session.ask("hi", shown.append).answer == "abcdef"
    assert shown == list("abcdef")  # streamed, one piece at a time
    session.ask("more", shown.append)
    assert backend.prompts == ["u:hi|a:", "u:hi|a:abcdef|u:more|a:"]
    assert session.history[-1] == {"role": "assistant", "content": "abcdef"}


def test_oldest_turns_are_dropped_to_leave_room_for_the_answer():
    session, backend = _session(limit=40)
    session.ask("one", lambda t: None)  # u:one|a:abcdef| = 15 characters
    session.ask("two", lambda t: None)
    turn = session.ask("three", lambda t: None)  # with both turns: 40 + 6 for the answer > 40
    assert turn.dropped == 1
    assert backend.prompts[-1] == "u:two|a:abcdef|u:three|a:"
    assert len(backend.prompts[-1]) + 6 <= 40
    assert [m["content"] for m in session.history] == ["two", "abcdef", "three", "abcdef"]


def test_a_message_that_cannot_fit_alone_is_refused_and_the_session_goes_on():
    session, _ = _session(limit=30)
    session.ask("hi", lambda t: None)
    before = list(session.history)
    with pytest.raises(TooLong, match=r"your message is 27 tokens; with 6 tokens kept for the answer .* context of 30 tokens"):
        session.ask("x" * 22, lambda t: None)
    assert session.history == before  # nothing dropped for a message that was refused anyway
    assert session.ask("ok", lambda t: None).answer == "abcdef"


def test_ctrl_c_stops_the_answer_keeps_what_was_said_and_the_session():
    session, backend = _session(interrupt_after=3)
    shown: list[str] = []
    turn = session.ask("hi", shown.append)
    assert turn.stopped and turn.answer == "abc" == "".join(shown)
    backend.interrupt_after = None
    session.ask("go on", lambda t: None)
    assert backend.prompts[-1] == "u:hi|a:abc|u:go on|a:"


def test_system_prompt_and_reset():
    session, backend = _session()
    session.set_system("Be brief.")
    session.ask("hi", lambda t: None)
    assert backend.prompts[-1] == "s:Be brief.|u:hi|a:"
    session.reset()
    session.ask("again", lambda t: None)
    assert backend.prompts[-1] == "s:Be brief.|u:again|a:"
    refusing, _ = _session(system_role=False)
    with pytest.raises(UsageError, match="System role not supported"):
        refusing.set_system("Be brief.")
    assert refusing.system is None


def test_no_room_for_the_answer_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--max-new-tokens 6 leaves no room .* context of 6 tokens"):
        _session(limit=6)


def test_model_output_cannot_drive_the_terminal():
    assert printable("ok\x1b[2J\x07\r\x9b done\n\tend") == "ok\ufffd[2J\ufffd\ufffd\ufffd done\n\tend"


def test_a_tool_call_is_shown_its_typed_result_goes_back_and_the_model_answers_from_it():
    """With tools, a reply in the tool-call format is shown as the call; the line the user types next is its
    result (as the user turn serve and training use), and the model answers again, from it."""
    from llmkit.inference.terminal_chat import run
    from llmkit.models.tools import call_text, tool_spec

    weather = tool_spec({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}})
    backend = FakeBackend(answer=call_text("get_weather", {"city": "Paris"}))
    session = ChatSession(backend, SamplingOptions(max_new_tokens=80, temperature=0, chat=True), limit=2000, tools=[weather])
    lines = iter(["Weather in Paris?", "sunny, 21 C"])

    def read(prompt: str) -> str:
        if len(backend.prompts) == 1:  # the result is being asked for: from it, the fake answers plainly
            backend.answer = "It is sunny."
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D: the session ends

    out, err = io.StringIO(), io.StringIO()
    run(session, read=read, out=out, err=err)
    assert '[tool call: get_weather({"city": "Paris"}): type its result]' in err.getvalue()
    assert backend.prompts[0].startswith("s:You can call these tools")  # offered in the system turn
    assert '<tool_response>{"tool_call_id": "call_1", "content": "sunny, 21 C"}</tool_response>' in backend.prompts[1]
    assert len(backend.prompts) == 2 and session.history[-1] == {"role": "assistant", "content": "It is sunny."}


def test_chat_tools_file_errors_are_one_line(tmp_path, cli):
    for text, message in (("[", "not JSON"), ("[]", "non-empty list of tools"), ('[{"type": "function", "function": {}}]', "without a usable name")):
        (tmp_path / "t.json").write_text(text)
        code, _, err = cli("chat", "--tools", str(tmp_path / "t.json"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("chat", "--tools", str(tmp_path / "missing.json"))
    assert code == 2 and "--tools" in err and "cannot read it" in err


# ------------------------------------------------------------------------------- the command, in a pseudo-terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """`llmkit chat ARGS` with a pseudo-terminal as its controlling terminal: \\x03 is a real Ctrl-C (SIGINT)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb", "COLUMNS": "200", "LINES": "50"}
        argv = [sys.executable, "-m", "llmkit", "chat", *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its terminal is the pty's far end
            try:
                import fcntl
                import struct
                import termios

                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.text = ""  # everything shown so far, escape sequences removed, \r\n as \n
        self.mark = 0  # expect() searches from here
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child has gone
            data = b""
        if not data:
            return False
        self.text += ANSI.sub("", data.decode("utf-8", "replace")).replace("\r\n", "\n")
        return True

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait for `pattern` (a regex) in the output after the previous match; move past it."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.text, self.mark)
            if found:
                self.mark = found.end()
                return found
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 0.5)) and self.exited()):
                raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.text[-3000:]}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exited(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is not None

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"llmkit chat did not exit within {timeout} s:\n{self.text[-3000:]}")
            self._read(0.1)
        while self._read(0.1):
            pass
        return self.status

    def close(self) -> None:
        if not self.exited():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.status = -9
        os.close(self.fd)


@pytest.fixture(scope="module")
def endless(tmp_path_factory) -> Path:
    return endless_chat_model(tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture
def terminal() -> Iterator[type[Terminal]]:
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield start
    for t in opened:
        t.close()
        assert "Traceback" not in t.text, t.text[-3000:]


PROMPT = re.escape(">>> ")
END = r"--- end of prompt ---\n"
BLOCK = r"--- prompt \((\d+) tokens, context (\d+), answer up to \d+\) ---\n(.*?)\n--- end of prompt ---\n"


def _turn(t: Terminal, message: str) -> tuple[str, str]:
    """Send a message; (the prompt as the chat template rendered it, the answer shown)."""
    t.send(message + "\r")
    prompt = t.expect(BLOCK, 120).group(3)
    answer = t.expect(r"(.*?)\n(?:\[[^\n]*\]\n)*" + PROMPT, 120).group(1)
    return prompt, answer


def test_history_system_reset_and_exit(endless, terminal):
    t = terminal("--model", str(endless), "--backend", "transformers", "-t", "0", "-n", "6", "--show-prompt")
    t.expect(r"chatting with .*tiny-chat \(transformers, 4096-token context\)", 120)
    t.expect(PROMPT)
    prompt, first = _turn(t, "first question")
    assert prompt == "<|user|>first question</s><|assistant|>"
    assert first.strip()
    prompt, second = _turn(t, "second question")  # the whole conversation goes with every turn
    assert prompt == f"<|user|>first question</s><|assistant|>{first}</s><|user|>second question</s><|assistant|>"

    t.send("/system Answer in French.\r")
    t.expect(r"\[system prompt set: Answer in French\.\]\n" + PROMPT)
    prompt, _ = _turn(t, "third")
    assert prompt == (f"<|system|>Answer in French.</s><|user|>first question</s><|assistant|>{first}</s>"
                      f"<|user|>second question</s><|assistant|>{second}</s><|user|>third</s><|assistant|>")

    t.send("/reset\r")
    t.expect(r"\[conversation cleared; the system prompt stays\]\n" + PROMPT)
    prompt, _ = _turn(t, "fourth")
    assert prompt == "<|system|>Answer in French.</s><|user|>fourth</s><|assistant|>"
    t.send("/nope\r")
    t.expect(r"\[unknown command /nope; /help lists them\]")
    t.send("/exit\r")
    assert t.wait() == 0


def test_context_overflow_drops_the_oldest_turns_and_never_ends_the_session(endless, terminal):
    t = terminal("--model", str(endless), "--backend", "transformers", "-t", "0", "-n", "6", "--context", "48", "--show-prompt")
    t.expect(r"\(transformers, 48-token context\)", 120)
    t.expect(PROMPT)
    sent = []
    for k in range(1, 9):
        sent.append(f"message {k}")
        t.send(sent[-1] + "\r")
        found = t.expect(r"(\[the conversation outgrew the context of 48 tokens: dropped the oldest (\d+) turns?\]\n)?" + BLOCK, 120)
        tokens, prompt = int(found.group(3)), found.group(5)
        last = t.expect(r"(.*?)\n" + PROMPT, 120).group(1)
        assert tokens + 6 <= 48  # room for the whole answer, always
        if found.group(1):
            break
    else:
        raise AssertionError(f"eight turns never outgrew 48 tokens:\n{t.text}")
    assert k >= 3  # turns were kept while they fitted
    dropped = int(found.group(2))
    assert all(f"<|user|>{m}</s>" not in prompt for m in sent[:dropped])  # the oldest went...
    assert prompt.startswith(f"<|user|>{sent[dropped]}</s><|assistant|>")  # ...and only they
    assert prompt.endswith(f"<|user|>{sent[-1]}</s><|assistant|>")

    t.send("zqxj " * 12 + "\r")  # letters the tokenizer never merged: a token or more each
    found = t.expect(r"\[your message is (\d+) tokens; with 6 tokens kept for the answer \(--max-new-tokens\) it does not fit "
                     r"the context of 48 tokens: shorten it[^\]]*\]\n" + PROMPT)
    assert int(found.group(1)) + 6 > 48
    prompt, answer = _turn(t, "still here?")  # the session goes on, with what it had
    assert prompt.endswith(f"<|user|>{sent[-1]}</s><|assistant|>{last}</s><|user|>still here?</s><|assistant|>")
    assert answer.strip()
    t.send("\x04")  # Ctrl-D
    assert t.wait() == 0


def test_ctrl_c_stops_the_answer_not_the_session(endless, terminal):
    t = terminal("--model", str(endless), "--backend", "transformers", "-t", "0", "-n", "3000", "--show-prompt")
    t.expect(PROMPT, 120)
    t.send("tell me a long story\r")
    t.expect(BLOCK, 120)
    start, sizes = t.mark, []
    deadline = time.monotonic() + 60
    while len(t.text) - start < 60 and time.monotonic() < deadline:  # the answer streams in, piece by piece
        if t._read(1):
            sizes.append(len(t.text) - start)
    assert len(sizes) >= 3 and len(t.text) - start >= 60, t.text[start:]
    t.send("\x03")
    stopped_at = time.monotonic()
    partial = t.expect(r"(.*?)\^C\n\[stopped\]\n" + PROMPT, 30).group(1)
    assert time.monotonic() - stopped_at < 10  # at once, not at the end of 3000 tokens
    assert len(partial) >= 60

    prompt, _ = _ctrl_c_right_after_the_prompt(t, "and then?")  # what was said before Ctrl-C is in the conversation
    assert prompt == f"<|user|>tell me a long story</s><|assistant|>{partial}</s><|user|>and then?</s><|assistant|>"
    # leaving: /exit (Ctrl-C at the prompt leaves too, but was lost about 1 run in 4 here right after a stopped turn)
    t.send("/exit\r")
    assert t.wait() == 0
    assert "interrupted" not in t.text


def _ctrl_c_right_after_the_prompt(t: Terminal, message: str) -> tuple[str, str]:
    """Ctrl-C the moment the prompt is shown: before the first token, or during it — it stops only this turn."""
    t.send(message + "\r")
    prompt = t.expect(BLOCK, 120).group(3)
    t.send("\x03")
    return prompt, t.expect(r"(.*?)\n\[stopped\]\n" + PROMPT, 30).group(1)


def test_bad_input_is_one_line_and_exit_2_and_piped_lines_are_answered(endless, tiny_gpt2, cli, monkeypatch):
    code, _, err = cli("chat", "--model", str(endless), "-n", "100", "--context", "100")
    assert code == 2 and err.strip() == "error: --max-new-tokens 100 leaves no room for the conversation in --context 100: lower -n or raise --context"
    code, _, err = cli("chat", "--model", str(tiny_gpt2), "--backend", "transformers", "-n", "8")  # no chat template
    assert code == 2 and err.startswith("error: ") and "chat template" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/system Be brief.\nagain\n"))  # not a terminal: no prompt
    code, out, err = cli("chat", "--model", str(endless), "--backend", "transformers", "-t", "0", "-n", "5", "--show-prompt", "-q")
    assert code == 0 and ">>>" not in out and err.count("--- end of prompt ---") == 2
    assert out.strip() and out.endswith("\n")  # the answers, each ended by a newline
    assert "<|system|>Be brief.</s><|user|>hello</s><|assistant|>" in err
