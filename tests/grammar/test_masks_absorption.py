"""Bulk acceptance by closed sets and byte classes in the mask cache's walk, against the brute-force oracle.

The walk accepts a trie subtree without reading it when the configuration it starts from absorbs
every character in it. Besides self-loops, a configuration absorbs the characters of a *closed set*
of configurations (a counter's positions, a word being tracked, a key that must differ from listed
names), found by a search over one byte per grammar byte class. These tests check that

* byte classes are sound: two bytes of a class are read alike by every state and every FIRST set;
* masks equal the brute-force oracle at states of grammars whose automata count or track words
  (unanchored ``pattern``, ``maxLength`` counters near and far from the bound, object keys that
  must avoid the listed properties, multi-byte characters in all of them), on every tokenizer;
* the closed-set path does fire: classifying the first content state of an unanchored
  ``[0-9a-f]{12}`` search reads a small part of the vocabulary trie, where walking it would read
  most of it (the count is exact, not a timing).
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from stencil.decode.matcher import GrammarMatcher
from stencil.decode.parser import grammar_arrays
from stencil.grammar.compiler import bind
from stencil.grammar.masks import _UTF8_CUTS, MaskCache, byte_classes, grammar_sets
from tests.conftest import TOKENIZERS
from tests.decode.test_masks import check_state, compiler, random_grammars, tokenizer, walk_and_check

# Per tokenizer: states checked per grammar (the oracle costs 10-100 ms a state on 128k vocabularies).
STATES = {"gpt2": 24, "llama2": 24, "phi3": 8, "mistral": 8, "llama3": 5, "qwen2": 5}

SCHEMAS = {
    "hex-run": {"type": "string", "pattern": "[0-9a-f]{12}"},
    "contains-word": {"type": "string", "pattern": "normal|italic"},
    "bounded": {"type": "string", "maxLength": 40, "minLength": 2},
    "keys": {
        "type": "object",
        "properties": {"cid": {"type": "string"}, "events": {"type": "integer"}, "is_test": {"type": "boolean"}},
        "additionalProperties": {"type": "string", "pattern": "^[a-z\u00e9\u4e2d]*$"},
    },
}


@functools.lru_cache(maxsize=None)
def schema_grammar(name: str):
    return compiler("gpt2").compile_json_schema(SCHEMAS[name]).grammar


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(g=random_grammars())
def test_byte_classes_are_read_alike(g):
    G = grammar_arrays(g)
    reps, cls, masks = byte_classes(G, _UTF8_CUTS)
    first, _, _ = grammar_sets(G)
    assert sorted(reps.tolist()) == reps.tolist() and (cls[reps] == np.arange(reps.shape[0])).all()
    members = [np.flatnonzero(cls == k) for k in range(reps.shape[0])]
    for k, bs in enumerate(members):
        words = np.zeros(4, np.uint64)
        for b in bs.tolist():
            words[b >> 6] |= np.uint64(1) << np.uint64(b & 63)
        assert (words == masks[k]).all()
        # Classes never straddle a UTF-8 boundary.
        assert len({int(np.searchsorted(_UTF8_CUTS, b, side="right")) for b in bs.tolist()}) == 1
    byte_edges = (g.edge_rule < 0) & (g.edge_lo < 256)
    lo, hi = g.edge_lo[byte_edges], np.minimum(g.edge_hi[byte_edges], 255)
    bits = np.unpackbits(first.view(np.uint8), axis=1, bitorder="little")  # [state, byte]
    for bs in members:
        inside = (lo[:, None] <= bs[None, :]) & (bs[None, :] <= hi[:, None])
        assert (inside == inside[:, :1]).all(), "an edge reads part of a byte class"
        assert (bits[:, bs] == bits[:, bs[:1]]).all(), "a FIRST set holds part of a byte class"


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_counting_and_word_automata_masks_equal_brute_force(name, schema):
    checked = walk_and_check(tokenizer(name), schema_grammar(schema), STATES[name], 1, seed=sorted(SCHEMAS).index(schema))
    assert checked == STATES[name]


@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_hex_run_positions(name):
    """Every count of the unanchored run, plus escapes and multi-byte characters between runs."""
    info = tokenizer(name)
    m = GrammarMatcher(bind(schema_grammar("hex-run"), info))
    rng = random.Random(3)
    text = '"x\\n\u00e9' + "0123456789a" + "g" + "0123456789abcdef" + '"'
    data = text.encode()
    for cut in range(1, len(data)):
        m.reset()
        if m.accept_bytes(data[:cut]):
            check_state(m, rng, False)
    m.reset()
    assert m.accept_bytes(data) and m.is_completed()
    m.reset()
    assert m.accept_bytes(b'"0123456789a') and not m.accept_bytes(b'"')  # 11 hex digits are not a run of 12


def test_closed_set_absorbs_a_counting_run():
    info = tokenizer("gpt2")
    g = schema_grammar("hex-run")
    cache = MaskCache(bind(g, info))
    m = GrammarMatcher(bind(g, info))
    assert m.accept_bytes(b'"')
    states = {int(s) for s in m._rec._st[m._rec._row_ptr[1]:m._rec._row_ptr[2]]}
    content = [s for s in states if cache.flags[s] != 0]
    forest = cache.forest
    for s in content:
        entries = cache.state_masks(s)
        visited = sum(e.visited for e in entries)
        assert visited < 0.25 * forest.trie_byte.shape[0], (s, visited, forest.trie_byte.shape[0])
