"""The mask cache's bookkeeping around the walk: band entries, merged entries, suffix tries, the shared store.

The walk (tested against the brute-force oracle elsewhere) reports per band the accepted tokens, as
ranges of trie positions, and the dead subtrees below a possible rule end. These tests check the
numba code that turns that into stored and pooled entries, against plain numpy/Python set
arithmetic on random inputs:

* ``_pack_bands``: each band's accepted set comes back as exactly the accepted ids (ACC_LIST) or
  exactly the band's other tokens (ACC_COMPLEMENT), whichever is shorter, sorted; records and end
  positions are copied unchanged; a band past the item limit gets the conservative entry;
* ``_accepted_ranges``: a stored band entry turns back into the ranges of trie positions of exactly
  its accepted tokens (what a donor's results are copied from);
* ``_merge_accepted``: the stored union equals the union of the band sets, in the cheapest form;
* ``_suffix_block``: the trie holds exactly the suffixes ``token[end:]`` of every (token, end) pair,
  in preorder with byte-sorted children, and is absent when a record is unconditional or too large;
* ``MaskStore.get_many``: a key being made by one thread is awaited by another, never made twice,
  and a failed maker leaves the key to be made again;
* ``_Keys.make_rule_keys``: a rule's key is the documented hash of its closure (stored entries on
  disk depend on it), against a plain-Python computation on random grammars.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.parser import grammar_arrays
from stencil.grammar.masks import (
    _FORMAT_VERSION,
    ACC_BITS,
    ACC_COMPLEMENT,
    ACC_LIST,
    ACC_NONE,
    StateMasks,
    _accepted_ranges,
    _Keys,
    _merge_accepted,
    _pack_bands,
    _suffix_block,
    mask_store,
)
from tests.decode.test_masks import random_grammars, tokenizer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def store():
    return mask_store(tokenizer("gpt2"))


def band_tokens(forest, b):
    return forest.trie_tok_ids[forest.band_tok_lo[b]:forest.band_tok_hi[b]]


def decode(mode, data, text):
    """The set of ids a stored accepted set stands for."""
    if mode == ACC_NONE:
        return set()
    if mode == ACC_BITS:
        bits = np.unpackbits(data.view(np.uint8), bitorder="little")
        return set(np.flatnonzero(bits).tolist())
    ids = set(data.view(np.int32).tolist())
    return ids if mode == ACC_LIST else text - ids


def position_ranges(forest, ids):
    """Sorted, disjoint, non-adjacent (start, end) ranges of the trie positions of ``ids``, in plain Python."""
    out: list[list[int]] = []
    for p in sorted(forest.tok_pos[ids].tolist()):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def random_subset(rng, tokens, kind):
    """Empty, tiny, about half, or almost all of ``tokens``: the regimes that pick different storage."""
    n = tokens.shape[0]
    size = {0: 0, 1: int(rng.integers(1, 50)), 2: int(rng.integers(n // 3, 2 * n // 3)), 3: max(0, n - int(rng.integers(0, 50)))}[kind]
    return rng.permutation(tokens)[:min(size, n)].astype(np.int32)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.integers(0, 3), min_size=1, max_size=4),
       limit=st.integers(-1, 3))
def test_packed_band_entries_are_the_walk_output(seed, kinds, limit):
    forest = store().forest
    rng = np.random.default_rng(seed)
    bands = np.arange(min(len(kinds), len(forest.bands)), dtype=np.int64)
    nb = bands.shape[0]
    acc_lo = np.zeros(int(forest.band_tok_hi[-1]), np.int32)
    acc_hi = np.zeros(int(forest.band_tok_hi[-1]), np.int32)
    rec_node = np.zeros(int(forest.node_hi[-1]), np.int32)
    rec_ae_ptr = np.zeros(int(forest.node_hi[-1]) + nb, np.int32)
    rec_ae = np.zeros(4096, np.uint16)
    counts = np.zeros((nb, 6), np.int64)  # columns 5, 6: where the band's end positions start in rec_ae, its ranges
    want = []
    ae_off = 0
    for j, b in enumerate(bands.tolist()):
        accepted = random_subset(rng, band_tokens(forest, b), kinds[j])
        lo = int(forest.band_tok_lo[b])
        ranges = position_ranges(forest, accepted)  # the walk writes ranges of trie positions, in trie order
        acc_lo[lo:lo + len(ranges)] = [r[0] for r in ranges]
        acc_hi[lo:lo + len(ranges)] = [r[1] for r in ranges]
        n_rec = int(rng.integers(0, 5))
        nodes = np.sort(rng.choice(np.arange(forest.node_lo[b], forest.node_hi[b]), n_rec, replace=False)).astype(np.int32)
        ptr = np.concatenate([[0], np.cumsum(rng.integers(0, 4, n_rec))]).astype(np.int32)
        ends = rng.integers(1, 16, int(ptr[-1])).astype(np.uint16)
        rec_node[forest.node_lo[b]:forest.node_lo[b] + n_rec] = nodes
        rec_ae_ptr[forest.node_lo[b] + b:forest.node_lo[b] + b + n_rec + 1] = ptr
        if j == limit:  # this band's sub-chart hit the item limit
            counts[j] = (-1, 0, 0, 0, 0, 0)
            want.append(None)
            continue
        rec_ae[ae_off:ae_off + ends.shape[0]] = ends
        counts[j] = (accepted.shape[0], n_rec, ends.shape[0], 7, ae_off, len(ranges))
        ae_off += ends.shape[0]
        want.append((set(accepted.tolist()), nodes, ptr, ends))
    words = np.zeros(forest.token_node.shape[0] // 32 + 1, np.uint32)
    modes, p, out_acc, out_rec, out_rap, out_ae = _pack_bands(counts, bands, forest.node_lo, forest.band_tok_lo,
                                                              forest.band_tok_hi, forest.trie_tok_ids, acc_lo, acc_hi,
                                                              rec_node, rec_ae_ptr, rec_ae, words)
    assert not words.any()
    for j, b in enumerate(bands.tolist()):
        a = out_acc[p[j, 0]:p[j + 1, 0]]
        recs, rap, ae = out_rec[p[j, 1]:p[j + 1, 1]], out_rap[p[j, 2]:p[j + 1, 2]], out_ae[p[j, 3]:p[j + 1, 3]]
        if want[j] is None:
            assert modes[j] == ACC_NONE and a.size == 0 and recs.tolist() == [forest.node_lo[b]]
            assert rap.tolist() == [0, 0] and ae.size == 0
            continue
        accepted, nodes, ptr, ends = want[j]
        band = set(band_tokens(forest, b).tolist())
        assert (np.diff(a) > 0).all()
        if not accepted:
            assert modes[j] == ACC_NONE and a.size == 0
        elif len(accepted) <= len(band) - len(accepted):
            assert modes[j] == ACC_LIST and set(a.tolist()) == accepted
        else:
            assert modes[j] == ACC_COMPLEMENT and set(a.tolist()) == band - accepted
        assert recs.tolist() == nodes.tolist() and rap.tolist() == ptr.tolist() and ae.tolist() == ends.tolist()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), kind=st.integers(0, 3), b=st.integers(0, 3))
def test_a_stored_entry_gives_back_the_ranges_of_its_accepted_tokens(seed, kind, b):
    forest = store().forest
    b = b % len(forest.bands)
    rng = np.random.default_rng(seed)
    tokens = band_tokens(forest, b)
    accepted = random_subset(rng, tokens, kind)
    others = np.setdiff1d(tokens, accepted).astype(np.int32)
    lo, hi = int(forest.band_tok_lo[b]), int(forest.band_tok_hi[b])
    for mode, ids in ((ACC_LIST, np.sort(accepted)), (ACC_COMPLEMENT, others)):
        r_lo, r_hi = _accepted_ranges(mode, ids, forest.tok_pos, lo, hi)
        assert [[a, z] for a, z in zip(r_lo.tolist(), r_hi.tolist())] == position_ranges(forest, accepted)
    r_lo, r_hi = _accepted_ranges(ACC_NONE, np.zeros(0, np.int32), forest.tok_pos, lo, hi)
    assert r_lo.size == 0 and r_hi.size == 0


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.integers(0, 3), min_size=1, max_size=4))
def test_merged_accepted_set_is_the_union_in_the_cheapest_form(seed, kinds):
    s = store()
    forest = s.forest
    rng = np.random.default_rng(seed)
    text = set(forest.trie_tok_ids.tolist())
    rows, chunks, union = [], [], set()
    off = 0
    for b, kind in enumerate(kinds[:len(forest.bands)]):
        tokens = band_tokens(forest, b)
        accepted = random_subset(rng, tokens, kind)
        union |= set(accepted.tolist())
        others = np.setdiff1d(tokens, accepted).astype(np.int32)
        mode, ids = (ACC_NONE, accepted[:0]) if accepted.size == 0 else (
            (ACC_LIST, np.sort(accepted)) if accepted.size <= others.size else (ACC_COMPLEMENT, others))
        rows.append((mode, off, ids.shape[0], b))
        chunks.append(ids)
        off += ids.shape[0]
    mode, data = _merge_accepted(np.array(rows, np.int64), np.concatenate(chunks), forest.band_bits, s.text_bits, s.n_text)
    assert decode(mode, data, text) == union
    W, n = s.words, len(union)
    if n == 0:
        assert mode == ACC_NONE
    elif min(n, s.n_text - n) > W:
        assert mode == ACC_BITS
    else:
        assert mode == (ACC_LIST if n <= s.n_text - n else ACC_COMPLEMENT)
        assert (np.diff(data.view(np.int32)) > 0).all()


def trie_paths(block):
    """(token id, suffix bytes) for every token in a suffix block, and whether siblings are byte-sorted."""
    n, n_tok = int(block[0]), int(block[1])
    tb, td, ts = (block[2 + k * n:2 + (k + 1) * n] for k in range(3))
    tp = block[2 + 3 * n:3 + 4 * n]
    tids = block[3 + 4 * n:3 + 4 * n + n_tok]
    assert block.shape[0] == 3 + 4 * n + n_tok and tp[-1] == n_tok
    out, path, ordered = [], [], True
    for i in range(1, n):
        del path[td[i] - 1:]
        path.append(int(tb[i]))
        j = i + ts[i]
        if j < n and td[j] == td[i]:
            ordered &= bool(tb[j] > tb[i])
        out += [(int(t), bytes(path)) for t in tids[tp[i]:tp[i + 1]]]
    return out, ordered


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_rec=st.integers(1, 6), unconditional=st.booleans())
def test_suffix_trie_holds_every_suffix_after_every_end(seed, n_rec, unconditional):
    info = tokenizer("gpt2")
    forest = store().forest
    rng = np.random.default_rng(seed)
    # Records at nodes of depth >= 2 (their tokens have at least two bytes, ends lie inside them).
    deep = np.flatnonzero(forest.trie_depth >= 2)
    nodes = np.sort(rng.choice(deep, n_rec, replace=False)).astype(np.int32)
    pairs = np.stack([nodes, np.zeros_like(nodes)], 1).ravel().astype(np.int32)
    pos, pos_ptr = [], [0]
    for node in nodes.tolist():
        k = 0 if unconditional and node == nodes[0] else int(rng.integers(1, 4))
        pos += rng.integers(1, forest.trie_depth[node], k).tolist()
        pos_ptr.append(len(pos))
    pos, pos_ptr = np.array(pos, np.int32), np.array(pos_ptr, np.int64)
    block = _suffix_block(pairs, pos_ptr, pos, forest.trie_tok_ptr, forest.trie_tok_ids, forest.trie_subtree,
                          info.token_bytes, info.token_offsets, 4096)
    want = []
    for j, node in enumerate(nodes.tolist()):
        toks = forest.trie_tok_ids[forest.trie_tok_ptr[node]:forest.trie_tok_ptr[node + forest.trie_subtree[node]]]
        for t in toks.tolist():
            data = info.token_bytes[info.token_offsets[t]:info.token_offsets[t + 1]].tobytes()
            want += [(t, data[e:]) for e in sorted(set(pos[pos_ptr[j]:pos_ptr[j + 1]].tolist()))]
    if unconditional or len(want) > 4096:
        assert block.size == 0
        return
    got, ordered = trie_paths(block)
    assert ordered and sorted(got) == sorted(want)


def entry(tag: int) -> StateMasks:
    return StateMasks(ACC_LIST, np.array([tag], np.int32), 1, np.zeros(0, np.int32), np.zeros(1, np.int32),
                      np.zeros(0, np.uint16))


def test_a_key_in_the_making_is_awaited_not_made_twice():
    s = store()
    keys = (b"over-test-a" + bytes(9), b"over-test-b" + bytes(9))
    made, started, release = [], threading.Event(), threading.Event()

    def slow(todo):
        made.append(list(todo))
        started.set()
        assert release.wait(30)
        return [entry(i) for i in todo]

    results = {}
    maker = threading.Thread(target=lambda: results.setdefault("maker", s.get_many(keys, slow)))
    maker.start()
    assert started.wait(30)
    waiter = threading.Thread(target=lambda: results.setdefault("waiter", s.get_many(keys[::-1], slow)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # waiting for the maker, not making the keys itself
    release.set()
    maker.join(30)
    waiter.join(30)
    assert made == [[0, 1]]
    assert [e.acc[0] for e in results["maker"]] == [0, 1]
    assert results["waiter"] == results["maker"][::-1]
    # The waiter got the maker's arrays (the store keeps them, not copies).
    assert all(a is b for x, y in zip(results["waiter"], results["maker"][::-1])
               for a, b in zip(x.fields(), y.fields()) if isinstance(a, np.ndarray))


def test_the_collector_stops_tracking_stored_entries():
    """A server's store holds tens of thousands of entries: each full collection would walk them
    all, holding the GIL, if they stayed tracked (bench/gc_heap.py)."""
    s = store()
    keys = tuple(b"over-test-gc-%d" % i + bytes(4) for i in range(3))
    got = s.get_many(keys, lambda todo: [entry(i) for i in todo])
    gc.collect()
    assert not any(gc.is_tracked(s._entries[k]) for k in keys)
    assert [e.acc.tolist() for e in s.get_many(keys, lambda todo: pytest.fail("made again"))] == \
        [e.acc.tolist() for e in got]


def test_a_failed_maker_leaves_the_key_to_the_waiter():
    s = store()
    key = (b"over-test-fail" + bytes(6),)
    started, release = threading.Event(), threading.Event()

    def failing(todo):
        started.set()
        assert release.wait(30)
        raise RuntimeError("walk failed")

    errors = []

    def maker():
        try:
            s.get_many(key, failing)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=maker)
    t.start()
    assert started.wait(30)
    got = {}
    w = threading.Thread(target=lambda: got.setdefault("e", s.get_many(key, lambda todo: [entry(5) for _ in todo])))
    w.start()
    release.set()
    t.join(30)
    w.join(30)
    assert len(errors) == 1 and got["e"][0].acc.tolist() == [5]
    assert s.get_many(key, lambda todo: pytest.fail("made again"))[0].acc is got["e"][0].acc


def reference_rule_key(g, r: int) -> bytes:
    """A rule's key, the slow way: BLAKE2b over the version, then per rule of its closure (BFS from
    r, callees in edge order) the digest of its automaton's int32 arrays and its callees' positions."""
    ends = list(g.rule_start[1:]) + [g.n_states]

    def digest(q):
        s0, s1 = int(g.rule_start[q]), int(ends[q])
        e0, e1 = int(g.edge_ptr[s0]), int(g.edge_ptr[s1])
        calls = g.edge_rule[e0:e1]
        h = hashlib.blake2b(digest_size=16)
        for a in (g.state_final[s0:s1], g.edge_ptr[s0:s1 + 1] - e0, g.edge_lo[e0:e1], g.edge_hi[e0:e1],
                  calls >= 0, g.edge_target[e0:e1] - s0):
            h.update(np.asarray(a, np.int32).tobytes())
        return h.digest(), [int(c) for c in calls if c >= 0]

    order, index = [r], {r: 0}
    out = f"stencil-masks-{_FORMAT_VERSION}".encode()
    for q in order:
        d, calls = digest(q)
        for c in calls:
            if c not in index:
                index[c] = len(order)
                order.append(c)
        out += d + np.array([index[c] for c in calls], np.int64).tobytes()
    return hashlib.blake2b(out, digest_size=16).digest()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=random_grammars(), data=st.data())
def test_rule_keys_are_the_documented_hash(g, data):
    keys = _Keys(g, grammar_arrays(g))
    first = data.draw(st.lists(st.integers(0, g.n_rules - 1), unique=True, max_size=g.n_rules))
    keys.make_rule_keys(np.array(first, np.int64))  # some digests exist before the rest are made
    keys.make_rule_keys(np.arange(g.n_rules))
    assert keys.rule_known.all()
    for r in range(g.n_rules):
        assert keys.rule_keys[r].tobytes() == reference_rule_key(g, r), r
