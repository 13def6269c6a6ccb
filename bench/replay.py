"""What the in-process replay scripts share: their common options, the tokenizer they name, and the
token ids of a record's first valid instance (the sampling of records is ``masks.load_records``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from masks import SHARED


def arguments(description: str, n: int = 30) -> argparse.ArgumentParser:
    """A parser with ``--tokenizer``, ``--n`` (records to sample, default ``n``) and ``--seed``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="llama3")
    ap.add_argument("--n", type=int, default=n, help=f"records to sample (default {n})")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def tokenizer_dir(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The directory of ``--tokenizer`` under ../shared/tokenizers; an argparse error for a bad
    ``--n`` or a tokenizer that is not there."""
    if args.n < 1:
        ap.error(f"--n must be at least 1, not {args.n}")
    path = SHARED / "tokenizers" / args.tokenizer
    if not (path / "tokenizer.json").is_file():
        ap.error(f"no tokenizer {args.tokenizer!r} under {path.parent}")
    return path


def first_instance_ids(hf, rec: dict) -> list[int]:
    """The HF tokenizer's ids for ``json.dumps`` of the record's first valid instance, as the benchmark replays it."""
    return hf.encode(json.dumps(rec["instances"][0]), add_special_tokens=False)
