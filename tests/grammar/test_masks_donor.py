"""Walks that copy a donor state's results: the same band entries as walking everything.

A state whose first bytes mostly lead where another state of its rule leads (an object's "any name
but these" states lead to the state after a character off the names) copies that donor's results
below every trie node where the two are in the same configuration. The plain walk is the oracle
(it is itself checked against brute-force masks in ``tests/decode/test_masks.py``): for every state
of these grammars that has a donor, each band entry must come out identical with and without it.
The tests also check that the donor path ran and saved work, so they cannot pass vacuously, and
that the copy stops where the rule's possible ends on the path differ (the end positions go into
the records of dead subtrees below).
"""

from __future__ import annotations

import numpy as np
import pytest

from stencil.grammar.compiler import bind
from stencil.grammar.ir import Automaton, ByteClass, GrammarBuilder, Ref, lit, seq
from stencil.grammar.masks import _delegated, classify_state
from stencil.grammar.vocab import TokenizerInfo
from tests.decode.test_masks import compiler

SCHEMAS = [
    # Declared names that share prefixes, a quote and a backslash, non-ASCII and astral characters.
    {"type": "object", "properties": {k: {"type": "string"} for k in ["id", "ids", "idx", 'a"b', "c\\d", "été", "😀x"]}},
    # Typed undeclared members, a required name, a nested object with its own names.
    {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array"},
                                      "inner": {"type": "object", "properties": {"n": {"type": "integer"}}}},
     "required": ["name"], "additionalProperties": {"type": "integer"}},
    # Names from a pattern and a bounded count: the general path, with donors where they apply.
    {"type": "object", "patternProperties": {"^x-": {"type": "number"}}, "properties": {"kind": {"const": "a"}},
     "maxProperties": 3},
]


def _same(a, b) -> bool:
    return (a.acc_mode == b.acc_mode and a.n_accepted == b.n_accepted and np.array_equal(a.acc, b.acc)
            and np.array_equal(a.rec_node, b.rec_node) and np.array_equal(a.rec_ae_ptr, b.rec_ae_ptr)
            and np.array_equal(a.rec_ae, b.rec_ae))


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_walks_with_a_donor_equal_full_walks(name):
    comp = compiler(name)
    used = saved = 0
    for schema in SCHEMAS:
        cache = comp.compile_json_schema(schema).mask_cache
        info = cache.info
        bands = list(range(len(cache.forest.bands)))
        kw = {"sets": (cache.first, cache.end_null), "classes": cache._classes}
        for s in cache.lookup_states().tolist():
            t = cache._donor_of(s)
            if t < 0:
                continue
            parts = cache._band_entries(t, cache._keys.state_keys(t, cache._horizons), donor=False)
            plain = classify_state(cache.G, cache.flags, s, cache.forest, bands, info.max_token_len, **kw)
            given = classify_state(cache.G, cache.flags, s, cache.forest, bands, info.max_token_len,
                                   donor=(t, parts), **kw)
            assert all(_same(a, b) for a, b in zip(plain, given)), (name, schema, s, t)
            stk = np.zeros((4, 32), np.int32)
            if _delegated(cache.G, cache.first, cache.end_null, s, t, stk, np.zeros((4, 32), np.bool_)):
                used += 1
                saved += sum(a.visited for a in plain) > sum(b.visited for b in given)
    assert used >= 6 and saved == used, (used, saved)


def _compare(cache, s: int) -> tuple[list, list]:
    info = cache.info
    bands = list(range(len(cache.forest.bands)))
    kw = {"sets": (cache.first, cache.end_null), "classes": cache._classes}
    t = cache._donor_of(s)
    parts = cache._band_entries(t, cache._keys.state_keys(t, cache._horizons), donor=False)
    return (classify_state(cache.G, cache.flags, s, cache.forest, bands, info.max_token_len, **kw),
            classify_state(cache.G, cache.flags, s, cache.forest, bands, info.max_token_len, donor=(t, parts), **kw))


def test_the_copy_stops_where_possible_rule_ends_differ():
    # X and its donor T agree on 40 bytes; after "q" X may end the rule (A is final) and T may not
    # (B), and after "z" both are in C. Below "qz" the records of X carry the end after "q".
    wide = ByteClass(((0x41, 0x68),))
    body = Automaton(6, ((0, wide, 1), (1, wide, 1), (0, lit("q"), 2), (1, lit("q"), 3), (2, lit("z"), 4),
                         (3, lit("z"), 4), (4, lit("w"), 5)), (1, 2, 5))
    b = GrammarBuilder()
    b.rule("root", seq(Ref("r"), lit("zq")))
    b.rule("r", body)
    vocab = [bytes([c]) for c in range(0x41, 0x69)] + [b"q", b"z", b"w", b"qz", b"qzx", b"qzw", b"qzwx", b"qzq",
                                                       b"</s>"]
    info = TokenizerInfo(vocab, "raw", stop_token_ids=[len(vocab) - 1])
    cache = bind(b.build("root"), info).mask_cache
    g = cache.grammar
    x = int(g.rule_start[g.rule_names.index("r")])
    assert cache._donor_of(x) >= 0
    plain, given = _compare(cache, x)
    assert sum(len(e.rec_node) for e in plain) > 0  # dead subtrees below "qz" with an end after "q"
    assert all(_same(a, c) for a, c in zip(plain, given))
