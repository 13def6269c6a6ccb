"""The background warm-up starts where the decoders stand (``MaskCache.frontier``).

The oracle for the frontier is the chart itself: at every byte of real MaskBench instances, the
states a mask would look up after the next byte must all be among the frontier's states (the
search reaches past the end of the rule being matched, back into its callers), and the states of
the current row come first. The worker test checks the order in which a real background thread
computes entries: the next step's states before the rest of the grammar.
"""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import pytest

from stencil.decode.matcher import GrammarMatcher
from stencil.errors import SchemaError
from stencil.grammar.compiler import GrammarCompiler
from stencil.grammar.vocab import TokenizerInfo
from tests.conftest import jsonschemabench_records, tokenizer_dir


@functools.lru_cache(maxsize=None)
def compiler() -> GrammarCompiler:
    return GrammarCompiler(TokenizerInfo.from_file(tokenizer_dir("gpt2")), warm_up=False)


def row_states(m: GrammarMatcher, *, kernel_only: bool) -> set[int]:
    """States with edges of the chart's last row: all items', or only the kernel items' (origin
    before the row: what a mask looks up), as the mask kernel defines them."""
    st, org, row_ptr, _, _, meta = m._rec.chart
    flags = m._cache.flags
    n0 = int(meta[0])
    cur = n0 - 1
    if cur == 0 and kernel_only:
        g = m.compiled.grammar
        return {int(g.rule_start[g.root])}
    return {int(st[k]) for k in range(row_ptr[cur], row_ptr[n0])
            if flags[st[k]] and (org[k] < cur or not kernel_only)}


@functools.lru_cache(maxsize=None)
def instances(n: int) -> list[tuple[dict, str]]:
    """(schema, valid instance text) for the first ``n`` dev records, by id, that the frontend accepts."""
    out = []
    for r in sorted(jsonschemabench_records(), key=lambda r: r["id"]):
        valid = [t["data"] for t in r.get("tests", []) if t.get("valid")]
        text = json.dumps(valid[0]) if valid else ""
        if not valid or not 40 <= len(text) <= 400:
            continue
        try:
            compiler().compile_json_schema(r["schema"])
        except SchemaError:
            continue
        out.append((r["schema"], text))
        if len(out) == n:
            break
    return out


def test_frontier_covers_the_next_step_and_starts_at_the_row():
    checked = 0
    for schema, text in instances(8):
        cg = compiler().compile_json_schema(schema)
        cache = cg.mask_cache
        everything = cg.grammar.n_states
        m = GrammarMatcher(cg)
        for ch in text.encode():
            missing = cache.pools[0] < 0
            front = cache.frontier(everything)
            assert len(set(front)) == len(front)
            assert all(cache.flags[s] and missing[s] for s in front)
            here = {s for s in row_states(m, kernel_only=False) if missing[s]}
            assert set(front[:len(here)]) == here
            nxt = m.fork()
            assert nxt.accept_bytes(bytes([ch]))
            need = {s for s in row_states(nxt, kernel_only=True) if missing[s]}
            assert need <= set(front), (text, ch)
            assert m.accept_bytes(bytes([ch]))
            checked += 1
    assert checked > 8 * 40


def test_frontier_is_empty_where_everything_is_computed_and_limits_its_answer():
    schema, text = instances(1)[0]
    cg = compiler().compile_json_schema(schema)
    m = GrammarMatcher(cg)
    m.accept_bytes(text[: len(text) // 2].encode())
    cache = cg.mask_cache
    assert len(cache.frontier(3)) == 3
    assert cache.frontier(3) == cache.frontier(100)[:3]
    cache.ensure(cache.lookup_states())
    assert cache.frontier(100) == []


def test_background_warm_up_computes_the_decoders_next_states_first():
    # A schema whose full warm-up takes many states; the decoder stands deep inside it.
    props = {f"field_{i:02d}": {"type": "object", "properties": {"v": {"type": "string"}, "n": {"type": "integer"}}}
             for i in range(40)}
    cg = compiler().compile_json_schema({"type": "object", "properties": props, "required": sorted(props)})
    cache = cg.mask_cache
    prefix = "{" + ", ".join(f'"field_{i:02d}": {{"v": "a", "n": 1}}' for i in range(30)) + ', "field_30": {"v": "'
    m = GrammarMatcher(cg)
    assert m.accept_string(prefix)
    nxt = m.fork()
    assert nxt.accept_string('x", "n')
    need = row_states(m, kernel_only=True) | row_states(nxt, kernel_only=True)
    del nxt  # untracked again: the worker follows m alone
    order = cache.lookup_states().tolist()
    from_root = max(order.index(s) for s in need)  # entries BFS from the root alone computes first
    assert from_root > 200
    cg.warm_up(background=True)
    deadline = time.monotonic() + 120
    while not all(cache.pools[0][s] >= 0 for s in need) and time.monotonic() < deadline:
        time.sleep(0.001)
    computed = cache.n_computed
    assert all(cache.pools[0][s] >= 0 for s in need)
    assert computed < from_root // 2, (computed, from_root)
    # And the entries are the ones the decoder needs: the masks there equal the oracle.
    nxt = m.fork()
    assert nxt.accept_string('x", "n')
    for x in (m, nxt):
        bm = np.zeros((1, (cg.vocab_size + 31) // 32), np.int32)
        x.fill_next_token_bitmask(bm, 0)
        oracle = x.brute_force_mask()
        got = np.unpackbits(bm.view(np.uint8), bitorder="little")[: cg.vocab_size].astype(bool)
        assert np.array_equal(got, oracle)


@pytest.mark.parametrize("limit", [0, 1])
def test_frontier_survives_a_chart_it_cannot_read(limit):
    schema, _ = instances(2)[1]  # a grammar nothing computed entries for
    cg = compiler().compile_json_schema(schema)
    m = GrammarMatcher(cg)
    st, org, row_ptr, _, _, meta = m._rec.chart
    saved = meta.copy()
    try:
        meta[0] = row_ptr.shape[0] + 5  # as a chart caught mid-change might read
        assert cg.mask_cache.frontier(limit) == []
    finally:
        meta[:] = saved
    assert len(cg.mask_cache.frontier(limit)) == limit
