"""Make sentiment preference pairs from the rt-polarity CSVs: what the DPO recipe trains and evaluates on.

    python recipes/data/sentiment_pairs.py                      # -> data/sentiment-pairs/{train,validation}.jsonl
    python recipes/data/sentiment_pairs.py --variant format     # the harder set (below)
    python recipes/data/sentiment_pairs.py --limit 512 --out data/sentiment-pairs-small

Each row is {"prompt": the review + the question recipes/data/sentiment_chat.py asks, "chosen": the right
one-word answer, "rejected": ...}:
  label   (default) the wrong one-word answer: the model must tell the sentiment;
  format  the right sentiment in the verbose sentence the bundled model answers with zero-shot ("The sentiment of
          this review is positive."): both responses name the right sentiment, so only the answer's form is preferred,
          and the rejected one is the more likely of the two before training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sentiment_chat import QUESTION, SOURCE, convert


def pair(review: str, label: str, variant: str = "label") -> dict:
    right, wrong = ("positive", "negative") if label.strip() == "1" else ("negative", "positive")
    rejected = wrong if variant == "label" else f"The sentiment of this review is {right}."
    return {"prompt": f"Review: {review.strip()}\n{QUESTION}", "chosen": right, "rejected": rejected}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE, help="folder with train.csv and validation.csv (text,label)")
    ap.add_argument("--out", type=Path, default=Path("data/sentiment-pairs"), help="output folder")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows of each file")
    ap.add_argument("--variant", choices=("label", "format"), default="label", help="what the rejected response gets wrong")
    args = ap.parse_args()
    for split in ("train", "validation"):
        n = convert(args.source / f"{split}.csv", args.out / f"{split}.jsonl", args.limit,
                    lambda review, label: pair(review, label, args.variant))
        print(f"{args.out / f'{split}.jsonl'}: {n} pairs")


if __name__ == "__main__":
    main()
