"""Speculative decoding: validate_tokens, exact rollback at any depth, one mask row per draft position.

The oracle is a fresh matcher that replays the kept tokens from the start. Random
accept/rollback sequences (hypothesis) must leave the matcher with the same masks, completion and
termination as that replay. Draft rows must equal the replay's masks after each draft prefix.
Masks are also checked once per example against the brute-force mask, so a fault in the mask
cache shared by both matchers cannot hide.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from stencil.decode.matcher import GrammarMatcher, pack_bool_mask
from stencil.decode.speculative import fill_draft_bitmasks
from stencil.errors import StencilError
from stencil.grammar.compiler import GrammarCompiler
from stencil.grammar.vocab import TokenizerInfo
from tests.conftest import tokenizer_dir, tokenizer_meta

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bc", "def"]}},
        "n": {"type": "integer"},
        "ok": {"type": "boolean"},
    },
    "required": ["name"],
}
VALID = '{"name": "Ada Lovelace", "tags": ["bc", "a"], "n": -42, "ok": true}'


@functools.cache
def setup(name: str):
    """(info, compiled schema, token ids of a valid instance) for a tokenizer."""
    d = tokenizer_dir(name)
    info = TokenizerInfo.from_file(d, vocab_size=tokenizer_meta(name)["model_vocab_size"])
    cg = GrammarCompiler(info, warm_up=False).compile_json_schema(SCHEMA)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    # Mid-text tokens: the instance after a newline anchor, so no SentencePiece "▁" leads it.
    ids = tok.encode("\n" + VALID, add_special_tokens=False).ids
    while b"".join(info.decoded_vocab[t] for t in ids) != VALID.encode():
        ids = ids[1:]
    return info, cg, ids


def mask_of(m: GrammarMatcher) -> np.ndarray:
    row = np.zeros((1, m._cache.words), np.int32)
    m.fill_next_token_bitmask(row, 0)
    return row[0]


def snapshot(m: GrammarMatcher) -> tuple:
    return m.num_accepted_tokens, m.is_completed(), m.is_terminated(), mask_of(m).tobytes()


def replay(cg, ids) -> GrammarMatcher:
    m = GrammarMatcher(cg)
    for t in ids:
        assert m.accept_token(t)
    return m


def allowed_ids(m: GrammarMatcher) -> np.ndarray:
    bits = np.unpackbits(mask_of(m).view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[: m.compiled.vocab_size])


OPS = st.lists(st.tuples(st.sampled_from(["follow", "allowed", "random", "rollback"]), st.integers(0, 2**31 - 1)),
               min_size=1, max_size=14)


@settings(max_examples=20, deadline=None)
@given(OPS)
def test_accept_and_rollback_equal_a_fresh_replay(ops):
    info, cg, valid_ids = setup("gpt2")
    m = GrammarMatcher(cg)
    kept: list[int] = []
    for op, seed in ops:
        if op == "rollback":
            k = seed % (len(kept) + 1)
            m.rollback(k)
            del kept[len(kept) - k :]
        else:
            if op == "follow" and len(kept) < len(valid_ids) and kept == valid_ids[: len(kept)]:
                t = valid_ids[len(kept)]
            elif op in ("follow", "allowed"):
                choices = allowed_ids(m)
                t = int(choices[seed % len(choices)]) if len(choices) else seed % info.vocab_size
            else:
                t = seed % info.vocab_size
            if m.accept_token(t):
                kept.append(t)
        assert snapshot(m) == snapshot(replay(cg, kept)), (ops, kept)
    assert np.array_equal(mask_of(m), pack_bool_mask(m.brute_force_mask()))
    with pytest.raises(StencilError):
        m.rollback(len(kept) + 1)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 40), st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_validate_tokens_is_the_longest_accepted_prefix(start, seed, length):
    info, cg, valid_ids = setup("gpt2")
    rng = np.random.default_rng(seed)
    start = min(start, len(valid_ids))
    m = replay(cg, valid_ids[:start])
    draft = list(valid_ids[start : start + length])
    if draft and rng.random() < 0.7:  # corrupt one position
        draft[int(rng.integers(len(draft)))] = int(rng.integers(info.vocab_size))
    before = snapshot(m)
    n = m.validate_tokens(draft)
    assert snapshot(m) == before
    oracle = replay(cg, valid_ids[:start])
    want = 0
    for t in draft:
        if not oracle.accept_token(t):
            break
        want += 1
    assert n == want


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("start", [0, 5, 17])
def test_draft_rows_equal_replayed_masks(as_torch, start):
    info, cg, valid_ids = setup("gpt2")
    rng = np.random.default_rng(start)
    prefix = valid_ids[:start]
    for corrupt in (None, 0, 2, 4):
        draft = list(valid_ids[start : start + 5])
        if corrupt is not None:
            draft[corrupt] = int(rng.integers(info.vocab_size))
        m = replay(cg, prefix)
        before = snapshot(m)
        sentinel = np.int32(0x5A5A5A5A)
        rows = np.full((3 + len(draft) + 1, m._cache.words), sentinel, np.int32)
        bitmask = torch.from_numpy(rows) if as_torch else rows
        n = m.fill_draft_bitmasks(draft, bitmask, 2) if as_torch else fill_draft_bitmasks(m, draft, bitmask, 2)
        assert snapshot(m) == before
        assert n == m.validate_tokens(draft)
        for i in range(len(rows)):
            if 2 <= i <= 2 + n:
                assert np.array_equal(rows[i], mask_of(replay(cg, prefix + draft[: i - 2]))), i
            else:
                assert (rows[i] == sentinel).all(), f"row {i} should not have been written"


def test_draft_through_a_stop_token_and_bad_input():
    """phi3: two stop tokens and padding ids. After a stop token the row is empty and nothing is accepted."""
    info, cg, valid_ids = setup("phi3")
    m = replay(cg, valid_ids[:-1])
    stop = info.stop_token_ids[1]
    draft = [valid_ids[-1], stop, valid_ids[0]]
    rows = np.full((len(draft) + 1, m._cache.words), -1, np.int32)
    assert fill_draft_bitmasks(m, draft, rows) == 2
    assert rows[0][valid_ids[-1] >> 5] >> (valid_ids[-1] & 31) & 1
    assert rows[1][stop >> 5] >> (stop & 31) & 1
    assert not rows[2].any()  # terminated: nothing is allowed, not even the padding
    assert (rows[3] == -1).all()
    assert not m.is_terminated() and m.num_accepted_tokens == len(valid_ids) - 1
    # A padding id is rejected where it stands.
    pad = int(info.padding_ids[0])
    assert fill_draft_bitmasks(m, [pad, valid_ids[-1]], rows[:3]) == 0
    with pytest.raises(StencilError):
        fill_draft_bitmasks(m, draft, rows[:3])  # needs len(draft) + 1 rows
    with pytest.raises(StencilError):
        fill_draft_bitmasks(m, [], rows, start_index=-1)
    with pytest.raises(StencilError):
        fill_draft_bitmasks(m, [], [[0]])
