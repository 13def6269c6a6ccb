"""A first visit's bookkeeping: structure bytes, cross-grammar keys, the table of known structures.

A state's band keys hash what it reaches within each band's horizon (:func:`_structure`: LEB128
fields, the callees' keys appended); within one grammar, :func:`_known_states` registers a state
whose farthest-horizon structure and FOLLOW set the grammar has seen, without computing keys.
These tests check that

* the structure bytes decode back to exactly what a breadth-first search over the grammar arrays
  (shortest distances by Dijkstra) finds within the horizon, on random grammars (hypothesis), so
  equal bytes mean equal structures;
* keys ignore state numbering and context: the same rule in another grammar has the same keys, while
  a counter's positions near its bound and far from it differ exactly in the bands that see the bound;
* every state the table registered has the row its key combination and FOLLOW set have (what the
  path through keys gives), on JSON Schema grammars with counters, across the table's growth;
* rules alike within every horizon but followed by different bytes keep separate entries, and
  masks equal brute force (they used to share one entry, resolved with the first rule's FOLLOW,
  and lose tokens).
"""

from __future__ import annotations

import heapq
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.matcher import GrammarMatcher
from stencil.decode.parser import grammar_arrays
from stencil.grammar.compiler import bind
from stencil.grammar.ir import ByteClass, GrammarBuilder, Ref, Repeat, alt, lit, seq, star
from stencil.grammar.masks import _structure, min_lengths
from tests.decode.test_masks import check_state, compiler, random_grammars, tokenizer


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 127) << shift
        shift += 7
        if b < 128:
            return v, i


def decode(buf: bytes, by_id: bool) -> tuple:
    """(version, horizon, states as (final, edges), callees) from one band's bytes; all bytes must be used."""
    version, i = _varint(buf, 0)
    horizon, i = _varint(buf, i)
    states, wanted, n_callees = [], 1, 0
    while len(states) < wanted:
        final, i = _varint(buf, i)
        edges = []
        while True:
            tag = buf[i]
            i += 1
            if tag == 2:
                break
            a, i = _varint(buf, i)
            b, i = _varint(buf, i)
            if tag == 0:
                t, i = _varint(buf, i)
                edges.append(("byte", a, b, t))
                wanted = max(wanted, t + 1)
            else:
                assert tag == 1
                edges.append(("call", a, b - 1))
                n_callees = max(n_callees, a + 1)
                wanted = max(wanted, b)
        states.append((final, edges))
    callees = []
    for _ in range(n_callees):
        if by_id:
            r, i = _varint(buf, i)
            callees.append(r)
        else:
            callees.append(bytes(buf[i:i + 16]))
            i += 16
    assert i == len(buf)
    return version, horizon, states, callees


def reference(g, minlen, s: int, horizon: int) -> tuple:
    """What state s reaches within ``horizon`` bytes, by Dijkstra and a BFS over the grammar arrays."""
    dist = {s: 0}
    heap = [(0, s)]
    while heap:
        d, p = heapq.heappop(heap)
        if d > dist[p]:
            continue
        for e in range(g.edge_ptr[p], g.edge_ptr[p + 1]):
            r = int(g.edge_rule[e])
            if r < 0 and g.edge_lo[e] > 255:
                continue
            nd = d + (1 if r < 0 else int(minlen[r]))
            t = int(g.edge_target[e])
            if nd < dist.get(t, 1 << 62):
                dist[t] = nd
                heapq.heappush(heap, (nd, t))
    number, order, callees, states = {s: 0}, [s], [], []
    for p in order:
        edges = []
        for e in range(g.edge_ptr[p], g.edge_ptr[p + 1]):
            r, t = int(g.edge_rule[e]), int(g.edge_target[e])
            if r < 0:
                if g.edge_lo[e] > 255 or dist[p] + 1 > horizon:
                    continue
                if t not in number:
                    number[t] = len(order)
                    order.append(t)
                edges.append(("byte", int(g.edge_lo[e]), int(g.edge_hi[e]), number[t]))
            else:
                if r not in callees:
                    callees.append(r)
                ti = -1
                if dist[p] + minlen[r] <= horizon:
                    if t not in number:
                        number[t] = len(order)
                        order.append(t)
                    ti = number[t]
                edges.append(("call", callees.index(r), ti))
        states.append((int(g.state_final[p]), edges))
    return states, callees


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(g=random_grammars(), data=st.data())
def test_structure_bytes_decode_to_the_reachable_structure(g, data):
    G = grammar_arrays(g)
    minlen = min_lengths(G)
    rule_end = np.append(g.rule_start[1:], g.n_states).astype(np.int64)
    horizons = np.array(sorted(data.draw(st.lists(st.integers(1, 300), min_size=1, max_size=4, unique=True))), np.int64)
    keys = np.frombuffer(bytes(range(256)) * (g.n_rules // 16 + 1), np.uint8)[:16 * g.n_rules].reshape(-1, 16)
    keys = (keys + np.arange(g.n_rules, dtype=np.uint8)[:, None]).astype(np.uint8)
    for s in data.draw(st.lists(st.integers(0, g.n_states - 1), min_size=1, max_size=6)):
        for by_id in (False, True):
            work = np.zeros(horizons.shape[0] + 1 + g.n_rules, np.int64)
            out, o, n_missing = _structure(G, minlen, s, rule_end[g.state_rule[s]], horizons, keys,
                                           np.ones(g.n_rules, np.uint8), 7, work, by_id)
            assert n_missing == 0
            raw = out[:o].tobytes()
            for k, h in enumerate(horizons.tolist()):
                version, horizon, states, callees = decode(raw[work[k]:work[k + 1]], by_id)
                ref_states, ref_callees = reference(g, minlen, s, h)
                assert (version, horizon, states) == (7, h, ref_states)
                assert callees == (ref_callees if by_id else [keys[r].tobytes() for r in ref_callees])
        # A rule without a key yet is reported, from the farthest horizon (every band's callees are among its).
        work = np.zeros(horizons.shape[0] + 1 + g.n_rules, np.int64)
        _, _, n_missing = _structure(G, minlen, s, rule_end[g.state_rule[s]], horizons, keys,
                                     np.zeros(g.n_rules, np.uint8), 7, work, False)
        assert sorted(work[horizons.shape[0] + 1:horizons.shape[0] + 1 + n_missing].tolist()) == \
            sorted(reference(g, minlen, s, int(horizons.max()))[1])


def _counter_grammar(prefix: str) -> object:
    """A prefix, a quoted string of 2-80 lowercase letters, then a name."""
    b = GrammarBuilder()
    b.rule("root", seq(lit(prefix), Ref("word"), lit(";"), Ref("name")))
    b.rule("name", seq(lit("<"), star(ByteClass(((0x61, 0x7A),))), lit(">")))
    b.rule("word", seq(lit('"'), Repeat(ByteClass(((0x61, 0x7A),)), 2, 80), lit('"')))
    return b.build("root")


def test_keys_follow_structure_not_numbering():
    info = tokenizer("gpt2")
    ca = bind(_counter_grammar("x="), info).mask_cache
    cb = bind(_counter_grammar("a longer prefix: "), info).mask_cache

    def positions(c):
        """The word's states after its quote and i letters, i = 0 .. 80 (following the edges that read 'a')."""
        g = c.grammar
        p = int(g.rule_start[g.rule_names.index("word")])
        out = []
        for byte in [0x22] + [0x61] * 80:
            nxt = [int(g.edge_target[e]) for e in range(g.edge_ptr[p], g.edge_ptr[p + 1])
                   if g.edge_rule[e] < 0 and g.edge_lo[e] <= byte <= g.edge_hi[e]]
            assert len(nxt) == 1
            p = nxt[0]
            out.append(p)
        return out

    wa, wb = positions(ca), positions(cb)
    assert wa != wb  # other state numbers, other context
    keys_a = [ca.band_keys(s) for s in wa]
    assert keys_a == [cb.band_keys(s) for s in wb]
    # After i >= 2 letters, two positions share a band's key exactly when both can still read at
    # least the band's horizon of letters (80 - i >= horizon): then neither sees the bound.
    for b, h in enumerate(ca.forest.horizons.tolist()):
        for i in range(2, 78):
            for j in (i + 1, i + 2):
                assert (keys_a[i][b] == keys_a[j][b]) == (80 - i >= h and 80 - j >= h), (b, h, i, j)


def test_table_registrations_agree_with_keys():
    comp = compiler("gpt2")
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 300},
            "b": {"type": "array", "items": {"type": "string", "maxLength": 200}},
            "c": {"type": "string", "pattern": "^[a-f0-9]{20}$"},
        },
    }
    cache = comp.compile_json_schema(schema).mask_cache
    states = cache.lookup_states()
    cache.ensure(states)
    assert cache._table[1].shape[0] > 64  # the table grew (it starts with 64 rows)
    # Keys were computed once per structure new to the table; counter positions far from their
    # bounds (about 250 of the 812 states here) were registered by the table alone.
    assert len(cache._state_keys) == int(cache._table[3][0]) < len(states) - 200
    rows = cache.pools[0]
    for s in states.tolist():
        combo = cache.band_keys(s) + (cache.follow[cache.grammar.state_rule[s]].tobytes(),)
        assert rows[s] == cache._combos[combo]


@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_rules_alike_but_followed_differently_keep_their_own_entries(name):
    info = tokenizer(name)
    b = GrammarBuilder()
    body = seq(lit('"'), star(alt(ByteClass(((0x61, 0x7A),)), lit("\\n"))), lit('"'))
    b.rule("s1", body)
    b.rule("s2", body)
    b.rule("root", alt(seq(lit("{"), Ref("s1"), lit("}")), seq(lit("["), Ref("s2"), lit("]"), Ref("s1"), lit(")"))))
    g = b.build("root")
    m = GrammarMatcher(bind(g, info))
    cache = m.compiled.mask_cache
    s1, s2 = (g.rule_names.index(n) for n in ("s1", "s2"))
    inside = [int(g.rule_start[r]) + 1 for r in (s1, s2)]
    assert cache.band_keys(inside[0]) == cache.band_keys(inside[1])  # alike within every horizon
    rng = random.Random(5)
    for text in ('{"ab', '["ab', '{"', '["', '["a"]"b', '["a\\n'):
        m.reset()
        assert m.accept_string(text)
        check_state(m, rng, True)
    assert cache.pools[0][inside[0]] != cache.pools[0][inside[1]]
