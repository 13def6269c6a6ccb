"""``GrammarMatcher.try_tokens``, the batch check AWRS uses, against the brute-force mask.

At states reached by random walks through real grammars (a JSON Schema with strings, enums and
numbers, and a regex), with two real tokenizers, the verdicts of ``try_tokens`` on a batch that
mixes accepted, rejected, uncertain, special, stop and repeated ids must equal the brute-force
mask (every token run through the parser), leave the matcher's state unchanged, and agree with
``try_token`` one by one. Bad ids raise a typed error; a terminated matcher accepts nothing.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest

from stencil.decode.matcher import GrammarMatcher
from stencil.errors import ParserLimitError, StencilError
from stencil.grammar.compiler import GrammarCompiler
from stencil.grammar.vocab import TokenizerInfo
from tests.conftest import tokenizer_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "n": {"type": "integer"},
        "xs": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["name", "kind"],
}
REGEX = r"(yes|no)( [a-z]{1,6}){0,3}\."


@functools.cache
def compiler(name: str) -> GrammarCompiler:
    return GrammarCompiler(TokenizerInfo.from_file(tokenizer_dir(name)), warm_up=False)


def snapshot(m: GrammarMatcher) -> tuple:
    rec = m._rec
    n = int(rec._meta[0])
    end = int(rec._row_ptr[n])
    return n, rec._st[:end].tobytes(), rec._org[:end].tobytes(), m.num_accepted_tokens, m.is_completed()


def batch_for(m: GrammarMatcher, oracle: np.ndarray, rng: random.Random) -> list[int]:
    """Accepted and rejected ids, every stop and special id, and a repeat."""
    vocab = oracle.size
    ok = np.flatnonzero(oracle).tolist()
    bad = np.flatnonzero(~oracle).tolist()
    info = m.tokenizer_info
    ids = rng.sample(ok, min(12, len(ok))) + rng.sample(bad, min(12, len(bad)))
    ids += list(info.stop_token_ids) + [int(t) for t in np.flatnonzero(info.token_kind != info.KIND_TEXT)[:4]]
    ids += [rng.randrange(vocab) for _ in range(8)]
    ids.append(ids[0])
    rng.shuffle(ids)
    return ids


@pytest.mark.parametrize("tokenizer", ["gpt2", "llama3"])
@pytest.mark.parametrize("grammar", ["schema", "regex"])
def test_try_tokens_matches_brute_force(tokenizer, grammar):
    c = compiler(tokenizer)
    cg = c.compile_json_schema(SCHEMA) if grammar == "schema" else c.compile_regex(REGEX)
    rng = random.Random(f"{tokenizer}-{grammar}")
    for walk in range(3):
        m = GrammarMatcher(cg)
        for _ in range(12):
            oracle = m.brute_force_mask()
            before = snapshot(m)
            ids = batch_for(m, oracle, rng)
            got = m.try_tokens(ids)
            assert got == [bool(oracle[t]) for t in ids]
            assert snapshot(m) == before, "try_tokens changed the state"
            assert [m.try_token(t) for t in ids] == got
            for pair in zip(ids[::2], ids[1::2]):  # the two-token path AWRS takes
                assert m.try_tokens(pair) == [bool(oracle[t]) for t in pair]
            if walk == 0 and rng.random() < 0.5:
                m.fill_next_token_bitmask(np.zeros((1, (oracle.size + 31) // 32), np.int32))  # cache state
            allowed = np.flatnonzero(oracle)
            if allowed.size == 0:
                break
            t = int(rng.choice(allowed.tolist()))
            assert m.accept_token(t)
            if m.is_terminated():
                assert not any(m.try_tokens(ids))
                break


def test_try_tokens_rejects_bad_ids_and_keeps_state():
    c = compiler("gpt2")
    m = GrammarMatcher(c.compile_regex(REGEX))
    assert m.accept_string("ye")
    before = snapshot(m)
    vocab = m.compiled.vocab_size
    huge = 1 << 70  # does not fit in int64: still a StencilError, not numpy's or numba's OverflowError
    for bad in ([vocab], [-1], [0, vocab + 5], [vocab + 5, 0], [huge, 0], [0, -huge], [0, 1, huge],
                [np.uint64(2**64 - 1), 0]):
        with pytest.raises(StencilError, match="outside the vocabulary"):
            m.try_tokens(bad)
        if len(bad) <= 2:
            with pytest.raises(StencilError, match="outside the vocabulary"):
                m.try_token(bad[0] if bad[0] != 0 else bad[1])
        with pytest.raises(StencilError, match="outside the vocabulary"):
            m.accept_token(bad[-1] if bad[-1] != 0 else bad[0])
        assert snapshot(m) == before
    assert m.try_tokens([]) == []
    many = list(range(200)) * 2  # more than one kernel call's 62
    assert m.try_tokens(many) == [m.try_token(t) for t in many]


def chart_arrays(m: GrammarMatcher) -> tuple:
    """The chart's storage arrays (each growth replaces one)."""
    return m._rec._st, m._rec._ht_key, m._rec._row_ptr


def replaced(before: tuple, after: tuple) -> bool:
    return any(a is not b for a, b in zip(before, after))


def test_try_tokens_follows_the_chart_as_it_grows():
    """``try_tokens`` binds its kernel arguments once; they must follow the chart when it grows,
    inside a check (the parser needs room for a token's scratch rows) and between checks (accepted
    tokens fill it). The oracle is ``accept_token`` plus ``rollback`` on a fork (the parser run
    directly). The test also proves that both kinds of growth happened."""
    c = compiler("gpt2")
    cg = c.compile_builtin_json()
    vocab = cg.vocab_size
    rng = random.Random(7)
    grew_inside = grew_between = 0
    m = GrammarMatcher(cg)
    text = '{"a": [1, 2.5, {"b": "' + "xy" * 600 + '"}, [true, null]], "c": {"d": [[[["e"]]]]}}'
    pos = 0
    while pos < len(text):
        ch = text[pos:pos + rng.randint(1, 60)]  # long steps make the chart grow between checks too
        pos += len(ch)
        ids = [rng.randrange(vocab) for _ in range(6)] + [int(b) for b in ch[:1].encode()]
        ref = m.fork()
        want = []
        for t in ids:
            ok = ref.accept_token(t)
            want.append(ok)
            if ok:
                ref.rollback(1)
        arrays = chart_arrays(m)
        assert m.try_tokens(ids[:2]) == want[:2]
        assert m.try_tokens(ids) == want
        grew_inside += replaced(arrays, chart_arrays(m))
        arrays = chart_arrays(m)
        assert m.accept_string(ch)
        grew_between += replaced(arrays, chart_arrays(m))
    assert grew_inside > 0 and grew_between > 0



def test_try_tokens_raises_the_parser_limit_and_keeps_state():
    """An ambiguous grammar whose rows grow by two items per byte: a token that would take a row
    past ``max_items_per_row`` raises ParserLimitError from the check and leaves the state as it
    was; a shorter token is still judged."""
    c = compiler("gpt2")
    info = c.tokenizer_info
    spelled = {bytes(info.token_bytes[info.token_offsets[t]:info.token_offsets[t + 1]]): t
               for t in range(info.vocab_size) if info.token_kind[t] == info.KIND_TEXT}
    m = GrammarMatcher(c.compile_grammar('root ::= x\nx ::= x x | "a"\n'), max_items_per_row=20)
    assert m.accept_string("a" * 8)  # rows of 4, 6, ..., 18 items
    before = snapshot(m)
    with pytest.raises(ParserLimitError):
        m.try_tokens([spelled[b"a"], spelled[b"aaaa"]])
    assert snapshot(m) == before
    assert m.try_tokens([spelled[b"a"], spelled[b"b"]]) == [True, False]
    assert snapshot(m) == before


def test_try_tokens_follows_the_cache_as_it_publishes_entries():
    """The check kernel reads the cache's pools through the snapshot it bound. Another matcher's
    masks, a few steps ahead on the same text, publish new entries (in place, or as grown copies of
    the pools) while this matcher keeps checking: its verdicts must stay exact, from an outdated
    snapshot (states it lacks are parsed) and after it rebinds. The oracle is the brute-force mask;
    a fork (a fresh binding) must agree too. The test also proves that the pools grew under a bound
    snapshot and that the matcher then rebound."""
    c = compiler("gpt2")
    cg = c.compile_builtin_json()
    cache = cg.mask_cache
    rng = random.Random(11)
    words = (cg.vocab_size + 31) // 32
    text = '{"a": [1, -2.5e3, {"b": "x\\n", "c": [true, false, null]}], "d": {"e": {"f": [[]], "g": {}}}}'
    m = GrammarMatcher(cg)
    ahead = m.fork()
    ahead_pos = 0
    grew = rebound = 0
    for pos in range(len(text)):
        oracle = m.brute_force_mask()
        ids = batch_for(m, oracle, rng)
        pairs = list(zip(ids[::2], ids[1::2]))
        want = [[bool(oracle[t]) for t in p] for p in pairs]
        assert m.try_tokens(pairs[0]) == want[0]
        bound = m._check[0]
        while ahead_pos < min(pos + 4, len(text)):  # the other matcher fills masks a few bytes ahead
            assert ahead.accept_string(text[ahead_pos])
            ahead_pos += 1
            ahead.fill_next_token_bitmask(np.zeros((1, words), np.int32))
        grown = any(a is not b for a, b in zip(bound, cache.pools))
        assert [m.try_tokens(p) for p in pairs[1:]] == want[1:]
        assert m.fork().try_tokens(ids) == [bool(oracle[t]) for t in ids]
        assert m.accept_string(text[pos])
        if grown:  # the next check reaches states only the grown pools have: it must rebind
            grew += 1
            assert m.try_tokens(pairs[0]) == [bool(x) for x in m.brute_force_mask()[list(pairs[0])]]
            rebound += m._check[0] is cache.pools
    assert grew > 0 and rebound > 0


def test_pack_checks_the_kernel_layout():
    """The check kernel trusts the packed addresses, so an argument that does not match the layout
    (wrong dtype, rank, contiguity, a read-only array, or a missing one) must be refused before it
    is packed."""
    from stencil.decode.matcher import _pack_bound

    m = GrammarMatcher(compiler("gpt2").compile_regex(REGEX))
    m.try_tokens([0, 1])  # binds
    bound = m._check[1]
    st_index = next(i for i, a in enumerate(bound) if a is m._rec._st)
    packed = _pack_bound(bound)
    assert packed[3 * (st_index + 9)] == m._rec._st.ctypes.data  # the grammar tuple takes ten slots
    readonly = bound[st_index].copy()
    readonly.flags.writeable = False
    for wrong in (bound[st_index].astype(np.int64), bound[st_index][::2], bound[st_index].reshape(1, -1), readonly):
        with pytest.raises(TypeError):
            _pack_bound(bound[:st_index] + (wrong,) + bound[st_index + 1:])
    with pytest.raises(TypeError):
        _pack_bound(bound[:-1])
