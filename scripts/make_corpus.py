"""Generate the training corpus of Stencil's default model (deterministic for a given seed).

The default model is a small demo LM: what it must learn is the *shape* of structured output (JSON
instances, tool calls, short answers), so that constrained decoding with it finishes quickly and
looks sensible. The corpus mixes, all in the chat format of the packaged chat template
(``user: ...\\nassistant:\\n<output>`` followed by ``<|endoftext|>``):

* ``schema``: valid instances (``tests`` with ``valid: true``, at most 200 characters) of the
  schemas in ``../shared/jsonschemabench/dev``, with a prompt naming the schema and its keys;
* ``example``: synthetic instances of the schemas shipped in ``examples/`` (person, event);
* ``tool``: tool-call transcripts from the BFCL and Glaive records of the dev set (function name and
  ground-truth arguments), written in one of three formats: Hermes/Qwen (``<tool_call>`` tags),
  Llama-3.1 JSON (``{"name": ..., "parameters": ...}``) and Mistral (``[TOOL_CALLS] [...]``),
  drawn at random per transcript;
* ``short``: short answers (yes/no, sentiment, dates, phone numbers, arithmetic);
* ``prose``: short templated sentences.

Usage: ``python scripts/make_corpus.py --out corpus.jsonl [--seed 0] [--shared ../shared]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"
MAX_INSTANCE_CHARS = 200

FIRST = ["Alice", "Bob", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yara", "Zoe"]
LAST = ["Smith", "Garcia", "Chen", "Novak", "Okafor", "Rossi", "Silva", "Tanaka", "Weber", "Kowalski", "Haddad"]
CITIES = ["Paris", "Berlin", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Madrid", "Seoul", "Toronto",
          "Nairobi", "Lisbon", "Dublin", "Mumbai", "Sydney"]
HOBBIES = ["chess", "hiking", "painting", "cooking", "running", "reading", "guitar", "cycling", "gardening",
           "photography", "swimming", "climbing", "knitting", "poetry"]
TOPICS = ["the sea", "mountains", "coffee", "trains", "the moon", "rain", "libraries", "bicycles", "bread",
          "winter", "music", "gardens", "rivers", "old maps", "the city at night"]
ADJ = ["quiet", "bright", "old", "busy", "gentle", "strange", "warm", "cold", "small", "wide"]
VERBS = ["waits", "shines", "moves", "sleeps", "grows", "turns", "sings", "rests"]
EVENT_WORDS = ["Planning", "Budget", "Design", "Team", "Launch", "Review", "Kickoff", "Sync", "Retro"]


def chat(user: str, answer: str, system: str | None = None) -> str:
    """One example in the format of the packaged chat template (the model adds ``<|endoftext|>``)."""
    head = f"system: {system}\n" if system else ""
    return f"{head}user: {user}\nassistant:\n{answer}"


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _records(shared: Path):
    for f in sorted((shared / "jsonschemabench" / "dev").glob("*.jsonl")):
        with f.open() as fh:
            for line in fh:
                if line.strip():
                    yield f.stem, json.loads(line)


def _schema_name(rid: str) -> str:
    name = rid.removesuffix(".json")
    if "---" in name:
        name = name.split("---", 1)[1].rsplit("_", 1)[0]
    return name.replace("_", " ")


def schema_examples(shared: Path, rng: random.Random) -> list[str]:
    out = []
    for source, rec in _records(shared):
        if source.startswith("BFCL"):
            continue  # used as tool calls instead
        schema = rec.get("schema")
        title = schema.get("title") if isinstance(schema, dict) else None
        name = title if isinstance(title, str) and len(title) < 60 else _schema_name(rec["id"])
        for t in rec.get("tests", []):
            if not t.get("valid"):
                continue
            text = dumps(t["data"])
            if len(text) > MAX_INSTANCE_CHARS:
                continue
            if isinstance(t["data"], dict) and t["data"]:
                keys = ", ".join(list(t["data"])[:6])
                prompt = rng.choice([
                    f"Return a JSON object for {name} with the keys {keys}.",
                    f"Give me {name} as JSON.",
                    f"Fill in the {name} record ({keys}) as JSON.",
                ])
            else:
                prompt = rng.choice([f"Return a JSON value for {name}.", f"Give me {name} as JSON."])
            out.append(chat(prompt, text))
    return out


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2019, 2027)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def example_examples(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        first = rng.choice(FIRST)
        person = {"name": f"{first} {rng.choice(LAST)}" if rng.random() < 0.6 else first, "age": rng.randint(3, 95)}
        if rng.random() < 0.7:
            person["city"] = rng.choice(CITIES)
        if rng.random() < 0.6:
            person["hobbies"] = rng.sample(HOBBIES, rng.randint(1, 3))
        prompt = rng.choice([
            "Give me a person as JSON.",
            f"Describe a person named {first} as JSON.",
            "Generate a person record.",
            f"Invent someone from {person.get('city', rng.choice(CITIES))} and return JSON.",
            "Return a JSON object for Person with the keys name, age, city, hobbies.",
        ])
        out.append(chat(prompt, dumps(person)))
        event = {
            "title": f"{rng.choice(EVENT_WORDS)} {rng.choice(['meeting', 'call', 'session', 'lunch'])}",
            "date": _date(rng),
            "kind": rng.choice(["meeting", "call", "lunch", "conference"]),
            "attendees": rng.sample(FIRST, rng.randint(1, 4)),
        }
        if rng.random() < 0.5:
            event["online"] = rng.random() < 0.5
        prompt = rng.choice(["Plan an event as JSON.", "Give me a calendar event.",
                             f"Schedule a {event['kind']} and return it as JSON.",
                             "Return a JSON object for Event with the keys title, date, kind, attendees."])
        out.append(chat(prompt, dumps(event)))
    return out


def _tool_calls(shared: Path):
    """(function name, parameters schema, arguments) triples from BFCL and Glaive records."""
    for source, rec in _records(shared):
        schema = rec.get("schema")
        if source.startswith("BFCL") and isinstance(schema, dict) and len(schema.get("properties", {})) == 1:
            (fname, params), = schema["properties"].items()
            for t in rec.get("tests", []):
                if t.get("valid") and isinstance(t["data"], dict) and fname in t["data"]:
                    yield fname, params, t["data"][fname]
        elif source == "Glaiveai2K" and "---" in rec["id"] and isinstance(schema, dict):
            fname = rec["id"].split("---", 1)[1].removesuffix(".json").rsplit("_", 1)[0]
            for t in rec.get("tests", []):
                if t.get("valid") and isinstance(t["data"], dict):
                    yield fname, schema, t["data"]
                    break


def format_tool_call(fmt: str, calls: list[tuple[str, dict]]) -> str:
    """The assistant turn for ``calls`` in one of the three supported tool-call formats."""
    if fmt == "hermes":
        return "\n".join(f"<tool_call>\n{dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls)
    if fmt == "llama3_json":
        return ";".join(dumps({"name": n, "parameters": a}) for n, a in calls)
    if fmt == "mistral":
        return "[TOOL_CALLS] " + dumps([{"name": n, "arguments": a} for n, a in calls])
    raise ValueError(fmt)


def tool_examples(shared: Path, rng: random.Random) -> list[str]:
    triples = [t for t in _tool_calls(shared) if len(dumps(t[2])) <= MAX_INSTANCE_CHARS]
    names = sorted({t[0] for t in triples})
    out = []
    for fname, _params, args in triples:
        others = rng.sample(names, min(2, len(names)))
        tools = ", ".join(dict.fromkeys([fname, *others]))
        words = fname.replace("_", " ").replace(".", " ")
        arg_text = ", ".join(f"{k} {v}" for k, v in list(args.items())[:3] if isinstance(v, (str, int, float)))
        user = rng.choice([f"Please {words}" + (f" with {arg_text}" if arg_text else "") + ".",
                           f"Call {fname} for me.", f"I need {words}."])
        fmt = rng.choice(("hermes", "llama3_json", "mistral"))
        out.append(chat(user, format_tool_call(fmt, [(fname, args)]), system=f"tools: {tools}"))
    return out


def short_examples(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            topic = rng.choice(TOPICS)
            ans = rng.choice(["yes", "no"])
            out.append(chat(f"Is {topic} {rng.choice(ADJ)}? Answer yes or no.", ans))
        elif kind == 1:
            mood = rng.choice(["positive", "negative", "neutral"])
            word = {"positive": "loved", "negative": "hated", "neutral": "saw"}[mood]
            out.append(chat(f"Sentiment of: I {word} {rng.choice(TOPICS)}.", mood))
        elif kind == 2:
            out.append(chat("Give me a date.", _date(rng)))
        elif kind == 3:
            out.append(chat("Give me a phone number.", f"{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"))
        else:
            a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 9)
            op = rng.choice("+-*")
            out.append(chat("Write a sum of three numbers." if op == "+" else "Write an arithmetic expression.",
                            f"{a}{op}{b}{rng.choice('+-')}{c}"))
    return out


def prose_examples(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        s1 = f"{topic[0].upper()}{topic[1:]} is {rng.choice(ADJ)} and {rng.choice(ADJ)}."
        s2 = f"{rng.choice(FIRST)} lives in {rng.choice(CITIES)} and likes {rng.choice(HOBBIES)}."
        s3 = f"The {rng.choice(ADJ)} {rng.choice(['river', 'street', 'garden', 'train'])} {rng.choice(VERBS)}."
        sentences = [s1, s2, s3]
        rng.shuffle(sentences)
        out.append(chat(rng.choice([f"Tell me about {topic}.", "Write a short sentence.", "Say something."]),
                        " ".join(sentences[: rng.randint(1, 3)])))
    return out


def build_corpus(shared: Path, seed: int = 0) -> list[dict]:
    """Every example as ``{"kind": ..., "text": ...}``, shuffled with ``seed``."""
    rng = random.Random(seed)
    parts = {
        "schema": schema_examples(shared, rng),
        "example": example_examples(rng, 600),
        "tool": tool_examples(shared, rng),
        "short": short_examples(rng, 600),
        "prose": prose_examples(rng, 500),
    }
    rows = [{"kind": k, "text": t} for k, texts in parts.items() for t in texts]
    rng.shuffle(rows)
    return rows


def corpus_digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r["text"].encode("utf-8") + b"\0")
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    args = ap.parse_args()
    rows = build_corpus(args.shared, args.seed)
    with args.out.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(rows)} examples {dict(Counter(r['kind'] for r in rows))} sha256 {corpus_digest(rows)}")


if __name__ == "__main__":
    main()
