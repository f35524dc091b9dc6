"""Make sentiment-as-chat conversations from the rt-polarity CSVs: what the chat recipes train and evaluate on.

    python recipes/data/sentiment_chat.py                       # -> data/sentiment-chat/{train,validation}.jsonl
    python recipes/data/sentiment_chat.py --limit 512 --out data/sentiment-chat-small

Each row becomes {"messages": [user: the review + a question, assistant: "positive" | "negative"]}, the
OpenAI format `llmkit finetune` and `llmkit evaluate` read. The question is the one GUIDE §3 measured the
bundled model on zero-shot (~34% exact answers), so the fine-tune's gain is measured against that.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable
from pathlib import Path

QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word."
SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "rt-polarity"


def conversation(review: str, label: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Review: {review.strip()}\n{QUESTION}"},
                         {"role": "assistant", "content": "positive" if label.strip() == "1" else "negative"}]}


def convert(src: Path, dst: Path, limit: int | None, make: Callable[[str, str], dict] = conversation) -> int:
    """The first `limit` rows of a text,label CSV, each as `make(review, label)`, into a JSONL file (written atomically)."""
    with open(src, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(make(r["text"], r["label"]), ensure_ascii=False) + "\n")
    tmp.replace(dst)
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE, help="folder with train.csv and validation.csv (text,label)")
    ap.add_argument("--out", type=Path, default=Path("data/sentiment-chat"), help="output folder")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows of each file")
    args = ap.parse_args()
    for split in ("train", "validation"):
        n = convert(args.source / f"{split}.csv", args.out / f"{split}.jsonl", args.limit)
        print(f"{args.out / f'{split}.jsonl'}: {n} conversations")


if __name__ == "__main__":
    main()
