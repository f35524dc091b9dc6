"""Make sentiment-as-chat prompts from the rt-polarity CSVs: what the GRPO sentiment recipe learns from.

    python recipes/data/sentiment_prompts.py                    # -> data/sentiment-prompts/{train,validation}.jsonl
    python recipes/data/sentiment_prompts.py --limit 256 --out data/sentiment-prompts-small

Each row is {"prompt": [user: the review + the question recipes/data/sentiment_chat.py asks], "answer": "positive" |
"negative"}: the prompt is rendered with the model's chat template, and `--reward exact:answer` compares the
model's reply with `answer` (case, whitespace and trailing punctuation do not count). No reference answer is ever
shown to the model: it learns from the reward alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sentiment_chat import QUESTION, SOURCE, convert


def prompt(review: str, label: str) -> dict:
    return {"prompt": [{"role": "user", "content": f"Review: {review.strip()}\n{QUESTION}"}],
            "answer": "positive" if label.strip() == "1" else "negative"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE, help="folder with train.csv and validation.csv (text,label)")
    ap.add_argument("--out", type=Path, default=Path("data/sentiment-prompts"), help="output folder")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows of each file")
    args = ap.parse_args()
    for split in ("train", "validation"):
        n = convert(args.source / f"{split}.csv", args.out / f"{split}.jsonl", args.limit, prompt)
        print(f"{args.out / f'{split}.jsonl'}: {n} prompts")


if __name__ == "__main__":
    main()
