"""String length bounds (minLength/maxLength) around the encoding's thresholds, against a code-point oracle.

Bounds up to 256 characters are one counter, up to ``_FLAT_COUNT`` a flat (deterministic) counter,
beyond that a flat prefix followed by chunk rules of 256. The tests put lengths right at and around
every such boundary, spell characters raw and escaped (an escape is one code point), and check that
every prefix of a string inside the flat part has a single live derivation.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.parser import Recognizer, grammar_accepts
from stencil.grammar.ir import Grammar
from stencil.grammar.json_schema import _FLAT_COUNT, _REPEAT_CHUNK, json_schema_to_grammar

C, F = _REPEAT_CHUNK, _FLAT_COUNT
# Upper bounds at and around every threshold of the encoding (one counter, flat counter, chunk tail).
HIGHS = sorted({C - 1, C, C + 1, 2 * C, F - 1, F, F + 1, F + C - 1, F + C, F + C + 1, F + 3 * C + 7})
# Characters of every UTF-8 width and ones JSON must or may escape.
ALPHABET = "a~é€😀\"\\\n\t\x00\x7f/"


@lru_cache(maxsize=None)
def _grammar(lo: int, hi: int | None) -> Grammar:
    schema: dict = {"type": "string", "minLength": lo}
    if hi is not None:
        schema["maxLength"] = hi
    return json_schema_to_grammar(schema)


def _bounds():
    def lows(hi):
        return st.sampled_from(sorted(x for x in {0, 1, C - 1, C, C + 1, hi // 2, hi - 1, hi} if x <= hi))

    return st.sampled_from(HIGHS).flatmap(lambda hi: st.tuples(lows(hi), st.just(hi)))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(_bounds(), st.data())
def test_lengths_at_the_bounds_match_the_code_point_oracle(bounds, data):
    lo, hi = bounds
    g = _grammar(lo, hi)
    # Lengths at and next to both bounds (and at a chunk boundary inside), built from random characters.
    n = data.draw(st.sampled_from(sorted({max(lo - 1, 0), lo, lo + 1, hi - 1, hi, hi + 1, min(hi, C), min(hi, F)})))
    chars = data.draw(st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=8))
    text = "".join(chars[i % len(chars)] for i in range(n))
    ensure_ascii = data.draw(st.booleans())
    assert grammar_accepts(g, json.dumps(text, ensure_ascii=ensure_ascii).encode()) == (lo <= n <= hi), (lo, hi, n)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(HIGHS), st.text(alphabet=ALPHABET, max_size=40), st.integers(-3, 3))
def test_random_text_near_max_length(hi, piece, delta):
    g = _grammar(0, hi)
    n = max(hi + delta, 0)
    text = (piece * (n // max(len(piece), 1) + 1))[:n] if piece else "x" * n
    assert grammar_accepts(g, json.dumps(text).encode()) == (len(text) <= hi)


def test_min_length_without_max():
    for lo in (C - 1, C, C + 1, F + 5):
        g = _grammar(lo, None)
        for n in (lo - 1, lo, lo + 1, lo + 2 * C):
            assert grammar_accepts(g, json.dumps("é" * n).encode()) == (n >= lo), (lo, n)


def _live_kernel_items(rec: Recognizer) -> int:
    """Items of the current row that were scanned or completed into it (origin before it) and can still move."""
    n = int(rec._meta[0])
    a, b = int(rec._row_ptr[n - 1]), int(rec._row_ptr[n])
    g = rec.grammar
    return sum(1 for i in range(a, b)
               if rec._org[i] < n - 1 and g.edge_ptr[rec._st[i] + 1] > g.edge_ptr[rec._st[i]])


def test_bounded_strings_have_one_derivation_per_prefix_up_to_the_flat_count():
    """Within ``_FLAT_COUNT`` characters a bounded string never keeps two derivations alive (the mask
    walk then stays deterministic); the chunked tail beyond it may."""
    for hi in (C + 1, F, F + 3 * C):
        rec = Recognizer(_grammar(0, hi))
        assert rec.accept_bytes(b'"')
        counts = []
        for _ in range(min(hi, F)):
            assert rec.accept_bytes("é".encode())
            counts.append(_live_kernel_items(rec))
        assert set(counts) == {1}, (hi, np.flatnonzero(np.array(counts) != 1)[:5])


def test_item_counts_at_the_bounds():
    """Large maxItems/minItems use the same counted repetition (of ``, item``)."""
    for lo, hi in ((0, 2 * C + 1), (C + 1, F + 1), (3, F + C + 2)):
        g = json_schema_to_grammar({"type": "array", "items": {"type": "integer"}, "minItems": lo, "maxItems": hi})
        for n in sorted({max(lo - 1, 0), lo, lo + 1, C, C + 1, F, F + 1, hi - 1, hi, hi + 1}):
            for dump in ({}, {"indent": 2}):
                text = json.dumps(list(range(n)), **dump).encode()
                assert grammar_accepts(g, text) == (lo <= n <= hi), (lo, hi, n, dump)
