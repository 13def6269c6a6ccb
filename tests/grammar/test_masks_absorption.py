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
  most of it (the count is exact, not a timing);
* absorbed sets passed down the trie through ASCII and multi-byte characters keep masks exact on
  random vocabularies of multi-byte text, partial and invalid UTF-8 (hypothesis), and a plain
  string's walk reads exactly the nodes a DFA of the string bounds it to;
* one kernel call over all bands (the root's closed set found once, for the longest horizon)
  gives the same entries as one call per band.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.matcher import GrammarMatcher
from stencil.decode.parser import grammar_arrays
from stencil.grammar.compiler import bind
from stencil.grammar.ir import Grammar, GrammarBuilder, Repeat, alt, chars, lit, plus, seq, star
from stencil.grammar.masks import _UTF8_CUTS, UTF8, MaskCache, byte_classes, classify_state, grammar_sets
from stencil.grammar.vocab import TokenizerInfo
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


# ----------------------------------------------------------------------------------------------
# Absorbed sets passed down the trie (through multi-byte characters) and shared between bands
# ----------------------------------------------------------------------------------------------

# Characters of the random vocabularies below: ASCII structure and text, 2-, 3- and 4-byte
# characters, and lone lead / continuation bytes, so tokens end mid-character or are invalid UTF-8.
PIECES = [b"a", b"k", b"e", b"y", b" ", b'"', b"\\", b"\n", b"0", "\u00e9".encode(), "\u4e2d".encode(),
          "\U0001f600".encode(), b"\xc3", b"\xa9", b"\xe4\xb8"]
TEXT = ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x10FFFF))  # JSON string characters but the escapes


@st.composite
def text_vocabularies(draw) -> TokenizerInfo:
    """A few hundred tokens of 1-16 bytes over PIECES, so the tries pass the bulk-acceptance threshold."""
    words = draw(st.lists(st.lists(st.sampled_from(PIECES), min_size=2, max_size=7).map(b"".join), min_size=150,
                          max_size=300, unique=True))
    vocab = list(dict.fromkeys(PIECES + [w for w in words if len(w) <= 16])) + [b"<stop>"]
    return TokenizerInfo(vocab, "raw", stop_token_ids=[len(vocab) - 1])


def _char(exclude: str = ""):
    ranges = []
    for lo, hi in TEXT:
        for c in sorted(ord(x) for x in exclude):
            if lo <= c <= hi:
                if lo < c:
                    ranges.append((lo, c - 1))
                lo = c + 1
        if lo <= hi:
            ranges.append((lo, hi))
    return alt(chars(*ranges), lit("\\\\"), lit('\\"'))


def text_grammar(kind: str, bound: int) -> Grammar:
    """A quoted string of Unicode text: free, of at most ``bound`` characters, or any text but "key"
    (its prefixes tracked, as JSON Schema does for the keys of an object), then an optional newline."""
    if kind == "free":
        body = star(_char())
    elif kind == "bounded":
        body = Repeat(_char(), 0, bound)
    else:
        body = plus(_char())  # longer than the word
        for c in reversed("key"):
            body = alt(seq(), seq(_char(c), star(_char())), seq(lit(c), body))
    b = GrammarBuilder()
    b.rule("root", seq(lit('"'), body, lit('"'), Repeat(lit("\n"), 0, 1)))
    return b.build("root")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(info=text_vocabularies(), kind=st.sampled_from(["free", "bounded", "not-key"]), bound=st.integers(1, 12),
       data=st.data())
def test_text_states_on_multi_byte_vocabularies(info, kind, bound, data):
    """Masks equal brute force along random walks through strings of multi-byte text, where
    absorbed sets pass through ASCII and multi-byte characters down the trie."""
    m = GrammarMatcher(bind(text_grammar(kind, bound), info))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(8):
        oracle = check_state(m, rng, True)
        allowed = np.flatnonzero(oracle)
        if allowed.size == 0 or m.is_terminated():
            break
        assert m.accept_token(int(data.draw(st.sampled_from(allowed.tolist()))))


def _entries(cache: MaskCache, s: int, bands: list[int]):
    info = cache.info
    out = classify_state(cache.G, cache.flags, s, cache.forest, bands, info.max_token_len, (cache.first, cache.end_null),
                         (cache._classes[0], cache._classes[1], np.zeros_like(cache._classes[2])) + cache._classes[3:])
    return [(e.acc_mode, e.acc.tolist(), e.rec_node.tolist(), e.rec_ae_ptr.tolist(), e.rec_ae.tolist()) for e in out]


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
@pytest.mark.parametrize("schema", ["keys", "hex-run", "bounded"])
def test_bands_in_one_call_equal_bands_alone(name, schema):
    """One kernel call over every band (the root's closed-set answer found for the longest horizon
    serves the shorter ones; end positions laid out per band) gives the entries of one call per band."""
    info = tokenizer(name)
    cache = MaskCache(bind(schema_grammar(schema), info))
    m = GrammarMatcher(bind(schema_grammar(schema), info))
    assert m.accept_bytes(b'{"' if schema == "keys" else b'"')
    n = int(m._rec._meta[0])  # rows in the chart: the current one ends at row_ptr[n]
    row = m._rec._st[m._rec._row_ptr[n - 1]:m._rec._row_ptr[n]]
    states = sorted({int(s) for s in row if cache.flags[s] != 0})
    assert states
    n_bands = len(cache.forest.bands)
    for s in states:
        together = _entries(cache, s, list(range(n_bands)))
        alone = [_entries(cache, s, [b])[0] for b in range(n_bands)]
        assert together == alone


def _string_dfa(state: tuple[str, int], b: int) -> tuple[str, int] | None:
    """The free string grammar after its opening quote, as a DFA over bytes (None: dead)."""
    kind, u = state
    if kind == "text" and u != 0:
        nu = int(UTF8[u, b])
        return ("text", nu) if nu >= 0 else None
    if kind == "text":
        if b == ord('"'):
            return ("closed", 0)
        if b == ord("\\"):
            return ("escape", 0)
        if 0x20 <= b < 0x80:
            return ("text", 0)
        nu = int(UTF8[0, b])
        return ("text", nu) if nu > 0 else None
    if kind == "escape":
        return ("text", 0) if b in (ord("\\"), ord('"')) else None
    if kind == "closed":
        return ("end", 0) if b == ord("\n") else None
    return None


def test_string_walk_visits_only_paths_to_structure():
    """In a plain JSON string the walk reads only the children of live nodes on paths to tokens
    holding a quote, a backslash, a control byte or invalid UTF-8 (and below escapes, where no
    absorbed set passes): everything else is accepted in bulk, also after multi-byte characters.
    The bound is exact, from the trie and the grammar's DFA."""
    info = tokenizer("llama3")
    g = text_grammar("free", 0)
    cache = MaskCache(bind(g, info))
    m = GrammarMatcher(bind(g, info))
    assert m.accept_bytes(b'"')
    row = m._rec._st[m._rec._row_ptr[1]:m._rec._row_ptr[2]]
    (s,) = {int(x) for x in row if cache.flags[x] != 0}
    forest = cache.forest
    text = np.zeros(256, bool)
    text[0x20:] = True
    text[[ord('"'), ord("\\")]] = False
    bits = np.unpackbits(forest.sub_bytes.view(np.uint8), axis=1, bitorder="little").astype(bool)
    text_only = ~(bits & ~text).any(1)
    bound = 0
    for b in range(len(forest.bands)):
        stack = []  # (DFA state after the node, a backslash on the path, the node accepted in bulk)
        for i in range(int(forest.node_lo[b]) + 1, int(forest.node_hi[b])):
            del stack[forest.trie_depth[i] - 1:]
            parent_state, escaped, parent_bulk = stack[-1] if stack else (("text", 0), False, False)
            read = parent_state is not None and (escaped or not parent_bulk)
            bound += read
            # Accepted in bulk: text below a text position, valid UTF-8 from the position's UTF-8 state.
            bulk = (parent_state is not None and parent_state[0] == "text" and text_only[i]
                    and (forest.utf8_valid[i] >> parent_state[1]) & 1 != 0)
            state = _string_dfa(parent_state, int(forest.trie_byte[i])) if parent_state is not None else None
            stack.append((state, escaped or forest.trie_byte[i] == ord("\\"), bulk))
    visited = sum(e.visited for e in cache.state_masks(s))
    assert visited <= bound, (visited, bound)
