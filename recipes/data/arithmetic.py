"""Make a verifiable arithmetic task: prompts whose answer a reward can check exactly, for the GRPO recipe.

    python recipes/data/arithmetic.py                           # -> data/arithmetic/{train,validation}.jsonl
    python recipes/data/arithmetic.py --train 2000 --max 20 --out data/arithmetic-easy

Each row is {"prompt": [user: "What is 17 + 8? Reply with the number only."], "answer": "25"}: additions and
subtractions of numbers up to --max, seeded, with no question in both files. The recipe rewards the right number
(`exact:answer`) and, with a small weight, a reply that is a bare number at all (`regex:-?[0-9]+`, the format), so
the model first learns the form and then the sums.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

QUESTION = "What is {a} {op} {b}? Reply with the number only."


def problems(rng: random.Random, limit: int) -> dict[tuple[int, str, int], str]:
    """Every (a, op, b) up to `limit` with its answer, in a seeded order."""
    all_ = [(a, op, b) for a in range(limit + 1) for b in range(limit + 1) for op in "+-"]
    rng.shuffle(all_)
    return {p: str(p[0] + p[2] if p[1] == "+" else p[0] - p[2]) for p in all_}


def write(rows: list[dict], dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/arithmetic"), help="output folder")
    ap.add_argument("--train", type=int, default=1000, help="training prompts")
    ap.add_argument("--validation", type=int, default=200, help="held-out prompts")
    ap.add_argument("--max", type=int, default=50, help="largest operand")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    items = list(problems(random.Random(args.seed), args.max).items())
    if len(items) < args.train + args.validation:
        raise SystemExit(f"--max {args.max} makes only {len(items)} distinct problems; raise it or ask for fewer")
    rows = [{"prompt": [{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}], "answer": ans} for (a, op, b), ans in items]
    for name, part in (("train", rows[:args.train]), ("validation", rows[args.train:args.train + args.validation])):
        write(part, args.out / f"{name}.jsonl")
        print(f"{args.out / f'{name}.jsonl'}: {len(part)} prompts")


if __name__ == "__main__":
    main()
