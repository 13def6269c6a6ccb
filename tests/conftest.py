"""Fixtures shared by every test: where ../shared lives, and skipping cleanly when it is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STENCIL_SHARED", REPO.parent / "shared"))
TOKENIZERS = ("gpt2", "llama2", "llama3", "qwen2", "phi3", "mistral")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with a clear reason if it is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: these tests read the project's shared fixtures (../shared)")
    return p


def tokenizer_dir(name: str) -> Path:
    return shared_path("tokenizers", name)


def tokenizer_meta(name: str) -> dict:
    return json.loads((tokenizer_dir(name) / "meta.json").read_text())


def jsonschemabench_records(split: str | None = None) -> list[dict]:
    """Records of ../shared/jsonschemabench/dev (one split, or all)."""
    d = shared_path("jsonschemabench", "dev")
    files = [d / f"{split}.jsonl"] if split else sorted(d.glob("*.jsonl"))
    out = []
    for f in files:
        with f.open() as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out
