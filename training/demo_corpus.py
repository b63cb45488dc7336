"""Demo data of the pt and dpo stages, generated deterministically (no download):

- `harbour-pt/`: a small domain corpus, the logs of a fictional harbour (Velmora): `train.txt` and
  `eval.txt`, documents separated by blank lines. Held-out documents are distinct from training ones.
  Continued pretraining on it should lower the held-out perplexity (scored through the server).
- `pirate-dpo/`: preference pairs in chat form: the user asks "Say it like a pirate: <sentence>";
  `chosen` is the pirate rewrite (training.demo_tasks.piratify), `rejected` the sentence unchanged.

    python -m adapterserve.training.demo_corpus --out demo/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from adapterserve.training.demo_tasks import _pirate_example

_SHIPS = ("Grey Heron", "Saltmarsh", "Northern Star", "Kestrel", "Amber Tide", "Lantern", "Osprey", "Marlow")
_PORTS = ("Oskar Bay", "Tiranel", "Hollowmere", "Cape Dunmore", "Fennick", "Port Aldous")
_CARGO = ("salted cod", "copper wire", "barley", "lamp oil", "oak timber", "wool bales", "rope", "tin plates")
_MASTERS = ("Ilse Varn", "Tobin Reed", "Maren Holt", "Edric Vale")
_WINDS = ("calm", "light westerly", "fresh northerly", "strong easterly", "gusty southerly")
_MONTHS = ("March", "April", "May", "June", "July", "August", "September")
_EVENTS = (
    "The {ship} was moored at the east quay and unloaded by noon.",
    "The {ship} waited outside the breakwater until the tide turned.",
    "Pilot boats guided the {ship} past the Velmora shoals.",
    "The harbour bell was rung twice as the {ship} entered.",
    "Customs officers sealed the hold of the {ship} for inspection.",
)


def harbour_document(rng: random.Random, day: int) -> str:
    ship, port, cargo = rng.choice(_SHIPS), rng.choice(_PORTS), rng.choice(_CARGO)
    lines = [
        f"Harbour log of Velmora, day {day} of {rng.choice(_MONTHS)}.",
        f"The {ship} arrived from {port} carrying {rng.randint(2, 40)} tons of {cargo}.",
        f"Harbour master {rng.choice(_MASTERS)} recorded a tide of {rng.randint(1, 6)}.{rng.randint(0, 9)} metres "
        f"and a {rng.choice(_WINDS)} wind.",
        rng.choice(_EVENTS).format(ship=ship),
    ]
    return "\n".join(lines)


def harbour_corpus(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    docs: list[str] = []
    day = 1
    while len(docs) < train_size + eval_size:
        doc = harbour_document(rng, day)
        day = day % 28 + 1
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs[:train_size], docs[train_size:]


def pirate_pairs(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    pairs: list[dict] = []
    seen: set[str] = set()
    while len(pairs) < train_size + eval_size:
        prompt, pirate = _pirate_example(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        plain = prompt.split(": ", 1)[1]
        pairs.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": pirate}],
                "rejected": [{"role": "assistant", "content": plain}],
            }
        )
    return pairs[:train_size], pairs[train_size:]


def write_demo_corpora(out: Path) -> list[Path]:
    written = []
    train, held = harbour_corpus(300, 40)
    (out / "harbour-pt").mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.txt", train), ("eval.txt", held)):
        path = out / "harbour-pt" / name
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        written.append(path)
    train_pairs, held_pairs = pirate_pairs(200, 40)
    (out / "pirate-dpo").mkdir(parents=True, exist_ok=True)
    for name, records in (("train.jsonl", train_pairs), ("eval.jsonl", held_pairs)):
        path = out / "pirate-dpo" / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapterserve.training.demo_corpus")
    parser.add_argument("--out", type=Path, default=Path("demo/data"))
    args = parser.parse_args(argv)
    for path in write_demo_corpora(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
