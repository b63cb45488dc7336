"""Three small demo tasks whose data the project writes itself (deterministic, no downloads).

- json-extract: a sentence about a person -> {"name": ..., "age": ..., "city": ...} (a format task)
- sentiment:    a short product/place review -> "positive" or "negative" (a classification task)
- pirate:       a plain sentence -> the same sentence said like a pirate (a style task)

Every record is a chat ({"messages": [user, assistant]}); the user turn states the task, so the base
model has a fair chance, and the adapter must beat it on held-out examples.

    python -m adapterserve.training.demo_tasks --out demo/data
writes demo/data/<task>/{train,eval}.jsonl (train and eval never share a user prompt).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

_NAMES = (
    "Maria Ahmed Chen Olga Pedro Aisha Liam Sofia Kenji Fatima Lucas Emma Ravi Nora Diego Yuki Omar Hana "
    "Ivan Lea Tomas Zara Felix Mila Arjun Ines Hugo Amara Leo Elif Mateo Sara Jonas Priya Theo Ana Karim Lina"
).split()
_CITIES = (
    "Lisbon Paris Berlin Madrid Rome Vienna Prague Oslo Dublin Warsaw Athens Cairo Lagos Nairobi Tokyo "
    "Seoul Lima Quito Toronto Chicago Boston Denver Sydney Perth Delhi Mumbai Hanoi Manila Dakar Tunis"
).split()
_JSON_TEMPLATES = (
    "{name} is {age} years old and lives in {city}.",
    "{name} lives in {city} and is {age} years old.",
    "Meet {name}, {age}, from {city}.",
    "At {age}, {name} moved to {city}.",
    "{name} ({age}) works in {city}.",
    "Our new colleague {name} is {age} and comes from {city}.",
)

_SUBJECTS = (
    "the food",
    "the service",
    "this movie",
    "the hotel room",
    "the battery",
    "the staff",
    "this book",
    "the coffee",
    "the concert",
    "the app",
    "the delivery",
    "this phone",
    "the museum",
    "the beach",
    "the game",
)
_POSITIVE = (
    "was wonderful",
    "exceeded my expectations",
    "was absolutely delightful",
    "made my day",
    "was fantastic",
    "is worth every penny",
    "was a pleasant surprise",
    "works perfectly",
    "was excellent",
    "left me very happy",
)
_NEGATIVE = (
    "was terrible",
    "was a complete waste of money",
    "broke after one day",
    "left me disappointed",
    "was awful",
    "was painfully slow",
    "is not worth it",
    "was rude and careless",
    "made me angry",
    "was a total letdown",
)
_OPENERS = ("", "Honestly, ", "Well, ", "I must say ", "To be fair, ", "Overall, ")

_PIRATE_WORDS = {
    "hello": "ahoy",
    "hi": "ahoy",
    "my": "me",
    "friend": "matey",
    "friends": "mateys",
    "you": "ye",
    "your": "yer",
    "is": "be",
    "are": "be",
    "yes": "aye",
    "the": "th'",
    "money": "doubloons",
    "ship": "vessel",
    "boat": "vessel",
    "stop": "avast",
    "look": "behold",
    "wow": "blimey",
}
_PIRATE_SENTENCES = (
    "{greet} {who}, {q}",
    "{greet} {who}, {s}",
    "{s}",
    "{q}",
)
_GREETS = ("hello", "hi", "wow", "look", "stop", "yes")
_WHOS = ("my friend", "my friends", "you")
_THINGS = ("ship", "boat", "money", "map", "treasure", "island", "captain", "parrot", "anchor", "crew")
_QUESTIONS = (
    "is the {t} ready?",
    "where is my {t}?",
    "are you looking for the {t}?",
    "is your {t} on the island?",
    "did you see the {t}?",
)
_STATEMENTS = (
    "the {t} is near the harbor.",
    "my {t} is very old.",
    "you are late for the {t}.",
    "your {t} is safe with my friends.",
    "the {t} and the {u} are gone.",
)


def _json_example(rng: random.Random) -> tuple[str, str]:
    name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 90)
    sentence = rng.choice(_JSON_TEMPLATES).format(name=name, age=age, city=city)
    prompt = f"Extract the person as JSON with keys name, age, city: {sentence}"
    return prompt, json.dumps({"name": name, "age": age, "city": city})


def _sentiment_example(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(("positive", "negative"))
    phrase = rng.choice(_POSITIVE if label == "positive" else _NEGATIVE)
    review = f"{rng.choice(_OPENERS)}{rng.choice(_SUBJECTS)} {phrase}."
    review = review[0].upper() + review[1:]
    return f"Is this review positive or negative? {review}", label


def piratify(sentence: str) -> str:
    """The deterministic pirate rewrite: word substitutions, a capital first letter and ' Arr!' at the end."""
    out = []
    for token in sentence.split(" "):
        core = token.rstrip(",.?!")
        tail = token[len(core) :]
        repl = _PIRATE_WORDS.get(core.lower(), core.lower())
        out.append(repl + tail)
    text = " ".join(out)
    return text[0].upper() + text[1:] + " Arr!"


def _pirate_example(rng: random.Random) -> tuple[str, str]:
    t, u = rng.sample(_THINGS, 2)
    q = rng.choice(_QUESTIONS).format(t=t)
    s = rng.choice(_STATEMENTS).format(t=t, u=u)
    plain = rng.choice(_PIRATE_SENTENCES).format(greet=rng.choice(_GREETS), who=rng.choice(_WHOS), q=q, s=s)
    plain = plain[0].upper() + plain[1:]
    return f"Say it like a pirate: {plain}", piratify(plain)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "json-extract": _json_example,
    "sentiment": _sentiment_example,
    "pirate": _pirate_example,
}


def make_task(task: str, *, train_size: int, eval_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) chat records for `task`; all user prompts are distinct, so the split never leaks."""
    rng = random.Random(f"{task}:{seed}")
    make = TASKS[task]
    seen: dict[str, str] = {}
    attempts = 0
    while len(seen) < train_size + eval_size:
        attempts += 1
        if attempts > 100 * (train_size + eval_size):
            raise ValueError(f"{task}: cannot make {train_size + eval_size} distinct examples")
        prompt, answer = make(rng)
        seen.setdefault(prompt, answer)
    items = list(seen.items())
    records = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in items
    ]
    return records[:train_size], records[train_size:]


def write_demo_data(
    out_dir: Path, *, train_size: int = 400, eval_size: int = 40, seed: int = 0
) -> list[Path]:
    """Write <out_dir>/<task>/{train,eval}.jsonl for every task; returns the files written."""
    written = []
    for task in TASKS:
        train, held_out = make_task(task, train_size=train_size, eval_size=eval_size, seed=seed)
        folder = out_dir / task
        folder.mkdir(parents=True, exist_ok=True)
        for name, records in (("train", train), ("eval", held_out)):
            path = folder / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo/data"))
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--eval-size", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_demo_data(
        args.out, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed
    ):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
