"""Chat data for instruction fine-tuning: conversations in, token ids with assistant-only labels out.

    >>> from llmkit.chat import ChatEncoder, read_conversations, resolve_template
    >>> convs = read_conversations("chat.jsonl")
    >>> enc = ChatEncoder(tokenizer, resolve_template(tokenizer, None, "smollm2-135m"))
    >>> ids, labels = enc.encode(convs[0])        # labels: -100 except on every assistant turn + its end-of-turn

Formats, detected from the columns of a JSONL / JSON / CSV / parquet file or Hub dataset:

    messages           {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}  (OpenAI)
    sharegpt           {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}
    prompt-completion  {"prompt": "...", "completion": "..."}  (one user turn, one assistant turn)

Conversations are rendered with the model's own chat template (the one `llmkit generate --chat` and
`llmkit serve` render with), then tokenized once. Which tokens are learned is read off that one rendering:
for each assistant turn, the template is also rendered up to the turn (with the generation prompt) and
through it, and the characters in between — the reply and the template's end-of-turn token — are mapped to
tokens by the tokenizer's offsets. Nothing is re-tokenized piecewise, so the mask cannot drift from the
tokens. A template that puts no special token after a reply is refused: a model trained on it could never
learn to stop.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.config import DATA_FORMATS
from llmkit.errors import UsageError

FORMATS = DATA_FORMATS
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# ChatML (OpenAI's format, used by SmolLM2, Qwen, ...): what `--chat-template chatml` means.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# A prompt: text to continue, or (chat) a conversation as a list of {"role": ..., "content": ...} messages.
Prompt = str | list[dict[str, str]]


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "chat.jsonl:line 7", for error messages
    first: int = 0  # assistant turns from this message on are learned (a preference pair: its response, not the prompt's)


CHAT_COLUMNS = {"messages": "messages", "sharegpt": "conversations", "prompt-completion": "prompt"}


def detect_format(first: dict[str, Any] | None, fmt: str, prompt_column: str | None) -> str:
    """The data's format: `fmt` unless it is "auto", else what the first row's fields say ("text" for plain text).

    Every later row must have the same format (`row_format`): one file, one format.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if prompt_column or not isinstance(first, dict):  # --prompt-column alone: raw prompt + response text, no template
        return "text"
    return row_format(first) or "text"


def row_format(record: Any) -> str | None:
    """Which chat format a row is in (preference pairs first, then the first of messages, sharegpt, prompt-completion
    whose field it fills)."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record or "rejected" in record:
        return "preference"
    for name, col in CHAT_COLUMNS.items():
        if record.get(col) is not None and (name != "prompt-completion" or "completion" in record):
            return name
    return None


def format_mismatch(here: str | None, first: str, first_where: str, where: str) -> str:
    what = f"a {here} row" if here else f"a row with none of the {', '.join(CHAT_COLUMNS.values())} fields"
    return f"{where}: {what} in a file of {first} rows ({first_where}); keep one chat format per file"


def conversation(record: dict[str, Any], fmt: str, where: str, prompt_column: str | None = None,
                 text_column: str = "text") -> Conversation:
    """One row as a validated conversation; a bad row is a one-line error naming file:line."""
    if fmt == "prompt-completion":
        prompt_col = prompt_column or "prompt"
        answer_col = text_column if prompt_column else "completion"
        msgs = [{"role": "user", "content": record.get(prompt_col)}, {"role": "assistant", "content": record.get(answer_col)}]
        return _checked(msgs, where)
    column = "messages" if fmt == "messages" else "conversations"
    turns = record.get(column)
    if isinstance(turns, str):  # a CSV cell, or JSON stored as a string
        import json

        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise UsageError(f"{where}: '{column}' is text, not a list of turns") from None
    if not isinstance(turns, list):
        raise UsageError(f"{where}: '{column}' must be a list of turns, got a {type(turns).__name__}")
    msgs = [_turn(t, fmt, where, k) for k, t in enumerate(turns, 1)]
    return _checked(msgs, where)


def read_conversations(spec: str, fmt: str = "auto", prompt_column: str | None = None, text_column: str = "text",
                       limit: int | None = None) -> list[Conversation]:
    """The first `limit` conversations of a data file (all of them when None), validated; for small files and samples
    (training data goes through llmkit.datasets, which never holds a file in memory)."""
    from llmkit.datafiles import find_sources, iter_records

    _, sources = find_sources(spec, task="causal-lm")
    out: list[Conversation] = []
    first = first_where = None
    for source in sources:
        if source.kind == "text":
            raise UsageError(f"{source.name} holds no conversations (no 'messages', 'conversations' or 'prompt'/'completion' "
                             "columns); pass --format to say which columns hold them")
        for where, record in iter_records(source):
            if not isinstance(record, dict):
                raise UsageError(f"{where}: a JSON {type(record).__name__} where an object like {{\"messages\": ...}} is expected")
            if first is None:
                first, first_where = detect_format(record, fmt, prompt_column), where
                if first == "text":
                    raise UsageError(f"{source.name} holds no conversations (no 'messages', 'conversations' or 'prompt'/'completion' "
                                     "columns); pass --format to say which columns hold them")
            if fmt == "auto" and row_format(record) != first:
                raise UsageError(format_mismatch(row_format(record), first, first_where, where))
            out.append(conversation(record, first, where, prompt_column, text_column))
            if limit is not None and len(out) >= limit:
                return out
    return out


def _turn(turn: Any, fmt: str, where: str, k: int) -> dict[str, str]:
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
        raise UsageError(f"{where}: turn {k} must be an object with '{role_key}' and '{text_key}' ({fmt} format)")
    role = turn[role_key]
    if fmt == "sharegpt":
        if role not in SHAREGPT_ROLES:
            raise UsageError(f"{where}: turn {k} has unknown role 'from': {role!r}; use human, gpt or system")
        role = SHAREGPT_ROLES[role]
    elif role not in ROLES:
        raise UsageError(f"{where}: turn {k} has unknown role {role!r}; use {', '.join(ROLES)}")
    return {"role": role, "content": turn[text_key]}


def _checked(msgs: list[dict[str, Any]], where: str) -> Conversation:
    for k, m in enumerate(msgs, 1):
        c = m["content"]
        if c is None or (isinstance(c, float) and math.isnan(c)) or (isinstance(c, str) and not c.strip()):
            raise UsageError(f"{where}: turn {k} ({m['role']}) has empty content; fill it in or drop the turn")
        if not isinstance(c, str):
            raise UsageError(f"{where}: turn {k} ({m['role']}) content is a {type(c).__name__}, not text")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UsageError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                         "add the reply or drop the row")
    return Conversation(msgs, where)


# ------------------------------------------------------------------------------------------ templates


def chat_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """A chat prompt as messages: a string is one user turn (after `system`, if given); a list is used as is."""
    if isinstance(prompt, list):
        return prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def render_chat(template: str, messages: list[dict[str, str]], *, bos_token: str | None = None,
                eos_token: str | None = None, add_generation_prompt: bool = True) -> str:
    """Render messages with a Jinja chat template, exactly as `tokenizer.apply_chat_template` does.

    One renderer (transformers') for training, generation and serving, on both backends: the text a model
    is asked to continue is the text it was trained on. A template's own exception (e.g. "roles must
    alternate") becomes a one-line UsageError.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token or "", eos_token=eos_token or "")
    except Exception as e:  # jinja2's TemplateError, or raise_exception() inside the template
        raise UsageError(f"the chat template refused this conversation: {str(e).splitlines()[0][:200]}") from None
    return rendered[0]



def resolve_template(tokenizer: Any, option: str | None, model_name: str) -> str:
    """The chat template to train with: `--chat-template` (chatml or a Jinja file), else the model's own.

    Never guessed: a model without a template and no --chat-template is an error.
    """
    if option:
        if option.lower() == "chatml":
            return CHATML
        path = Path(option).expanduser()
        if not path.is_file():
            raise UsageError(f"--chat-template {option}: no such file; pass chatml or a Jinja template file")
        text = path.read_text(encoding="utf-8")
        check_template(text, str(path))
        return text
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is for chat
        template = template.get("default")
    if not template:
        raise UsageError(f"{model_name} has no chat template; pass --chat-template chatml or --chat-template FILE.jinja "
                         "(the template is saved with the model, so generation and serving use the same one)")
    return template


def check_template(text: str, name: str) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(f"--chat-template {name}:line {e.lineno}: not a valid Jinja template ({e.message})") from None


def add_template_tokens(tokenizer: Any, template: str) -> list[str]:
    """ChatML's markers as special tokens when the tokenizer lacks them; returns those added (embeddings must grow)."""
    if template != CHATML:
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing


# ------------------------------------------------------------------------------------------- encoding


class ChatEncoder:
    """Renders conversations with one template and labels exactly the assistant turns (plus end-of-turn)."""

    def __init__(self, tokenizer: Any, template: str, train_on_prompt: bool = False) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise UsageError("chat fine-tuning needs a fast tokenizer (token offsets); this model's tokenizer is a slow one")
        self.tokenizer, self.template, self.train_on_prompt = tokenizer, template, train_on_prompt
        # special = registered (bos/eos/...) or an added token marked special (<|im_end|>, <|eot_id|>, ...)
        self.special_ids = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.end_of_turn: set[int] = set()  # the token(s) that close an assistant turn: generation must stop there

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        tok = self.tokenizer
        return render_chat(self.template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token,
                           add_generation_prompt=add_generation_prompt)

    def spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant reply + its end-of-turn marker."""
        msgs = conv.messages
        try:
            full = self.render(msgs)
            closing = self._closing(msgs, full)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant" or i < conv.first:
                    continue
                before = self.render(msgs[:i], add_generation_prompt=True)
                through = full if i == len(msgs) - 1 else self.render(msgs[: i + 1])  # the last reply: the whole rendering
                through = through[: len(through) - len(closing)] if closing and through.endswith(closing) else through
                if not (through.startswith(before) and full.startswith(through)):
                    raise UsageError(f"{conv.where}: the chat template renders turn {i + 1} differently depending on what follows it, "
                                     "so the reply cannot be located; use --chat-template chatml or a template without look-ahead")
                # the reply and its end-of-turn token; the newline a template puts between turns is not the model's to say
                end = len(through.rstrip(" \n"))
                spans.append((len(before), end))
        except UsageError as e:
            msg = str(e)
            raise UsageError(msg if msg.startswith(conv.where) else f"{conv.where}: {msg}") from None
        return full, spans

    def _closing(self, msgs: list[dict[str, str]], full: str) -> str:
        """What the template writes only after the last message (special tokens), else "".

        Phi-3's template, for one, ends a conversation with EOS (`{% else %}{{ eos_token }}`): a rendering cut after
        an earlier reply ends with an EOS the whole conversation does not have there. The reply ends before it.
        """
        try:
            longer = self.render([*msgs, {"role": "user", "content": "?"}])
        except UsageError:  # a template that will not take this shape: it has no such ending to find
            return ""
        specials = self.tokenizer.all_special_tokens + [str(t) for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        if longer.startswith(full) or not specials:
            return ""
        only_specials = re.compile("(?:" + "|".join(re.escape(t) for t in sorted(set(specials), key=len, reverse=True)) + ")+")
        for n in range(1, min(len(full), 256) + 1):  # an ending of a few special tokens, not a whole turn
            if only_specials.fullmatch(full[-n:].strip()) and longer.startswith(full[:-n]):
                return full[-n:]
        return ""

    def encode(self, conv: Conversation) -> tuple[list[int], list[int]]:
        return self.encode_batch([conv])[0]

    def encode_batch(self, convs: list[Conversation]) -> list[tuple[list[int], list[int]]]:
        """ids and labels of each conversation (the renderings tokenized in one call: far less overhead per row)."""
        rendered = [self.spans(conv) for conv in convs]
        # the template wrote BOS etc. itself: no special tokens added
        enc = self.tokenizer([full for full, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        return [self._labels(conv, ids, offsets, spans) for conv, ids, offsets, (_, spans)
                in zip(convs, enc["input_ids"], enc["offset_mapping"], rendered, strict=True)]

    def _labels(self, conv: Conversation, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
                ) -> tuple[list[int], list[int]]:
        if self.train_on_prompt:
            return ids, list(ids)
        labels = [-100] * len(ids)
        starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
        for start, end in spans:
            # offsets rise with the position, so the tokens overlapping [start, end) are one run: found by bisection,
            # not by a scan of the whole conversation per reply
            lo, hi = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)
            inside = [k for k in range(lo, hi) if ends[k] > start and starts[k] < end]
            if not inside:
                raise UsageError(f"{conv.where}: an assistant reply maps to no tokens (empty after the template)")
            last = ids[inside[-1]]
            if last not in self.special_ids:
                raise UsageError(f"{conv.where}: the chat template ends assistant replies without a special end-of-turn token "
                                 f"(last token {self.tokenizer.convert_ids_to_tokens(last)!r}), so the model could never learn to stop; "
                                 "use a template that closes each reply with EOS or --chat-template chatml")
            self.end_of_turn.add(last)
            for k in inside:
                labels[k] = ids[k]
        return ids, labels


def encode_conversations(encoder: ChatEncoder, convs: list[Conversation], max_tokens: int
                         ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """ids, labels and kept indices; a conversation cut so that no assistant token is left is dropped."""
    ids, labels, kept = [], [], []
    for k, (seq, lab) in enumerate(encoder.encode_batch(convs)):
        seq, lab = seq[:max_tokens], lab[:max_tokens]
        if any(t != -100 for t in lab[1:]):  # position 0 predicts nothing
            ids.append(seq)
            labels.append(lab)
            kept.append(k)
    return ids, labels, kept


def pack(ids: list[list[int]], labels: list[list[int]], block_size: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Several conversations per block (in order, first fit): ids, labels and position ids restarting per conversation.

    The first token of each conversation gets label -100: in a packed row the loss would otherwise ask the
    previous conversation's last token to predict it. With position ids that restart, transformers' attention
    keeps conversations from seeing each other (its packed-sequence mask), so a packed block computes the same
    loss as the conversations one by one.
    """
    out_ids: list[list[int]] = []
    out_labels: list[list[int]] = []
    out_pos: list[list[int]] = []
    for seq, lab in zip(ids, labels, strict=True):
        if not out_ids or len(out_ids[-1]) + len(seq) > block_size:
            out_ids.append([])
            out_labels.append([])
            out_pos.append([])
        out_ids[-1].extend(seq)
        out_labels[-1].extend([-100, *lab[1:]])
        out_pos[-1].extend(range(len(seq)))
    return out_ids, out_labels, out_pos
