"""Chat encoding: conversations in, token ids with assistant-only labels out (and packing of several per block).

    >>> from llmkit.data.chat import ChatEncoder
    >>> from llmkit.data.formats import read_conversations
    >>> from llmkit.models.templates import resolve_template
    >>> convs = read_conversations("chat.jsonl")
    >>> enc = ChatEncoder(tokenizer, resolve_template(tokenizer, None, "smollm2-135m"))
    >>> ids, labels = enc.encode(convs[0])        # labels: -100 except on every assistant turn + its end-of-turn

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
import re
from typing import Any

from llmkit.data.formats import Conversation
from llmkit.errors import UsageError
from llmkit.models.templates import render_chat


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
