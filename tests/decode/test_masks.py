"""Token masks from the adaptive cache against the brute-force oracle, on real and random vocabularies.

The oracle is :meth:`GrammarMatcher.brute_force_mask`: every token's bytes run through the parser,
one token at a time. At every checked matcher state the bitmask filled from the cache must equal it
bit for bit, and ``try_token`` (cache first, parser for uncertain tokens) must agree with it.

States are reached by walking byte prefixes of random valid sentences (drawn from the grammar's
own automata) and by random walks over allowed tokens (half of the picks favour tokens with
punctuation, so walks leave strings and names). The oracle costs 5-60 ms of CPU per state on the
32k-50k vocabularies and 10-110 ms on the 128k-152k ones (CFG states, where most tokens parse a
long way, are the dearest), so the counts are per tokenizer and grammar kind:

=================  ====  ==============  ==============  ==============  =============
tokenizer          JSON  each CFG form   each schema     each regex      per kind
=================  ====  ==============  ==============  ==============  =============
gpt2, llama2       300   50 (6 forms)    10 (30)         15 (20)         300
phi3, mistral       40    6               2               2              36-60
llama3, qwen2       30    4               1               1              20-30
=================  ====  ==============  ==============  ==============  =============

(The CFGs are arithmetic with left recursion, a SQL subset and a C-like language, each in EBNF
and Lark form; the schemas are 30 small ones spread over ../shared/jsonschemabench/dev that the
JSON Schema frontend accepts; the regexes are listed below.) ``try_token`` is compared on every
token at the first state of the first two grammars of each kind and on 256 random tokens
elsewhere. The hypothesis test adds 100 random grammars over small raw vocabularies, where every
state reached and every token is checked.
"""

from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.matcher import GrammarMatcher, fill_next_token_bitmasks, pack_bool_mask
from stencil.errors import ParserLimitError, SchemaError, StencilError
from stencil.grammar.compiler import GrammarCompiler, bind
from stencil.grammar.ir import (
    Alt,
    ByteClass,
    CharClass,
    Grammar,
    GrammarBuilder,
    Lit,
    Ref,
    Repeat,
    Seq,
    Special,
    alt,
    lit,
    opt,
    seq,
    star,
)
from stencil.grammar import masks as masks_module
from stencil.grammar.masks import MaskCache, classify_state, mask_store
from stencil.grammar.vocab import TokenizerInfo
from tests.conftest import TOKENIZERS, jsonschemabench_records, tokenizer_dir

GRAMMAR_DIR = Path(__file__).resolve().parents[1] / "grammar" / "grammars"
CFGS = ("arith", "sql", "clike")

REGEXES = (
    r"\d{3}-\d{4}",
    r"[a-z]+@[a-z]+\.(com|org|net)",
    r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?",
    r"[A-Za-z_][A-Za-z0-9_]*",
    r"#[0-9a-fA-F]{6}",
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
    r"(yes|no|maybe)",
    r"\w+( \w+)*\.",
    r"\"([^\"\\]|\\.)*\"",
    r"[\u4e00-\u9fff]{1,4}",
    r"(ab|a)*b",
    r"[^\n]{0,20}\n",
    r"(\+|-)?\d+(,\d{3})*",
    r"(https?://)?[a-z0-9.-]+\.[a-z]{2,6}(/[a-z0-9_-]*)*",
    r"\s*\{\s*\}\s*",
    r"[A-Z]{2}\d{2} ?\d{4} ?\d{4}",
    r"(a|b|c)(d|e)?f{2,3}",
    r"\p{L}+|\d+",
)

# (JSON states, states per CFG form, per schema, per regex): see the module docstring.
BUDGET = {
    "gpt2": (300, 50, 10, 15),
    "llama2": (300, 50, 10, 15),
    "phi3": (40, 6, 2, 2),
    "mistral": (40, 6, 2, 2),
    "llama3": (30, 4, 1, 1),
    "qwen2": (30, 4, 1, 1),
}
N_SCHEMAS = 30
SCHEMA_MAX_SIZE = 4000  # characters of schema text: keeps compile time small

JSON_DOC = (
    b'{"name": "Al\\u00e9x \\"q\\" \xc3\xa9\xe4\xb8\xad", "age": -12.5e+3, "ok": [true, false, null, {}, []],\n'
    b'  "nested": {"y": [1, 2.0, -3e-2, "s"]}, "empty": ""}'
)


# ----------------------------------------------------------------------------------------------
# Grammars and tokenizers (built once per session)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tokenizer(name: str) -> TokenizerInfo:
    return TokenizerInfo.from_file(tokenizer_dir(name))


@functools.lru_cache(maxsize=None)
def compiler(name: str) -> GrammarCompiler:
    return GrammarCompiler(tokenizer(name), warm_up=False)


@functools.lru_cache(maxsize=None)
def schemas() -> tuple[list[tuple[str, Grammar]], int]:
    """30 small JSON Schemas spread over the dev sources that the frontend accepts, and how many it rejected."""
    recs = sorted(jsonschemabench_records(), key=lambda r: r["id"])
    small = [r for r in recs if len(json.dumps(r["schema"])) <= SCHEMA_MAX_SIZE]
    out, rejected = [], 0
    step = max(1, len(small) // (2 * N_SCHEMAS))
    for r in small[::step]:
        if len(out) == N_SCHEMAS:
            break
        try:
            cg = compiler("gpt2").compile_json_schema(r["schema"])
        except SchemaError:
            rejected += 1
            continue
        out.append((r["id"], cg.grammar))
    return out, rejected


def grammars_for(kind: str) -> list[tuple[str, Grammar]]:
    c = compiler("gpt2")
    if kind == "json":
        return [("json", c.compile_builtin_json().grammar)]
    if kind == "cfg":
        return [
            (f"{name}.{ext}", c.compile_grammar((GRAMMAR_DIR / f"{name}.{ext}").read_text()).grammar)
            for name in CFGS
            for ext in ("gbnf", "lark")
        ]
    if kind == "regex":
        return [(p, c.compile_regex(p).grammar) for p in REGEXES]
    return schemas()[0]


# ----------------------------------------------------------------------------------------------
# Walking to states
# ----------------------------------------------------------------------------------------------


def min_costs(g: Grammar) -> np.ndarray:
    """Per state, the cheapest way to finish its rule as ``bytes << 20 | steps`` (a finite derivation to follow)."""
    inf = np.int64(1) << 50
    cost = np.where(g.state_final != 0, 0, inf).astype(np.int64)
    src = np.repeat(np.arange(g.n_states), np.diff(g.edge_ptr))
    is_byte = g.edge_rule < 0
    usable = ~is_byte | (g.edge_lo <= 255)
    src, tgt, rule, is_byte = src[usable], g.edge_target[usable], g.edge_rule[usable], is_byte[usable]
    starts = g.rule_start[np.where(is_byte, 0, rule)]
    while True:
        first = np.where(is_byte, np.int64(1) << 20, (cost[starts] >> 20) << 20)
        cand = np.where((cost[tgt] < inf) & (first < inf), first + cost[tgt] + 1, inf)
        new = cost.copy()
        np.minimum.at(new, src, cand)
        if np.array_equal(new, cost):
            return cost
        cost = new


def random_sentence(g: Grammar, cost: np.ndarray, rng: random.Random, soft_max: int = 60) -> bytes:
    """A random sentence of ``g``: random edges while short, then the cheapest way out."""
    out = bytearray()

    def rule(r: int, depth: int) -> None:
        s = int(g.rule_start[r])
        while True:
            opts = []
            for e in range(g.edge_ptr[s], g.edge_ptr[s + 1]):
                ref = g.edge_rule[e]
                if ref < 0 and g.edge_lo[e] > 255:
                    continue
                tgt = g.edge_target[e]
                first = 1 << 20 if ref < 0 else (cost[g.rule_start[ref]] >> 20) << 20
                if cost[tgt] < 1 << 50 and first < 1 << 50:
                    opts.append((first + cost[tgt], e))
            final = g.state_final[s] != 0
            hurry = len(out) > soft_max or depth > 12
            if final and (not opts or hurry or rng.random() < 0.15):
                return
            if hurry:
                e = min(opts)[1]
            else:
                e = rng.choice(opts)[1]
            ref = int(g.edge_rule[e])
            if ref < 0:
                out.append(rng.randint(int(g.edge_lo[e]), min(int(g.edge_hi[e]), 255)))
            else:
                rule(ref, depth + 1)
            s = int(g.edge_target[e])

    rule(g.root, 0)
    return bytes(out)


def pick_token(info: TokenizerInfo, allowed: np.ndarray, rng: random.Random) -> int:
    """A random allowed token; half the time one with punctuation, so walks move through the grammar."""
    if rng.random() < 0.5:
        punct = [int(t) for t in allowed[: 20000] if any(not chr(b).isalnum() for b in info.decoded_vocab[t][:4])]
        if punct:
            return rng.choice(punct)
    return int(rng.choice(allowed))


def check_state(m: GrammarMatcher, rng: random.Random, every_token: bool) -> np.ndarray:
    """Assert fill == brute force and try_token == brute force at m's state; return the brute-force mask."""
    info = m.tokenizer_info
    oracle = m.brute_force_mask()
    words = (info.vocab_size + 31) // 32
    if rng.random() < 0.5:
        bitmask = torch.full((2, words), -1, dtype=torch.int32)
        m.fill_next_token_bitmask(bitmask, 1)
        row = bitmask[1].numpy()
    else:
        bitmask = np.full((1, words + 1), -1, np.int32)  # wider than needed: the extra word is zeroed
        m.fill_next_token_bitmask(bitmask)
        assert bitmask[0, words] == 0
        row = bitmask[0, :words]
    expected = pack_bool_mask(oracle)
    if not np.array_equal(row, expected):
        got = np.unpackbits(row.view(np.uint8), bitorder="little")[: info.vocab_size].astype(bool)
        extra = [info.token_string(t) for t in np.flatnonzero(got & ~oracle)[:8]]
        missing = [info.token_string(t) for t in np.flatnonzero(oracle & ~got)[:8]]
        raise AssertionError(f"mask differs from brute force: extra {extra}, missing {missing}")
    ids = range(info.vocab_size) if every_token else rng.sample(range(info.vocab_size), 256)
    bad = [t for t in ids if m.try_token(t) != oracle[t]]
    assert not bad, f"try_token disagrees with the mask on {[info.token_string(t) for t in bad[:8]]}"
    return oracle


def walk_and_check(info: TokenizerInfo, g: Grammar, n_states: int, n_every: int, seed: int) -> int:
    """Check n_states states of g with vocabulary info: half sentence prefixes, half token walks."""
    rng = random.Random(seed)
    cg = bind(g, info)
    m = GrammarMatcher(cg)
    cost = min_costs(g)
    checked = 0
    # Byte prefixes of random sentences.
    while checked < (n_states + 1) // 2:
        sentence = random_sentence(g, cost, rng)
        m.reset()
        assert m.accept_bytes(sentence) and m.is_completed(), f"generated sentence rejected: {sentence!r}"
        cuts = sorted(rng.sample(range(len(sentence) + 1), min(len(sentence) + 1, 6)))
        for cut in cuts:
            if checked >= (n_states + 1) // 2:
                break
            m.reset()
            assert m.accept_bytes(sentence[:cut])
            check_state(m, rng, checked < n_every)
            checked += 1
    # Random walks over allowed tokens.
    while checked < n_states:
        m.reset()
        for _ in range(30):
            if checked >= n_states:
                break
            oracle = check_state(m, rng, checked < n_every)
            checked += 1
            allowed = np.flatnonzero(oracle)
            if allowed.size == 0 or m.is_terminated():
                break
            assert m.accept_token(pick_token(info, allowed, rng))
    return checked


# ----------------------------------------------------------------------------------------------
# Real tokenizers: every grammar kind on every tokenizer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZERS)
def test_builtin_json_masks_equal_brute_force(name):
    info = tokenizer(name)
    (label, g), = grammars_for("json")
    rng = random.Random(0)
    m = GrammarMatcher(bind(g, info))
    assert m.accept_bytes(JSON_DOC) and m.is_completed()
    for cut in range(0, len(JSON_DOC) + 1, max(1, len(JSON_DOC) // 20)):
        m.reset()
        m.accept_bytes(JSON_DOC[:cut])
        check_state(m, rng, cut == 0)
    n = BUDGET[name][0]
    assert walk_and_check(info, g, n, 1, seed=1) == n


@pytest.mark.parametrize("kind, column", [("cfg", 1), ("schema", 2), ("regex", 3)])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_grammar_masks_equal_brute_force(name, kind, column):
    info = tokenizer(name)
    found = grammars_for(kind)
    if kind == "schema":
        assert len(found) == N_SCHEMAS, f"only {len(found)} schemas compiled ({schemas()[1]} rejected by the frontend)"
    n = BUDGET[name][column]
    for k, (label, g) in enumerate(found):
        assert walk_and_check(info, g, n, 1 if k < 2 else 0, seed=1000 * column + k) == n, label


# ----------------------------------------------------------------------------------------------
# Random grammars over small raw vocabularies
# ----------------------------------------------------------------------------------------------

ALPHABET = b'ab(),"x '
SPECIAL = "<sp>"
STOP = "</s>"


@st.composite
def raw_vocabularies(draw) -> TokenizerInfo:
    pieces = draw(st.lists(st.binary(min_size=1, max_size=4).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)),
                           min_size=4, max_size=40, unique=True))
    singles = draw(st.lists(st.sampled_from([bytes([c]) for c in ALPHABET]), unique=True, max_size=len(ALPHABET)))
    vocab = list(dict.fromkeys(pieces + singles)) + [SPECIAL, STOP]
    return TokenizerInfo(vocab, "raw", vocab_size=len(vocab) + draw(st.integers(0, 3)),
                         stop_token_ids=[len(vocab) - 1], special_token_ids=[len(vocab) - 2])


def expressions(rules: list[str], specials: bool) -> st.SearchStrategy:
    leaves = [
        st.binary(max_size=3).map(lambda b: Lit(bytes(ALPHABET[x % len(ALPHABET)] for x in b))),
        st.lists(st.sampled_from(list(ALPHABET)), min_size=1, max_size=3).map(
            lambda cs: ByteClass(tuple((c, c) for c in sorted(set(cs))))),
        st.sampled_from(rules).map(Ref),
    ]
    if specials:
        leaves.append(st.just(Special(SPECIAL)))
    return st.recursive(
        st.one_of(leaves),
        lambda inner: st.one_of(
            st.lists(inner, min_size=2, max_size=3).map(lambda xs: Seq(tuple(xs))),
            st.lists(inner, min_size=2, max_size=3).map(lambda xs: Alt(tuple(xs))),
            st.tuples(inner, st.integers(0, 1), st.sampled_from([None, 1, 2])).map(
                lambda x: Repeat(x[0], x[1], None if x[2] is None else max(x[1], x[2]))),
        ),
        max_leaves=6,
    )


@st.composite
def random_grammars(draw) -> Grammar:
    names = ["root"] + [f"r{i}" for i in range(draw(st.integers(0, 3)))]
    specials = draw(st.booleans())
    b = GrammarBuilder()
    for n in names:
        b.rule(n, draw(expressions(names, specials)))
    return b.build("root")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(info=raw_vocabularies(), g=random_grammars(), data=st.data())
def test_random_grammars_on_raw_vocabularies(info, g, data):
    cg = bind(g, info)
    m = GrammarMatcher(cg)
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    try:
        for _ in range(12):
            oracle = check_state(m, rng, True)
            allowed = np.flatnonzero(oracle)
            if allowed.size == 0:
                break
            assert m.accept_token(int(data.draw(st.sampled_from(allowed.tolist()))))
    except ParserLimitError:
        pass  # a wildly ambiguous random grammar: the parser's limit, not the cache, decided


# ----------------------------------------------------------------------------------------------
# The cache's machinery: sharing, disk, background, batches, bitmask handling
# ----------------------------------------------------------------------------------------------


def _string_grammar(prefix: str) -> Grammar:
    b = GrammarBuilder()
    b.rule("str", seq(lit('"'), star(alt(ByteClass(((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E))), lit("\\n"))), lit('"')))
    b.rule("root", seq(lit(prefix), Ref("str"), opt(seq(lit(","), Ref("str")))))
    return b.build("root")


def test_bounded_repetitions_near_and_far_from_the_bound():
    """Counters: positions share entries and absorb subtrees by horizon class; the bound must still cut exactly."""
    info = tokenizer("gpt2")
    b = GrammarBuilder()
    char = alt(CharClass(((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x10FFFF))), seq(lit("\\"), ByteClass(((0x22, 0x22), (0x5C, 0x5C), (0x6E, 0x6E)))))
    b.rule("char", char)
    b.rule("chunk", Repeat(Ref("char"), 24, 24))
    # The JSON Schema frontend's shape for a long maxLength: chunks of a counted char rule (ambiguous for 24 chars).
    b.rule("long", seq(lit('"'), alt(seq(Repeat(Ref("chunk"), 0, 2), Repeat(Ref("char"), 0, 23)), Repeat(Ref("chunk"), 3, 3)), lit('"')))
    b.rule("short", seq(lit("'"), Repeat(CharClass(((0x61, 0x7A), (0xE9, 0xE9))), 2, 9), lit("'")))
    b.rule("root", seq(Ref("long"), lit(","), Ref("short")))
    g = b.build("root")
    m = GrammarMatcher(bind(g, info))
    rng = random.Random(8)
    text = '"' + "ab\\n é中" * 9 + '",' + "'" + "abcdéfgh" + "'"
    data = text.encode()
    cuts = sorted(set(range(0, 14)) | set(range(len(data) - 40, len(data) + 1, 3)))
    for cut in cuts:
        m.reset()
        if not m.accept_bytes(data[:cut]):
            continue  # inside a multi-byte character
        check_state(m, rng, False)
    m.reset()
    assert m.accept_bytes(data) and m.is_completed()
    m.reset()
    assert not m.accept_bytes(('"' + "x" * 73 + '",').encode())  # past the longest alternative


def _kernel_states(m: GrammarMatcher) -> list[tuple[int, int]]:
    """(state, origin) of the kernel items with edges in m's last chart row."""
    st, org, row_ptr, _, _, meta = m._rec.chart
    cur = int(meta[0]) - 1
    flags = m.compiled.mask_cache.flags
    return [(int(st[k]), int(org[k])) for k in range(row_ptr[cur], row_ptr[cur + 1])
            if org[k] < cur and flags[st[k]] != 0]


def test_kernel_items_subsumed_through_a_nullable_call_get_no_entry():
    """After `"n":` the row holds the state before the value's whitespace and, through the empty
    whitespace, the value's first state. The first one's sub-chart derives everything the second's
    does, so the mask looks up (and classifies) only the first, and stays exact. The value state
    gets its entry once a token ends inside the whitespace and leaves it on its own."""
    info = tokenizer("gpt2")
    cg = GrammarCompiler(info, warm_up=False).compile_json_schema(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    g, cache = cg.grammar, cg.mask_cache
    m = GrammarMatcher(cg)
    rng = random.Random(5)
    assert m.accept_string('{"n":')
    kernel = _kernel_states(m)
    pairs = [(p, t) for p, o in kernel for t, o2 in kernel if o2 == o and t != p
             and any(g.edge_rule[e] >= 0 and g.rule_nullable[g.edge_rule[e]] and g.edge_target[e] == t
                     for e in range(g.edge_ptr[p], g.edge_ptr[p + 1]))]
    assert len(pairs) == 1, (kernel, pairs)
    p, t = pairs[0]
    check_state(m, rng, True)
    state_entry = cache.pools[0]
    assert state_entry[p] >= 0 and state_entry[t] < 0
    assert m.accept_string(" ")
    assert t in [s for s, _ in _kernel_states(m)]
    check_state(m, rng, True)
    assert cache.pools[0][t] >= 0
    assert m.accept_string("12}") and m.is_completed()


def test_entries_are_shared_across_grammars():
    info = tokenizer("llama2")
    a = GrammarMatcher(bind(_string_grammar("key="), info))
    b = GrammarMatcher(bind(_string_grammar("other: "), info))
    assert a.accept_string('key="ab') and b.accept_string('other: "ab')
    ca, cb = a.compiled.mask_cache, b.compiled.mask_cache
    s_a = [s for s in ca.lookup_states() if ca.grammar.rule_names[ca.grammar.state_rule[s]] == "str"]
    s_b = [s for s in cb.lookup_states() if cb.grammar.rule_names[cb.grammar.state_rule[s]] == "str"]
    assert [ca.band_keys(s) for s in s_a] == [cb.band_keys(s) for s in s_b]
    root_a, root_b = (int(c.grammar.rule_start[c.grammar.root]) for c in (ca, cb))
    assert ca.band_keys(root_a) != cb.band_keys(root_b)
    ca.ensure(s_a)
    for s, t in zip(s_a, s_b):
        # The same stored arrays serve both grammars (made once, not copied).
        assert all(a is b for x, y in zip(ca.state_masks(s), cb.state_masks(t))
                   for a, b in zip(x.fields(), y.fields()) if isinstance(a, np.ndarray))
    rng = random.Random(3)
    for m in (a, b):
        check_state(m, rng, True)


def test_disk_cache_round_trip(tmp_path):
    info = tokenizer("phi3")
    g = _string_grammar("disk:")
    cg = bind(g, info, cache_dir=tmp_path)
    cg.warm_up(background=False)
    files = sorted(tmp_path.rglob("*.bin"))
    assert len(files) == len({k for s in cg.mask_cache.lookup_states() for k in cg.mask_cache.band_keys(s)})
    files[0].write_bytes(files[0].read_bytes()[:40])  # a truncated file is ignored and rewritten
    store = mask_store(info)
    store.clear()
    before = store.disk_hits
    cg2 = bind(g, info, cache_dir=tmp_path)
    cg2.warm_up(background=False)
    assert store.disk_hits - before == len(files) - 1
    for s in cg.mask_cache.lookup_states():
        for e1, e2 in zip(cg.mask_cache.state_masks(s), cg2.mask_cache.state_masks(s)):
            assert e1.acc_mode == e2.acc_mode and np.array_equal(e1.acc, e2.acc)
            assert np.array_equal(e1.rec_node, e2.rec_node) and np.array_equal(e1.rec_ae, e2.rec_ae)
    m = GrammarMatcher(cg2)
    rng = random.Random(4)
    for text in ("", "disk:", 'disk:"a', 'disk:"a\\', 'disk:"ab"', 'disk:"ab",'):
        m.reset()
        assert m.accept_string(text)
        check_state(m, rng, True)


def test_background_warm_up_computes_every_state():
    info = tokenizer("mistral")
    cg = bind(_string_grammar("bg="), info)
    cache = cg.mask_cache
    cg.warm_up(background=True)
    deadline = time.monotonic() + 120
    while cache.n_computed < len(cache.lookup_states()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.n_computed == len(cache.lookup_states())
    m = GrammarMatcher(cg)
    assert m.accept_string('bg="x",')
    check_state(m, random.Random(5), True)


def test_batch_fill_matches_single_fills():
    info = tokenizer("gpt2")
    g = compiler("gpt2").compile_builtin_json()
    base = GrammarMatcher(g)
    matchers = []
    for text in ('{"a": ', "[1, 2", '{"k": "v', "", "tru", '{"x": [{"y": 1.5e'):
        m = base.fork()
        assert m.accept_string(text)
        matchers.append(m)
    words = (info.vocab_size + 31) // 32
    batch = torch.zeros((len(matchers) + 2, words), dtype=torch.int32)
    rows = [2, 3, 4, 5, 6, 7]
    fill_next_token_bitmasks(matchers, batch, indices=rows, threads=2)
    for m, r in zip(matchers, rows):
        assert np.array_equal(batch[r].numpy(), pack_bool_mask(m.brute_force_mask()))
    assert not batch[:2].any()
    with pytest.raises(StencilError):
        fill_next_token_bitmasks([matchers[0], matchers[0]], batch)
    with pytest.raises(StencilError):
        fill_next_token_bitmasks(matchers, batch, indices=[0])


def test_bitmask_arguments_are_checked():
    info = tokenizer("phi3")
    m = GrammarMatcher(compiler("phi3").compile_regex("ab+"))
    words = (info.vocab_size + 31) // 32
    with pytest.raises(StencilError):
        m.fill_next_token_bitmask(np.zeros((1, words - 1), np.int32))
    with pytest.raises(StencilError):
        m.fill_next_token_bitmask(np.zeros((1, words), np.int64))
    with pytest.raises(IndexError):
        m.fill_next_token_bitmask(np.zeros((1, words), np.int32), 1)
    one_d = np.full(words, -1, np.int32)
    m.fill_next_token_bitmask(one_d)
    assert np.array_equal(one_d, pack_bool_mask(m.brute_force_mask()))


def test_stop_special_and_terminated_rows():
    info = tokenizer("phi3")
    b = GrammarBuilder()
    b.rule("root", seq(lit("ok"), Special("<|end|>"), star(lit("!"))))
    cg = bind(b.build(), info)
    m = GrammarMatcher(cg)
    words = (info.vocab_size + 31) // 32
    rng = random.Random(6)
    end_id = info.special_token_names["<|end|>"]
    assert m.accept_string("ok")
    assert np.flatnonzero(check_state(m, rng, True)).tolist() == [end_id]
    assert m.accept_token(end_id)
    oracle = check_state(m, rng, True)
    assert all(oracle[t] for t in info.stop_token_ids if t != end_id)
    assert m.accept_token(info.stop_token_ids[0]) and m.is_terminated()
    row = np.full((1, words), -1, np.int32)
    m.fill_next_token_bitmask(row)
    assert not row.any()


def test_parser_limit_in_classification_falls_back_to_the_parser():
    info = tokenizer("phi3")
    b = GrammarBuilder()
    b.rule("root", Ref("e"))
    b.rule("e", alt(lit("a"), seq(Ref("e"), Ref("e")), seq(Ref("e"), Ref("e"), Ref("e"))))
    cg = bind(b.build(), info)
    cache = MaskCache(cg, max_items_per_row=4)
    start = int(cg.grammar.rule_start[cg.grammar.rule_id("e")])
    forest = cache.forest
    entries = classify_state(cache.G, cache.flags, start, forest, range(len(forest.bands)), info.max_token_len,
                             max_items_per_row=4)
    # A band whose walk hit the limit gets everything in it uncertain.
    assert any(e.n_accepted == 0 and e.rec_node.tolist() == [forest.node_lo[b]] for b, e in enumerate(entries))
    cg._mask_cache = cache
    m = GrammarMatcher(cg)
    assert m.accept_string("aa")
    check_state(m, random.Random(7), True)


# ----------------------------------------------------------------------------------------------
# The fill's fast paths: a bitmask reused across calls, the suffix memo, bindings after growth
# ----------------------------------------------------------------------------------------------


def greedy_ids(info: TokenizerInfo, text: str) -> list[int]:
    """Longest-match token ids spelling ``text`` (any valid split will do here)."""
    by_bytes = {}
    for t in range(info.vocab_size):
        if info.token_kind[t] == info.KIND_TEXT:
            by_bytes.setdefault(info.decoded_vocab[t], t)
    data, out, i = text.encode(), [], 0
    while i < len(data):
        j = max(k for k in range(i + 1, min(len(data), i + info.max_token_len) + 1) if data[i:k] in by_bytes)
        out.append(by_bytes[data[i:j]])
        i = j
    return out


def assert_row(m: GrammarMatcher, row: np.ndarray) -> None:
    words = (m.tokenizer_info.vocab_size + 31) // 32
    assert np.array_equal(row[:words], pack_bool_mask(m.brute_force_mask())) and not row[words:].any()


def test_reused_bitmask_and_suffix_memo_follow_rollback_reset_and_tensor_changes():
    """One torch bitmask filled again and again (its numpy view is kept per matcher), rows of varying
    index, and the suffix memo, whose key (state, entry, origin) is the same for a string begun at byte 6
    of an object and of an array: only the rewind count in ``meta[3]`` tells the two contexts apart
    (``"}`` is allowed in one, ``"]`` in the other)."""
    info = tokenizer("gpt2")
    m = GrammarMatcher(compiler("gpt2").compile_builtin_json())
    words = (info.vocab_size + 31) // 32
    bitmask = torch.full((3, words + 1), -1, dtype=torch.int32)
    step = 0

    def fill_and_check() -> None:
        nonlocal step
        row = step % 3
        m.fill_next_token_bitmask(bitmask, row - 3 if step % 2 else row)
        assert_row(m, bitmask[row].numpy())
        step += 1

    def walk(text: str) -> None:
        for t in greedy_ids(info, text):
            assert m.accept_token(t)
            fill_and_check()

    walk('{"k":"abc def')
    assert (m._memo[0][:, 0] >= 0).any(), "the suffix memo was never filled"
    m.rollback(m.num_accepted_tokens)
    fill_and_check()
    walk('[1,2,"abc def')
    m.reset()
    walk('{"k":"abc def')
    # The tensor changes in place: a smaller shape, then another tensor's storage.
    bitmask.resize_(2, words)
    with pytest.raises(IndexError):
        m.fill_next_token_bitmask(bitmask, 2)
    m.fill_next_token_bitmask(bitmask, -1)
    assert_row(m, bitmask[1].numpy())
    other = torch.full((2, words), -1, dtype=torch.int32)
    bitmask.set_(other)
    m.fill_next_token_bitmask(bitmask, 1)
    assert_row(m, other[1].numpy())
    flat = np.full(words, -1, np.int32)
    m.fill_next_token_bitmask(flat)
    assert_row(m, flat)
    with pytest.raises(StencilError):
        m.fill_next_token_bitmask(bitmask.to(torch.int64))
    with pytest.raises(TypeError):
        m.fill_next_token_bitmask(bitmask, 0.0)
    flat.flags.writeable = False
    with pytest.raises(StencilError):
        m.fill_next_token_bitmask(flat)


def test_fills_and_accepts_while_the_chart_grows():
    """A document long enough that the chart's arrays are replaced several times while the same
    matcher (and a fork taken half way) accept tokens and fill masks through their bound arguments."""
    info = tokenizer("gpt2")
    m = GrammarMatcher(compiler("gpt2").compile_builtin_json())
    doc = json.dumps({"items": [{"id": i, "name": f"n{i} x", "ok": i % 2 == 0} for i in range(40)]}, indent=1)
    ids = greedy_ids(info, doc)
    words = (info.vocab_size + 31) // 32
    bitmask = torch.zeros((1, words), dtype=torch.int32)
    charts = {id(m._rec.chart)}
    fork = None
    for k, t in enumerate(ids):
        assert m.accept_token(t)
        m.fill_next_token_bitmask(bitmask)
        charts.add(id(m._rec.chart))
        if k % 150 == 149:
            assert_row(m, bitmask[0].numpy())
        if k == len(ids) // 2:
            fork = m.fork()
    assert len(charts) >= 3, "the chart never grew"
    assert_row(m, bitmask[0].numpy())
    assert m.is_completed() and m.accept_token(info.stop_token_ids[0]) and m.is_terminated()
    m.fill_next_token_bitmask(bitmask)
    assert not bitmask.any()
    for t in ids[len(ids) // 2 + 1:]:
        assert fork.accept_token(t)
    fork.fill_next_token_bitmask(bitmask)
    assert_row(fork, bitmask[0].numpy())


@pytest.mark.parametrize("label", ["json", "arith.gbnf", "sql.lark"])
def test_subtree_walks_and_their_memo_equal_brute_force(monkeypatch, label):
    """With no suffix tries, every uncertain set is checked by subtree walks from the kernel item's
    own row, remembered for the fills after (same item) along the token walks."""
    monkeypatch.setattr(masks_module, "SUFFIX_MAX", 0)
    g = dict(grammars_for("json") + grammars_for("cfg"))[label]
    assert walk_and_check(tokenizer("gpt2"), g, 16, 1, seed=11) == 16
