"""The adaptive token-mask cache: for each automaton state, which tokens it accepts on its own.

Why this works
--------------
The recognizer's current row holds Earley items ``(state, origin)``. Its *kernel* items are those
scanned or completed into it (origin before the row; on row 0, the root's start item); every other
item was predicted on this row from one of them. A token's bytes are read from some kernel item X:
either the whole token stays inside X's rule instance (nested rules may be called and finish inside
the token), or X's rule instance *ends* after k >= 1 bytes and the rest depends on X's callers. So
each token can be classified per automaton state s, without knowing any caller, by reading it from
a fresh sub-chart seeded with ``(s, 0)``:

* **accepted**: some path consumes the whole token while staying inside the rule (an item is alive
  after its last byte);
* **uncertain**: not accepted, but the rule of s can end after k bytes, 1 <= k < len(token), and
  the byte after that end could follow the rule somewhere in the grammar;
* **rejected**: everything else.

An end before the first byte (k = 0) never makes a token uncertain: in the real chart that
completion has already advanced the callers, which are kernel items themselves. Row 0 of the
sub-chart is an empty dummy, so the seed rule's own completion advances nothing, and "the rule can
end here" is "an item with origin 0 is in a final state".

Then ``mask = ⋃ accepted(s) ∪ {t ∈ ⋃ uncertain(s) : the full parser accepts t}`` over the distinct
states s of the row's kernel items. Only states matter, not origins, so one entry per state serves
every request, every position and every grammar that shares the state's sub-grammar.

Context expansion. Whether a token is uncertain depends on the bytes that can follow the rule, which
depend on the grammar around it; the walk itself does not. So the cached (shareable) part records,
for every dead trie subtree below a point where the rule could end, the end positions on its path.
A grammar *resolves* them with FOLLOW (over bytes) of the state's rule: a subtree stays uncertain
only if a byte after one of its ends can follow the rule. The mask fill then checks uncertain tokens
against the real context: it completes the rule into a fresh chart row once and reads the distinct
*suffixes* after the ends (a small trie per entry, :func:`_suffix_block`), or walks the subtrees.

Storage (XGrammar's adaptive choice). The accepted set is stored as the cheapest of: a sorted id
list, a sorted list of the text tokens *not* accepted (the complement: string-content states accept
almost everything), or a bitset of ``ceil(V/32)`` words.

Computing a state's entry
-------------------------
The vocabulary is split by token length into bands (:class:`Forest`), one trie per band; a band's
classification depends only on what the state reaches within the band's longest token, which is the
band's cross-grammar key (:func:`_state_key_bytes`): positions of a counter (``char{0,255}``) far
enough from its bound share entries, and so do states of different grammars with equal horizons.

:func:`classify_state` walks a band's trie once per state (all missing bands in one kernel call).
Each depth keeps either a *stack configuration* (a top state, return states of the rules called
inside the token, and the origin of the bottom item), stepped deterministically with one byte of
FIRST lookahead (:func:`_stack_step`), or a materialized Earley row of the sub-chart, used where
several derivations compete (the path is replayed from the last materialized row). A rejected prefix
skips its subtree; a configuration that loops back to itself on a set of characters accepts every
child subtree made only of them without walking it (:func:`_absorption`, exact for UTF-8).

Entries are built lazily on a state's first visit, shared process-wide per vocabulary
(:class:`MaskStore`), optionally persisted on disk, and can be finished in a background thread
(:meth:`MaskCache.warm_up`): the kernels release the GIL.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numba
import numpy as np

from stencil.decode.parser import _KERNEL, GROW, LIMIT, _add, _closure, _full, _row_cap, advance, grammar_arrays
from stencil.grammar.vocab import TokenizerInfo, _build_trie

__all__ = [
    "ACC_NONE",
    "ACC_LIST",
    "ACC_BITS",
    "ACC_COMPLEMENT",
    "HAS_BYTES",
    "HAS_RULES",
    "Forest",
    "StateMasks",
    "MaskStore",
    "MaskCache",
    "mask_store",
    "decoder_active",
    "compiling",
    "classify_state",
    "state_flags",
    "grammar_sets",
    "min_lengths",
    "byte_classes",
]

# Per-state flags.
HAS_BYTES = 1  # the state has a byte edge (symbol < 256): it can scan text
HAS_RULES = 2  # the state has a rule edge

# How a state's accepted set is stored.
ACC_NONE = 0
ACC_LIST = 1  # sorted accepted ids
ACC_BITS = 2  # a bitset row (uint32 words)
ACC_COMPLEMENT = 3  # sorted ids of the text tokens that are NOT accepted

AE_FULL = -10  # _classify_kernel: the end-position buffer is full

# Bump when the classification or the entry format changes: it is part of every cache key.
_FORMAT_VERSION = 3


def _compiled(kernel, args: tuple):
    """``kernel`` compiled for the types of ``args``, as a plain callable (``stencil.decode.matcher._overload``).

    A first visit calls its kernels once each, so the dispatcher's typing of every argument (about
    60 for the walk) is a fixed cost of every first visit; callers bind once and call directly.
    """
    from stencil.decode.matcher import _overload  # here, not at the top: the matcher imports this module

    return _overload(kernel, args)


# ----------------------------------------------------------------------------------------------
# Grammar analysis: state flags, FOLLOW sets over bytes
# ----------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def state_flags(edge_ptr, edge_lo, edge_rule):
    """uint8 per state: HAS_BYTES if it has a byte edge (symbol < 256), HAS_RULES if it has a rule edge."""
    n = edge_ptr.shape[0] - 1
    out = np.zeros(n, np.uint8)
    for s in range(n):
        f = 0
        for e in range(edge_ptr[s], edge_ptr[s + 1]):
            if edge_rule[e] >= 0:
                f |= HAS_RULES
            elif edge_lo[e] < 256:
                f |= HAS_BYTES
        out[s] = f
    return out


@numba.njit(**_KERNEL, inline="always")
def _union_changed(dst, i, src, j):
    """dst[i] |= src[j] over 4 words; True if dst changed."""
    changed = False
    for w in range(4):
        v = dst[i, w] | src[j, w]
        if v != dst[i, w]:
            dst[i, w] = v
            changed = True
    return changed


@numba.njit(cache=True, nogil=True)
def grammar_sets(G):
    """Byte sets of the grammar: (FIRST per state, can-end-empty per state, FOLLOW per rule).

    FIRST(state) (``uint64[n_states, 4]``) = bytes of its byte edges, FIRST of the rules it calls,
    and past nullable calls the FIRST of the target. ``end_null[state]``: the rule can end from
    the state without reading a byte. FOLLOW(rule) (``uint64[n_rules, 4]``), the bytes that can
    come right after the rule ends: for every call ``p --<R>--> q`` in rule A, FIRST(q) ⊆ FOLLOW(R),
    and if ``end_null[q]``, FOLLOW(A) ⊆ FOLLOW(R). Special-token symbols are left out: text can
    never spell them, so no text token continues through one.
    """
    rule_start, rule_nullable, state_rule, state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target, root = G
    ns = state_rule.shape[0]
    nr = rule_start.shape[0]
    one = np.uint64(1)
    first = np.zeros((ns, 4), np.uint64)
    for s in range(ns):
        for e in range(edge_ptr[s], edge_ptr[s + 1]):
            if edge_rule[e] >= 0:
                break
            for b in range(edge_lo[e], min(edge_hi[e], 255) + 1):
                first[s, b >> 6] |= one << np.uint64(b & 63)
    changed = True
    while changed:
        changed = False
        for s in range(ns - 1, -1, -1):
            for e in range(edge_ptr[s], edge_ptr[s + 1]):
                r = edge_rule[e]
                if r < 0:
                    continue
                if _union_changed(first, s, first, rule_start[r]):
                    changed = True
                if rule_nullable[r] != 0 and _union_changed(first, s, first, edge_target[e]):
                    changed = True
    end_null = np.zeros(ns, np.bool_)
    for s in range(ns):
        end_null[s] = state_final[s] != 0
    changed = True
    while changed:
        changed = False
        for s in range(ns - 1, -1, -1):
            if end_null[s]:
                continue
            for e in range(edge_ptr[s], edge_ptr[s + 1]):
                r = edge_rule[e]
                if r >= 0 and rule_nullable[r] != 0 and end_null[edge_target[e]]:
                    end_null[s] = True
                    changed = True
                    break
    follow = np.zeros((nr, 4), np.uint64)
    changed = True
    while changed:
        changed = False
        for p in range(ns):
            a = state_rule[p]
            for e in range(edge_ptr[p], edge_ptr[p + 1]):
                r = edge_rule[e]
                if r < 0:
                    continue
                q = edge_target[e]
                if _union_changed(follow, r, first, q):
                    changed = True
                if end_null[q] and _union_changed(follow, r, follow, a):
                    changed = True
    return first, end_null, follow


@numba.njit(cache=True, nogil=True)
def min_lengths(G):
    """int64 per rule: the fewest bytes it can derive (a large number for a rule that derives nothing)."""
    rule_start, rule_nullable, state_rule, state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target, root = G
    ns = state_rule.shape[0]
    inf = np.int64(1) << 40
    dist = np.full(ns, inf, np.int64)  # fewest bytes from a state to the end of its rule
    for s in range(ns):
        if state_final[s] != 0:
            dist[s] = 0
    changed = True
    while changed:
        changed = False
        for s in range(ns - 1, -1, -1):
            for e in range(edge_ptr[s], edge_ptr[s + 1]):
                r = edge_rule[e]
                w = np.int64(1) if r < 0 else dist[rule_start[r]]
                d = w + dist[edge_target[e]]
                if d < dist[s]:
                    dist[s] = d
                    changed = True
    out = np.empty(rule_start.shape[0], np.int64)
    for r in range(rule_start.shape[0]):
        out[r] = dist[rule_start[r]]
    return out


_UTF8_CUTS = np.array([0x80, 0x90, 0xA0, 0xC0, 0xC2, 0xE0, 0xE1, 0xED, 0xEE, 0xF0, 0xF1, 0xF4, 0xF5], np.int64)


@numba.njit(cache=True, nogil=True)
def byte_classes(G, utf8_cuts):
    """Bytes the grammar cannot tell apart: (representatives, class of each byte, bytes of each class).

    Two bytes in no byte edge's range boundary apart (and on the same side of every UTF-8
    boundary in ``utf8_cuts``) are read the same way by every state, and every FIRST set holds
    both or neither, so a stack step on one predicts the step on the other. Returns ``reps``
    (int64, one byte per class, ascending), ``cls`` (int64[256]) and ``masks`` (uint64[n, 4]).
    """
    edge_lo, edge_hi, edge_rule = G[5], G[6], G[7]
    cut = np.zeros(257, np.bool_)
    cut[0] = True
    for c in utf8_cuts:
        cut[c] = True
    for e in range(edge_lo.shape[0]):
        if edge_rule[e] < 0 and edge_lo[e] < 256:
            cut[edge_lo[e]] = True
            cut[min(edge_hi[e], 255) + 1] = True
    cls = np.empty(256, np.int64)
    k = -1
    for b in range(256):
        if cut[b]:
            k += 1
        cls[b] = k
    reps = np.empty(k + 1, np.int64)
    masks = np.zeros((k + 1, 4), np.uint64)
    for b in range(255, -1, -1):
        reps[cls[b]] = b
        masks[cls[b], b >> 6] |= np.uint64(1) << np.uint64(b & 63)
    return reps, cls, masks


@numba.njit(**_KERNEL, inline="always")
def _put_varint(buf, o, v):
    """LEB128 of the non-negative v at ``buf[o:]``; the new o. Prefix-free, so fields need no separators."""
    v = np.uint64(v)
    while v >= np.uint64(128):
        buf[o] = np.uint8((v & np.uint64(127)) | np.uint64(128))
        o += 1
        v >>= np.uint64(7)
    buf[o] = np.uint8(v)
    return o + 1


@numba.njit(cache=True, nogil=True)
def _structure(G, rule_minlen, s, s_end, horizons, rule_keys, rule_known, version, work, by_id):
    """What state s can reach within each of ``horizons`` bytes, inside its rule, as bytes.

    A token walk from s reads at most ``horizon`` bytes, so states further away (in fewest bytes)
    cannot change its classification. States are numbered in BFS order from s; a byte edge that
    would be the (horizon+1)-th byte is dropped, a rule edge whose return lies beyond the horizon
    keeps its callee but loses its target. Special-token edges are dropped (text never reads them).
    Callees are numbered by first appearance and followed by their keys (``rule_keys[r]``, 16
    bytes, valid where ``rule_known[r]``). Per horizon: ``version``, the horizon, then per state its
    final flag, its edges (byte edge: 0, lo, hi, target; rule edge: 1, callee number, target + 1 or
    0) and 2, all LEB128 (:func:`_put_varint`), then the callees' keys: a self-delimiting encoding,
    so equal bytes mean equal structures. With ``by_id``, each callee is its rule id (LEB128)
    instead of its key: exact within one grammar, and never missing. Returns (buffer, length, m):
    band k's bytes are ``buffer[work[k]:work[k + 1]]``; when m > 0, they are not valid and ``work[nh
    + 1:nh + 1 + m]`` lists the rules whose key is missing (make them, call again). ``work``:
    int64, ``nh + 1`` (+ ``n_rules`` without ``by_id``).
    """
    rule_start, rule_nullable, state_rule, state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target, root = G
    base = rule_start[state_rule[s]]
    n = s_end - base
    n_edges = edge_ptr[s_end] - edge_ptr[base]
    inf = np.int64(1) << 40
    far = horizons.max()
    # Fewest bytes from s to each state of the rule (up to the farthest horizon): a label-correcting
    # search, each state on the work stack at most once.
    dist = np.full(n, inf, np.int64)
    dist[s - base] = 0
    on_stack = np.zeros(n, np.bool_)
    stack = np.empty(n, np.int64)
    stack[0] = s
    on_stack[s - base] = True
    top = 1
    while top > 0:
        top -= 1
        p = stack[top]
        on_stack[p - base] = False
        for e in range(edge_ptr[p], edge_ptr[p + 1]):
            r = edge_rule[e]
            if r < 0 and edge_lo[e] > 255:
                continue
            d = dist[p - base] + (1 if r < 0 else rule_minlen[r])
            t = edge_target[e]
            if d <= far and d < dist[t - base]:
                dist[t - base] = d
                if not on_stack[t - base]:
                    on_stack[t - base] = True
                    stack[top] = t
                    top += 1
    nh = horizons.shape[0]
    out = np.empty(4096, np.uint8)  # grown on demand: most states reach little within a horizon
    work[0] = 0
    callees = np.empty(max(n_edges, 1), np.int64)
    n_missing = 0
    idx = np.empty(n, np.int64)
    queue = np.empty(n, np.int64)
    o = 0
    for h in range(nh):
        horizon = horizons[h]
        idx[:] = -1
        idx[s - base] = 0
        queue[0] = s
        n_queue = 1
        nc = 0
        o = _put_varint(out, o, version)
        o = _put_varint(out, o, horizon)
        head = 0
        while head < n_queue:
            p = queue[head]
            head += 1
            # Room for this state: its flag and end (11 bytes), per edge a tag and three varints (31).
            need = o + 11 + 31 * (edge_ptr[p + 1] - edge_ptr[p])
            if need > out.shape[0]:
                grown = np.empty(2 * need, np.uint8)
                grown[:o] = out[:o]
                out = grown
            o = _put_varint(out, o, state_final[p])
            for e in range(edge_ptr[p], edge_ptr[p + 1]):
                r = edge_rule[e]
                t = edge_target[e]
                if r < 0:
                    if edge_lo[e] > 255 or dist[p - base] + 1 > horizon:
                        continue
                    ti = idx[t - base]
                    if ti < 0:
                        ti = n_queue
                        idx[t - base] = ti
                        queue[n_queue] = t
                        n_queue += 1
                    out[o] = 0
                    o = _put_varint(out, o + 1, edge_lo[e])
                    o = _put_varint(out, o, edge_hi[e])
                    o = _put_varint(out, o, ti)
                else:
                    ci = -1
                    for k in range(nc):
                        if callees[k] == r:
                            ci = k
                            break
                    if ci < 0:
                        ci = nc
                        callees[nc] = r
                        nc += 1
                    ti = -1
                    if dist[p - base] + rule_minlen[r] <= horizon:
                        ti = idx[t - base]
                        if ti < 0:
                            ti = n_queue
                            idx[t - base] = ti
                            queue[n_queue] = t
                            n_queue += 1
                    out[o] = 1
                    o = _put_varint(out, o + 1, ci)
                    o = _put_varint(out, o, ti + 1)
            out[o] = 2  # end of this state's edges
            o += 1
        if o + 16 * nc + 20 > out.shape[0]:  # the keys, and the next band's version and horizon
            grown = np.empty(2 * (o + 16 * nc + 20), np.uint8)
            grown[:o] = out[:o]
            out = grown
        for k in range(nc):
            r = callees[k]
            if by_id:
                o = _put_varint(out, o, r)
            elif rule_known[r] != 0:
                out[o:o + 16] = rule_keys[r]
                o += 16
            elif horizon == far:
                # Every band's callees are among the farthest horizon's: list them from that one.
                work[nh + 1 + n_missing] = r
                n_missing += 1
        work[h + 1] = o
    return out, o, n_missing


@numba.njit(**_KERNEL, inline="always")
def _put_le(buf, o, v, n):
    """The n-byte little-endian two's complement of v at ``buf[o:]`` (numpy's ``tobytes`` on this machine); the new o."""
    u = np.uint64(np.int64(v))
    for k in range(n):
        buf[o + k] = np.uint8((u >> np.uint64(8 * k)) & np.uint64(255))
    return o + n


@numba.njit(cache=True, nogil=True)
def _rule_struct_bytes(G, rule_end, rules):
    """Each rule's automaton as the int32 arrays it is hashed from (finals, edge offsets, bytes
    lo/hi, is-a-call flags, targets; local numbering), concatenated: (bytes, offsets)."""
    rule_start, state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target = G[0], G[3], G[4], G[5], G[6], G[7], G[8]
    ptr = np.zeros(rules.shape[0] + 1, np.int64)
    for j in range(rules.shape[0]):
        r = rules[j]
        s0, s1 = rule_start[r], rule_end[r]
        ptr[j + 1] = ptr[j] + 4 * (2 * (s1 - s0) + 1 + 4 * (edge_ptr[s1] - edge_ptr[s0]))
    out = np.empty(ptr[-1], np.uint8)
    for j in range(rules.shape[0]):
        r = rules[j]
        s0, s1 = rule_start[r], rule_end[r]
        e0, e1 = edge_ptr[s0], edge_ptr[s1]
        o = ptr[j]
        for s in range(s0, s1):
            o = _put_le(out, o, state_final[s], 4)
        for s in range(s0, s1 + 1):
            o = _put_le(out, o, edge_ptr[s] - e0, 4)
        for e in range(e0, e1):
            o = _put_le(out, o, edge_lo[e], 4)
        for e in range(e0, e1):
            o = _put_le(out, o, edge_hi[e], 4)
        for e in range(e0, e1):
            o = _put_le(out, o, 1 if edge_rule[e] >= 0 else 0, 4)
        for e in range(e0, e1):
            o = _put_le(out, o, edge_target[e] - s0, 4)
    return out, ptr


@numba.njit(cache=True, nogil=True)
def _rule_closures(G, rule_end, rules, known, order, ptr):
    """For each of ``rules``, the rules reachable from it in BFS order (callees in edge order) into
    ``order`` (CSR by ``ptr``); and the reached rules whose digest is not ``known``, with their
    structures to hash (:func:`_rule_struct_bytes`).

    Returns (those rules, their bytes, offsets); the rules are None if ``order`` is too small.
    """
    rule_start, edge_ptr, edge_rule = G[0], G[4], G[7]
    n_rules = rule_start.shape[0]
    index = np.full(n_rules, -1, np.int64)
    wanted = np.zeros(n_rules, np.bool_)
    need = np.empty(n_rules, np.int64)
    n_need = 0
    o = 0
    ptr[0] = 0
    for j in range(rules.shape[0]):
        if o >= order.shape[0]:
            return None, np.empty(0, np.uint8), ptr
        first = o
        order[o] = rules[j]
        index[rules[j]] = j
        o += 1
        i = first
        while i < o:
            r = order[i]
            i += 1
            if known[r] == 0 and not wanted[r]:
                wanted[r] = True
                need[n_need] = r
                n_need += 1
            for e in range(edge_ptr[rule_start[r]], edge_ptr[rule_end[r]]):
                q = edge_rule[e]
                if q >= 0 and index[q] != j:
                    if o >= order.shape[0]:
                        return None, np.empty(0, np.uint8), ptr
                    index[q] = j
                    order[o] = q
                    o += 1
        ptr[j + 1] = o
    raw, off = _rule_struct_bytes(G, rule_end, need[:n_need])
    return need[:n_need], raw, off


@numba.njit(cache=True, nogil=True)
def _closure_bytes(G, rule_end, order, ptr, digests):
    """For each closure ``order[ptr[j]:ptr[j + 1]]``: per rule its digest, then its callees (edge
    order) as int64 positions in the closure: (bytes, offsets)."""
    rule_start, edge_ptr, edge_rule = G[0], G[4], G[7]
    n = ptr.shape[0] - 1
    size = np.zeros(n + 1, np.int64)
    for j in range(n):
        m = 0
        for i in range(ptr[j], ptr[j + 1]):
            r = order[i]
            for e in range(edge_ptr[rule_start[r]], edge_ptr[rule_end[r]]):
                if edge_rule[e] >= 0:
                    m += 1
        size[j + 1] = size[j] + 16 * (ptr[j + 1] - ptr[j]) + 8 * m
    out = np.empty(size[-1], np.uint8)
    pos = np.full(rule_start.shape[0], -1, np.int64)
    for j in range(n):
        for i in range(ptr[j], ptr[j + 1]):
            pos[order[i]] = i - ptr[j]
        o = size[j]
        for i in range(ptr[j], ptr[j + 1]):
            r = order[i]
            out[o:o + 16] = digests[r]
            o += 16
            for e in range(edge_ptr[rule_start[r]], edge_ptr[rule_end[r]]):
                if edge_rule[e] >= 0:
                    o = _put_le(out, o, pos[edge_rule[e]], 8)
    return out, size


@numba.njit(cache=True, nogil=True)
def _state_key_bytes(G, rule_minlen, s, s_end, horizons, rule_keys, rule_known, version, work):
    """:func:`_structure` with the callees' keys, to hash into cross-grammar keys: (bytes, m)."""
    out, o, n_missing = _structure(G, rule_minlen, s, s_end, horizons, rule_keys, rule_known, version, work, False)
    return out[:o], n_missing


@numba.njit(**_KERNEL, inline="always")
def _fnv(data, n):
    h = np.uint64(0xCBF29CE484222325)
    for i in range(n):
        h = (h ^ np.uint64(data[i])) * np.uint64(0x100000001B3)
    return np.int64(h >> np.uint64(1))


@numba.njit(cache=True, nogil=True)
def _known_states(G, rule_minlen, rule_end, follow, horizons, state_entry, slots, table, data, count, states, pending):
    """Register the states whose structure the grammar has seen before; leave the others for the caller.

    A state's entry is a function of its bands' structures and its rule's FOLLOW set, so equal
    bytes of those mean the same entry, without computing cross-grammar keys. The farthest
    horizon's structure (callees by rule id, :func:`_structure`) is enough: it holds every state
    within that many bytes, and the fewest bytes to each (the shortest paths stay inside it, and a
    callee's minimum length is its rule's), which is all a nearer horizon's structure is made of.
    The table: ``slots`` (open addressing, -1 empty) hold rows of ``table``
    (hash, offset, length, entry row or -1 while it is being made) whose bytes are in ``data``;
    ``count`` = (rows, bytes) used. For each state of ``states`` without an entry: its entry is set
    from the table, or it goes to ``states[:n]`` with its table row in ``pending[:n]`` (added with
    entry -1 when new: the caller sets it once made). Returns n, or -1 when the table is full (grow
    it and call again with the states as given: ``states`` is overwritten; states registered so
    far stay registered).
    """
    state_rule = G[2]
    k = np.argmax(horizons)
    far = horizons[k:k + 1]
    no_keys = np.zeros((0, 16), np.uint8)
    no_known = np.zeros(0, np.uint8)
    work = np.empty(2, np.int64)
    mask = slots.shape[0] - 1
    n = 0
    for i in range(states.shape[0]):
        s = states[i]
        if state_entry[s] >= 0:
            continue
        r = state_rule[s]
        out, o, _ = _structure(G, rule_minlen, s, rule_end[r], far, no_keys, no_known, 0, work, True)
        if o + 32 > out.shape[0]:
            grown = np.empty(o + 32, np.uint8)
            grown[:o] = out[:o]
            out = grown
        for w in range(4):  # the FOLLOW set resolves the entry's uncertain records
            v = follow[r, w]
            for k in range(8):
                out[o] = np.uint8((v >> np.uint64(8 * k)) & np.uint64(255))
                o += 1
        h = _fnv(out, o)
        slot = h & mask
        e = -1
        while slots[slot] >= 0:
            q = slots[slot]
            if table[q, 0] == h and table[q, 2] == o:
                off = table[q, 1]
                same = True
                for k in range(o):
                    if data[off + k] != out[k]:
                        same = False
                        break
                if same:
                    e = q
                    break
            slot = (slot + 1) & mask
        if e >= 0 and table[e, 3] >= 0:
            state_entry[s] = table[e, 3]
            continue
        if e < 0:
            if count[0] >= table.shape[0] or 2 * (count[0] + 1) > slots.shape[0] or count[1] + o > data.shape[0]:
                return -1
            e = count[0]
            table[e, 0] = h
            table[e, 1] = count[1]
            table[e, 2] = o
            table[e, 3] = -1
            data[count[1]:count[1] + o] = out[:o]
            count[0] += 1
            count[1] += o
            slots[slot] = e
        states[n] = s
        pending[n] = e
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# The classification walk
# ----------------------------------------------------------------------------------------------


@numba.njit(**_KERNEL)
def _seed_row(G, st, org, row_ptr, ht_key, ht_gen, meta, row, targets, n_targets, origin, max_items):
    """Row ``row`` := closure of the items (targets[i], origin); return its end or a status (GROW/LIMIT)."""
    meta[1] += 1
    gen = meta[1]
    begin = row_ptr[row]
    cap = _row_cap(st, ht_key, begin, max_items)
    end = begin
    for i in range(n_targets):
        new = _add(st, org, ht_key, ht_gen, gen, end, cap, targets[i], origin)
        if new < 0:
            return _full(end, begin, max_items)
        end = new
    end = _closure(G, st, org, row_ptr, row, begin, end, ht_key, ht_gen, gen, max_items)
    if end < 0:
        return end
    row_ptr[row + 1] = end
    return end


STACK_MAX = 16  # frames a stack-mode configuration may hold (more: replay with Earley)
_BULK_MIN = 48  # smaller subtrees are walked node by node: testing a configuration for loops costs more
_PAIRS = 512  # configurations (boundary and mid-character) an absorption search may hold (a power of two)
_ABSORB_STEPS = 20000  # stack steps one absorption search may spend (then: none found)
_ABSORB_ROUNDS = 6  # rounds of dropping characters before the search gives up
_CLOSED_MIN = 8192  # smaller tries are walked for less than a closed-set search costs
_EPS_MAX = 64  # ε-moves (calls, returns, nullable skips) resolved for one byte before giving up
_DEAD, _SCANNED, _COMPLEX = 0, 1, 2


@numba.njit(**_KERNEL, inline="always")
def _has(bits, s, b):
    return ((bits[s, b >> 6] >> np.uint64(b & 63)) & np.uint64(1)) != 0


@numba.njit(**_KERNEL)
def _viable_after_return(first, end_null, stk, d, sl, anchor, b):
    """Could byte b be read once the innermost rule of the configuration at depth d returns?"""
    k = sl
    while k > 0:
        v = stk[d, k - 1]
        if _has(first, v, b):
            return True
        if not end_null[v]:
            return False
        k -= 1
    # Past the bottom frame: the seed rule ending is never a continuation of the seed's instance;
    # another anchor's callers live in the chart, unknown here (so: possibly).
    return anchor != 0


@numba.njit(**_KERNEL, inline="always")
def _step(G, first, end_null, x, stk, sen, d, sl, anchor, b):
    """:func:`_stack_step`, with its commonest answer inlined: a byte outside FIRST(x) from a state that
    cannot end without reading is dead (most children of a trie node are), and no tuple of arrays
    is passed to a call for it."""
    if not _has(first, x, b) and not end_null[x]:
        return _DEAD, x, sl
    return _stack_step(G, first, end_null, x, stk, sen, d, sl, anchor, b)


@numba.njit(**_KERNEL)
def _stack_step(G, first, end_null, x, stk, sen, d, sl, anchor, b):
    """Read byte b from the stack configuration (top state x, return states ``stk[d, :sl]``).

    Resolves calls, returns and nullable skips one at a time, following the single move that can
    lead to reading b (one byte of lookahead through FIRST sets). Returns (_SCANNED, new top, stack
    length), (_DEAD, ...) when nothing can read b, or (_COMPLEX, ...) when several moves could (or
    the anchor's rule returns): then the caller replays the bytes with the Earley chart.
    """
    rule_start, rule_nullable, state_rule, state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target, root = G
    for _ in range(_EPS_MAX):
        n = 0
        kind = 0
        arg = 0
        for e in range(edge_ptr[x], edge_ptr[x + 1]):
            r = edge_rule[e]
            if r < 0:
                if edge_lo[e] <= b <= edge_hi[e]:
                    n += 1
                    kind = 1
                    arg = edge_target[e]
            else:
                if _has(first, rule_start[r], b):
                    n += 1
                    kind = 2
                    arg = e
                if rule_nullable[r] != 0:
                    q = edge_target[e]
                    if _has(first, q, b) or (end_null[q] and _viable_after_return(first, end_null, stk, d, sl, anchor, b)):
                        n += 1
                        kind = 3
                        arg = q
        if state_final[x] != 0 and _viable_after_return(first, end_null, stk, d, sl, anchor, b):
            n += 1
            kind = 4
        if n == 0:
            return _DEAD, x, sl
        if n > 1:
            return _COMPLEX, x, sl
        if kind == 1:
            return _SCANNED, arg, sl
        if kind == 2:
            if sl == STACK_MAX:
                return _COMPLEX, x, sl
            q = edge_target[arg]
            stk[d, sl] = q
            sen[d, sl] = end_null[q] and (sl == 0 or sen[d, sl - 1])
            sl += 1
            x = rule_start[edge_rule[arg]]
        elif kind == 3:
            x = arg
        else:
            if sl == 0:
                return _COMPLEX, x, sl  # the anchor's rule returns into the chart
            sl -= 1
            x = stk[d, sl]
    return _COMPLEX, x, sl


@numba.njit(**_KERNEL, inline="always")
def _mix(h, v):
    return (h ^ np.uint64(np.int64(v) & 0xFFFFFFFFFFFF)) * np.uint64(0x100000001B3)


@numba.njit(**_KERNEL, inline="always")
def _class_of(G, K, s):
    """Horizon class of state s (:func:`_new_class`), read from the cache when known: inlined, so the
    common case passes no tuple of arrays to a call."""
    c = K[2][s]
    return c if c != 0 else _new_class(G, K, s)


@numba.njit(**_KERNEL)
def _new_class(G, K, s):
    """Horizon class of state s: a 64-bit hash of what it reaches within K's horizon bytes in its rule.

    ``K = (rule minimum lengths, rule ends, class cache, horizon, dist, number, mark, queue, meta,
    byte classes...)`` (the byte classes of :func:`byte_classes`, used by :func:`_absorption`).
    States of one grammar with equal classes behave identically on every string of at most
    ``horizon`` bytes (the serialization is the one of :func:`_state_key_bytes`, callees by rule
    id), so a configuration that reads a character into an equivalent one loops as far as the
    band's tokens can tell. Computed on first use and cached in ``class cache[s]`` (0 = not yet; :func:`_class_of` reads it). A
    rule too large for the scratch gets classes of its own (no equivalence claimed).
    """
    minlen, rule_end, cache, horizon, dist, number, mark, queue, meta = K[:9]
    rule_start, rule_nullable, state_rule, state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target, root = G
    r = state_rule[s]
    base = rule_start[r]
    if rule_end[r] - base > dist.shape[0]:
        cache[s] = np.int64(s) * 2 + 1  # odd: never equal to a hashed class, which is even
        return cache[s]
    meta[0] += 1
    cur = meta[0]  # mark[k] == cur: dist[k] is valid for this call, number[k] too when >= 0
    mark[s - base] = cur
    dist[s - base] = 0
    number[s - base] = -1
    top = 1
    queue[0] = s
    while top > 0:  # fewest bytes to each state, within the horizon (queue used as a stack)
        top -= 1
        p = queue[top]
        dp = dist[p - base]
        for e in range(edge_ptr[p], edge_ptr[p + 1]):
            rr = edge_rule[e]
            if rr < 0 and edge_lo[e] > 255:
                continue
            d = dp + (1 if rr < 0 else minlen[rr])
            t = edge_target[e]
            if d <= horizon and (mark[t - base] != cur or d < dist[t - base]):
                if top == queue.shape[0]:
                    cache[s] = np.int64(s) * 2 + 1
                    return cache[s]
                mark[t - base] = cur
                dist[t - base] = d
                number[t - base] = -1
                queue[top] = t
                top += 1
    h = _mix(np.uint64(0xCBF29CE484222325), horizon)
    number[s - base] = 0
    queue[0] = s
    n = 1
    head = 0
    while head < n:  # BFS numbering and serialization, as in _state_key_bytes
        p = queue[head]
        head += 1
        dp = dist[p - base]
        h = _mix(h, state_final[p])
        for e in range(edge_ptr[p], edge_ptr[p + 1]):
            rr = edge_rule[e]
            t = edge_target[e]
            inside = False
            if rr < 0:
                if edge_lo[e] > 255 or dp + 1 > horizon:
                    continue
                h = _mix(h, 1000 + edge_lo[e])
                h = _mix(h, 2000 + edge_hi[e])
                inside = True
            else:
                h = _mix(h, 3000 + rr)
                inside = dp + minlen[rr] <= horizon
            ti = -1
            if inside:
                ti = number[t - base]
                if ti < 0:
                    ti = n
                    number[t - base] = n
                    queue[n] = t
                    n += 1
            h = _mix(h, ti)
        h = _mix(h, -2)
    val = np.int64(h & np.uint64(0x7FFFFFFFFFFFFFFE))
    cache[s] = val if val != 0 else 2
    return cache[s]


@numba.njit(**_KERNEL, inline="always")
def _same_frames(G, K, stk, r1, r2, sl):
    for k in range(sl):
        if stk[r1, k] != stk[r2, k] and _class_of(G, K, stk[r1, k]) != _class_of(G, K, stk[r2, k]):
            return False
    return True


@numba.njit(**_KERNEL, inline="always")
def _same_state(G, K, x, y):
    return x == y or _class_of(G, K, x) == _class_of(G, K, y)


@numba.njit(**_KERNEL, inline="always")
def _copy_frames(stk, sen, src, dst, sl):
    for k in range(sl):
        stk[dst, k] = stk[src, k]
        sen[dst, k] = sen[src, k]


@numba.njit(**_KERNEL, inline="always")
def _loops(G, K, first, end_null, stk, sen, d, x, sl, anchor, b, tmp):
    """Does byte b take the stack configuration at depth d back to an equivalent one (see :func:`_class_of`)?"""
    _copy_frames(stk, sen, d, tmp, sl)
    status, y, sl2 = _step(G, first, end_null, x, stk, sen, tmp, sl, anchor, b)
    return status == _SCANNED and sl2 == sl and _same_state(G, K, x, y) and _same_frames(G, K, stk, tmp, d, sl)


@numba.njit(**_KERNEL)
def _self_loops(G, K, first, end_null, utf8, stk, sen, d, x, sl, anchor, scratch, pair_u, pair_top, pair_sl, ascii_out):
    """Which characters take the configuration at depth d back to an equivalent one (S = {it}).

    Returns (some ASCII byte loops, every multi-byte UTF-8 character loops) and writes the looping
    ASCII bytes to ``ascii_out`` (two uint64 words). Multi-byte characters are checked exactly on
    the product of the UTF-8 prefix automaton and the configurations reached mid-character (rows
    ``scratch + 1 ...`` of ``stk`` hold them). Reading such characters from this configuration
    keeps every token of the band alive (equivalence holds for the band's longest token), so a trie
    subtree made of them is accepted without a walk.
    """
    tmp = scratch
    if not (_loops(G, K, first, end_null, stk, sen, d, x, sl, anchor, 0x65, tmp)
            or _loops(G, K, first, end_null, stk, sen, d, x, sl, anchor, 0x20, tmp)
            or _loops(G, K, first, end_null, stk, sen, d, x, sl, anchor, 0x30, tmp)):
        return False, False  # cheap test first: structure never loops on these
    a0 = np.uint64(0)
    a1 = np.uint64(0)
    for b in range(128):
        if _loops(G, K, first, end_null, stk, sen, d, x, sl, anchor, b, tmp):
            if b < 64:
                a0 |= np.uint64(1) << np.uint64(b)
            else:
                a1 |= np.uint64(1) << np.uint64(b - 64)
    ascii_out[0] = a0
    ascii_out[1] = a1
    n = 1
    pair_u[0, 0] = 0
    pair_top[0] = x
    pair_sl[0] = sl
    _copy_frames(stk, sen, d, scratch + 1, sl)
    p = 0
    while p < n:
        u = pair_u[p, 0]
        for b in range(128, 256):
            nu = utf8[u, b]
            if nu < 0:
                continue
            _copy_frames(stk, sen, scratch + 1 + p, tmp, pair_sl[p])
            status, y, sl2 = _step(G, first, end_null, pair_top[p], stk, sen, tmp, pair_sl[p], anchor, b)
            if status != _SCANNED:
                return True, False
            if nu == 0:
                if not (sl2 == sl and _same_state(G, K, x, y) and _same_frames(G, K, stk, tmp, d, sl)):
                    return True, False
                continue
            found = False
            for q in range(n):
                if (pair_u[q, 0] == nu and pair_sl[q] == sl2 and _same_state(G, K, pair_top[q], y)
                        and _same_frames(G, K, stk, tmp, scratch + 1 + q, sl2)):
                    found = True
                    break
            if not found:
                if n == pair_top.shape[0]:
                    return True, False
                pair_u[n, 0] = nu
                pair_top[n] = y
                pair_sl[n] = sl2
                _copy_frames(stk, sen, tmp, scratch + 1 + n, sl2)
                n += 1
        p += 1
    return True, True


@numba.njit(**_KERNEL)
def _cfg_hash(G, K, u, x, stk, row, sl):
    """Hash of a configuration up to horizon-class equivalence (UTF-8 state, top, frames)."""
    h = _mix(_mix(np.uint64(0xCBF29CE484222325), u), _class_of(G, K, x))
    for k in range(sl):
        h = _mix(h, _class_of(G, K, stk[row, k]))
    return np.int64(h >> np.uint64(1))


@numba.njit(**_KERNEL, inline="always")
def _bit(w0, w1, v):
    """Is ASCII byte v in the set held by the two words (w0, w1)?"""
    if v < 64:
        return (w0 >> np.uint64(v)) & np.uint64(1) != 0
    return (w1 >> np.uint64(v - 64)) & np.uint64(1) != 0


@numba.njit(**_KERNEL, inline="always")
def _or_class(sets, p, k, bmask, c, multi_byte):
    """sets[p, k:k+3] |= the byte class of c (ASCII words), or the multi-byte flag."""
    if multi_byte:
        sets[p, k + 2] = np.uint64(1)
    else:
        sets[p, k] |= bmask[c, 0]
        sets[p, k + 1] |= bmask[c, 1]


_REPEATS = 3  # a character a closed set could add must survive this many repetitions (every band holds 4 bytes)
_PROBE = np.array([0xC3, 0xA9], np.int64)  # one multi-byte character (U+00E9): all of them must survive too


@numba.njit(**_KERNEL, inline="always")
def _survives_repeats(G, first, end_null, stk, sen, d, x, sl, anchor, scratch, seq):
    """Could the configuration at depth d read ``seq`` _REPEATS times in a row? (True when unsure.)"""
    tmp = scratch
    _copy_frames(stk, sen, d, tmp, sl)
    for _ in range(_REPEATS):
        for b in seq:
            status, x, sl = _step(G, first, end_null, x, stk, sen, tmp, sl, anchor, b)
            if status == _DEAD:
                return False
            if status == _COMPLEX:
                return True
    return True


@numba.njit(**_KERNEL)
def _absorption(G, K, first, end_null, utf8, stk, sen, d, x, sl, anchor, scratch, pair_u, pair_top, pair_sl, sets,
                slots, ascii_out):
    """A set of characters under which the configuration at depth d stays alive, whatever it reads.

    Searches for ASCII bytes A (and possibly every multi-byte UTF-8 character) such that the
    configurations reachable from this one by reading them, up to horizon-class equivalence
    (:func:`_class_of`), form a set S closed under them: every member reads every character of
    the set into a member of S (mid-character configurations of the product with the UTF-8
    prefix automaton included). Then every string of those characters that fits the band's
    horizon, valid UTF-8 (possibly ending mid-character), keeps a token alive, so a trie subtree
    made only of them is accepted without a walk. Unlike a self-loop (:func:`_self_loops`), a
    closed set covers automata that count (runs of hex digits) or track a word (a required or
    forbidden one): each character moves between members, none leaves.

    The search starts from the ASCII bytes this configuration can read three times in a row, and
    all multi-byte characters if it can read one such three times (:func:`_survives_repeats`), one
    byte per class of :func:`byte_classes`. A breadth-first round collects S and,
    per member, the characters that lead into it and those it fails on (or that would outgrow
    the table); members below a character that led to a failure are not expanded further in the
    round. Then every character leading into a failing member is dropped (at the start: the
    failing characters themselves; multi-byte characters only as a whole), leaving out failures
    on characters dropped anyway. Rounds repeat until one drops nothing, at most
    ``_ABSORB_ROUNDS``.

    Returns (kind, n): kind 0 (nothing), 1 (ASCII bytes ``ascii_out``) or 2 (those and every
    multi-byte character); the members of S are ``pair_* [:n]`` (frames in rows ``scratch + 1 +
    p`` of ``stk``; ``pair_u[p] = (UTF-8 state, BFS parent, entry byte or -1 inside a multi-byte
    character, hash)``). ``sets`` (``uint64[_PAIRS, 6]``) is scratch: per member, the characters
    leading into it and those it fails on (two ASCII words and a multi-byte flag each); ``slots``
    (a power of two, at least twice ``_PAIRS``) finds members by hash.
    """
    reps, bcls, bmask = K[9], K[10], K[11]
    tmp = scratch
    base = scratch + 1
    cap = pair_top.shape[0]
    one = np.uint64(1)
    a0 = np.uint64(0)
    a1 = np.uint64(0)
    for k in range(reps.shape[0]):  # one byte per class: the grammar reads the others alike
        b = reps[k]
        if b >= 128:
            break
        # Every string of the set keeps the configuration alive, so each of its characters repeated.
        if _survives_repeats(G, first, end_null, stk, sen, d, x, sl, anchor, tmp, reps[k:k + 1]):
            a0 |= bmask[bcls[b], 0]
            a1 |= bmask[bcls[b], 1]
    multi = _survives_repeats(G, first, end_null, stk, sen, d, x, sl, anchor, tmp, _PROBE)
    budget = _ABSORB_STEPS
    for _ in range(_ABSORB_ROUNDS):
        if a0 == 0 and a1 == 0 and not multi:
            break
        n = 1
        pair_u[0, 0] = 0
        pair_u[0, 1] = -1
        pair_u[0, 2] = -1
        pair_u[0, 3] = _cfg_hash(G, K, 0, x, stk, d, sl)
        pair_top[0] = x
        pair_sl[0] = sl
        _copy_frames(stk, sen, d, base, sl)
        sets[0, :] = 0
        slots[:] = -1  # members by hash (open addressing)
        slots[pair_u[0, 3] & (slots.shape[0] - 1)] = 0
        e0 = np.uint64(0)  # characters found failing so far this round (entry bytes on the BFS tree)
        e1 = np.uint64(0)
        em = False
        p = 0
        while p < n:
            u = pair_u[p, 0]
            q = p  # members below a character found failing are not expanded: S will not hold them
            while q > 0:
                v = pair_u[q, 2]
                if (v >= 0 and _bit(e0, e1, v)) or (v < 0 and em):
                    break
                q = pair_u[q, 1]
            if q > 0:
                p += 1
                continue
            for b in reps:
                if b < 128:
                    if u != 0 or not _bit(a0, a1, b):
                        continue
                elif u == 0 and not multi:
                    break
                nu = utf8[u, b]
                if nu < 0:
                    continue
                budget -= 1
                if budget < 0:
                    return 0, 0
                mb = b >= 128 or u != 0  # this byte is part of a multi-byte character
                _copy_frames(stk, sen, base + p, tmp, pair_sl[p])
                status, y, sl2 = _step(G, first, end_null, pair_top[p], stk, sen, tmp, pair_sl[p], anchor, b)
                if status == _SCANNED:
                    h = _cfg_hash(G, K, nu, y, stk, tmp, sl2)
                    slot = h & (slots.shape[0] - 1)
                    q = n
                    while slots[slot] >= 0:
                        r = slots[slot]
                        if (pair_u[r, 3] == h and pair_u[r, 0] == nu and pair_sl[r] == sl2
                                and _same_state(G, K, pair_top[r], y) and _same_frames(G, K, stk, tmp, base + r, sl2)):
                            q = r
                            break
                        slot = (slot + 1) & (slots.shape[0] - 1)
                    if q == n and n < cap:
                        slots[slot] = n
                        pair_u[n, 0] = nu
                        pair_u[n, 1] = p
                        pair_u[n, 2] = b if not mb else -1
                        pair_u[n, 3] = h
                        pair_top[n] = y
                        pair_sl[n] = sl2
                        _copy_frames(stk, sen, tmp, base + n, sl2)
                        sets[n, :] = 0
                        n += 1
                    if q < n:
                        _or_class(sets, q, 0, bmask, bcls[b], mb)
                        continue
                _or_class(sets, p, 3, bmask, bcls[b], mb)  # fails here (or S outgrows the table)
                if b < 128 and _bit(e0, e1, b):
                    continue
                v = pair_u[p, 2] if p > 0 else (b if not mb else -1)
                if v < 0:
                    em = True
                else:
                    e0 |= bmask[bcls[v], 0]
                    e1 |= bmask[bcls[v], 1]
            p += 1
        # Characters to drop: those leading into failing members (the failing ones at the start),
        # counting only failures on characters not dropped anyway, unless that leaves nothing.
        r0 = sets[0, 3]
        r1 = sets[0, 4]
        rm = sets[0, 5] != 0
        for q in range(1, n):
            if sets[q, 3] != 0 or sets[q, 4] != 0 or sets[q, 5] != 0:
                r0 |= sets[q, 0]
                r1 |= sets[q, 1]
                rm = rm or sets[q, 2] != 0
        if r0 == 0 and r1 == 0 and not rm:
            ascii_out[0] = a0
            ascii_out[1] = a1
            if multi:
                return 2, n
            return (1 if (a0 != 0 or a1 != 0) else 0), n
        k0 = sets[0, 3]
        k1 = sets[0, 4]
        km = sets[0, 5] != 0
        for q in range(1, n):
            if (sets[q, 3] & ~r0) != 0 or (sets[q, 4] & ~r1) != 0 or (sets[q, 5] != 0 and not rm):
                k0 |= sets[q, 0]
                k1 |= sets[q, 1]
                km = km or sets[q, 2] != 0
        if k0 != 0 or k1 != 0 or km:
            r0, r1, rm = k0, k1, km
        a0 &= ~r0
        a1 &= ~r1
        if rm:
            multi = False
    return 0, 0


@numba.njit(**_KERNEL)
def _memo_find(G, K, memo_key, stamp, x, anchor, stk, row, sl):
    """Slot of the absorption memo for a configuration: (slot, hit). Keys hold classes, so
    equivalent configurations share a slot; a slot belongs to this walk when its last column is
    ``stamp``. Slot -1 when the table is full."""
    width = memo_key.shape[1]
    cx = _class_of(G, K, x)
    h = (cx * 1000003 + np.int64(anchor) * 7919 + sl) & 0x7FFFFFFF
    for k in range(sl):
        h = (h * 31 + _class_of(G, K, stk[row, k])) & 0x7FFFFFFF
    mask = memo_key.shape[0] - 1
    slot = h & mask
    for _ in range(memo_key.shape[0]):
        if memo_key[slot, width - 1] != stamp:
            return slot, False
        same = memo_key[slot, 0] == cx and memo_key[slot, 1] == anchor and memo_key[slot, 2] == sl
        if same:
            for k in range(sl):
                if memo_key[slot, 3 + k] != _class_of(G, K, stk[row, k]):
                    same = False
                    break
        if same:
            return slot, True
        slot = (slot + 1) & mask
    return -1, False


@numba.njit(**_KERNEL)
def _may_widen(G, K, first, end_null, stk, sen, d, x, sl, anchor, scratch, kind, a0, a1):
    """Could a closed set absorb more than the self-loop answer (kind, a0, a1)? Where that has every
    multi-byte character, :func:`_widens`. Otherwise a character the set would add must keep the
    configuration alive when repeated (every string of the set does): False when no ASCII byte
    outside (a0, a1) and, unless kind is 2, no multi-byte character does, which spares structure
    (after ``{``, whitespace loops and ``"``, ``}`` die when repeated) a search that cannot pay."""
    if kind == 2:
        return _widens(G, K, first, end_null, stk, sen, d, x, sl, anchor, scratch, a0, a1)
    reps = K[9]
    for k in range(reps.shape[0]):
        if reps[k] >= 128:
            break
        if not _bit(a0, a1, reps[k]) and _survives_repeats(G, first, end_null, stk, sen, d, x, sl, anchor, scratch,
                                                           reps[k:k + 1]):
            return True
    return _survives_repeats(G, first, end_null, stk, sen, d, x, sl, anchor, scratch, _PROBE)


@numba.njit(**_KERNEL)
def _widens(G, K, first, end_null, stk, sen, d, x, sl, anchor, scratch, a0, a1):
    """Could a closed set absorb more than the self-loop bytes (a0, a1)? True when some byte that
    x reads but does not loop on leads to a configuration that reads every looping byte (a
    counter's next position, a word's next letter); the ends of strings and escapes do not."""
    reps, bcls = K[9], K[10]
    tmp = scratch
    nxt = scratch + 1
    for b in reps:
        if b >= 128:
            break
        if _bit(a0, a1, b):
            continue
        _copy_frames(stk, sen, d, tmp, sl)
        status, y, sl2 = _step(G, first, end_null, x, stk, sen, tmp, sl, anchor, b)
        if status != _SCANNED:
            continue
        reads_all = True
        for c in reps:
            if c >= 128:
                break
            if not _bit(a0, a1, c):
                continue
            _copy_frames(stk, sen, tmp, nxt, sl2)
            status, z, sl3 = _step(G, first, end_null, y, stk, sen, nxt, sl2, anchor, c)
            if status != _SCANNED:
                reads_all = False
                break
        if reads_all:
            return True
    return False


@numba.njit(**_KERNEL)
def _absorption_memo(G, K, first, end_null, utf8, stk, sen, d, x, sl, anchor, closed, scratch, pair_u, pair_top,
                     pair_sl, sets, slots, memo_key, memo_val, stamp, ascii_out):
    """Absorbed characters of the configuration at depth d, through a memo keyed by its classes (<= 4 frames).

    The self-loop test (:func:`_self_loops`, cheap to reject structure) answers first. With
    ``closed``, where that found nothing or a closed set could absorb more (:func:`_widens`), a
    closed set is searched (:func:`_absorption`) and taken when it absorbs at least as much; then
    every boundary member of the set gets the same answer in the memo (the set is closed from
    each of them too), so a counter's positions, or the contents of a key after its first
    character, cost one search. Returns (kind, n): kind 0 (nothing), 1 (ASCII only) or 2 (ASCII
    and every multi-byte character); the configurations known to share the answer are ``pair_*
    [:n]`` (frames in rows ``scratch + 1 + p`` of ``stk``) until the next search overwrites them.
    """
    width = memo_key.shape[1]
    if sl <= width - 4:
        slot, hit = _memo_find(G, K, memo_key, stamp, x, anchor, stk, d, sl)
        if hit:
            ascii_out[0] = memo_val[slot, 0]
            ascii_out[1] = memo_val[slot, 1]
            return np.int64(memo_val[slot, 2]), 0
    some, multi = _self_loops(G, K, first, end_null, utf8, stk, sen, d, x, sl, anchor, scratch, pair_u, pair_top,
                              pair_sl, ascii_out)
    kind = 0 if not some else (2 if multi else 1)
    if kind == 0:
        ascii_out[0] = 0
        ascii_out[1] = 0
    l0 = ascii_out[0]
    l1 = ascii_out[1]
    n = 0
    if closed and _may_widen(G, K, first, end_null, stk, sen, d, x, sl, anchor, scratch, kind, l0, l1):
        kc, n = _absorption(G, K, first, end_null, utf8, stk, sen, d, x, sl, anchor, scratch, pair_u, pair_top,
                            pair_sl, sets, slots, ascii_out)
        if kc >= kind and (ascii_out[0] & l0) == l0 and (ascii_out[1] & l1) == l1:
            kind = kc
        else:
            n = 0
            ascii_out[0] = l0
            ascii_out[1] = l1
    if n == 0:
        n = 1  # only this configuration is known to have this answer
        pair_u[0, 0] = 0
        pair_top[0] = x
        pair_sl[0] = sl
        _copy_frames(stk, sen, d, scratch + 1, sl)
    _memo_store(G, K, memo_key, memo_val, stamp, anchor, stk, scratch + 1, pair_top, pair_sl, pair_u[:, 0], n,
                ascii_out[0], ascii_out[1], kind)
    return np.int64(kind), n


@numba.njit(**_KERNEL)
def _memo_store(G, K, memo_key, memo_val, stamp, anchor, stk, base, tops, sls, us, n, a0, a1, kind):
    """Give the boundary configurations ``p < n`` (``us[p] == 0``; top ``tops[p]``, frames in row
    ``base + p`` of ``stk``) the absorption answer (a0, a1, kind) in the memo, unless they have one."""
    width = memo_key.shape[1]
    for p in range(n):
        if us[p] != 0 or sls[p] > width - 4:
            continue
        slot, hit = _memo_find(G, K, memo_key, stamp, tops[p], anchor, stk, base + p, sls[p])
        if hit or slot < 0:
            continue
        memo_key[slot, 0] = _class_of(G, K, tops[p])
        memo_key[slot, 1] = anchor
        memo_key[slot, 2] = sls[p]
        for k in range(sls[p]):
            memo_key[slot, 3 + k] = _class_of(G, K, stk[base + p, k])
        memo_key[slot, width - 1] = stamp
        memo_val[slot, 0] = a0
        memo_val[slot, 1] = a1
        memo_val[slot, 2] = np.uint64(kind)


@numba.njit(**_KERNEL, inline="always")
def _bulk_ok(sub_bytes, utf8_valid, i, a0, a1, kind, u):
    """Can the subtree at node i be accepted whole under a configuration absorbing (a0, a1, kind),
    its strings read from UTF-8 state u?"""
    if (sub_bytes[i, 0] & ~a0) != 0 or (sub_bytes[i, 1] & ~a1) != 0:
        return False
    if u == 0 and (sub_bytes[i, 2] | sub_bytes[i, 3]) == 0:
        return True
    return kind == 2 and (utf8_valid[i] >> np.uint8(u)) & np.uint8(1) != 0


@numba.njit(**_KERNEL)
def _enter(state_final, flags, st, org, row, begin, end):
    """For a materialized row: (its only kernel item with edges as (state, origin), or -1, -1; can the seed rule end here).

    Every other item of the row was predicted here from that item, so a stack configuration with
    it on top, no frames and its origin as anchor describes the row exactly.
    """
    n_kern = 0
    cand = -1
    ends = False
    for k in range(begin, end):
        s = st[k]
        if org[k] == 0 and state_final[s] != 0:
            ends = True
        if org[k] < row and flags[s] != 0:
            n_kern += 1
            cand = k
    if n_kern == 1:
        return st[cand], org[cand], ends
    return -1, -1, ends


_DELEGATE_MIN = 32  # first bytes a donor must take over: fewer are not worth giving up the closed-set search


@numba.njit(**_KERNEL)
def _delegated(G, first, end_null, s, donor, stk, sen):
    """Whether at least ``_DELEGATE_MIN`` first bytes take states s and ``donor`` (each seeding its
    own sub-chart) to the same configuration: one move, to the same state, with no frames.

    Whatever follows such a byte is read alike, so their results below it are equal. A single move
    means no rule called or skipped there can read the byte, so the Earley rows that replays
    materialize after it hold the same items too.
    """
    n = 0
    for b in range(256):
        st1, y1, sl1 = _step(G, first, end_null, s, stk, sen, 1, 0, 0, b)
        st2, y2, sl2 = _step(G, first, end_null, donor, stk, sen, 1, 0, 0, b)
        if st1 == _SCANNED and st2 == _SCANNED and y1 == y2 and sl1 == 0 and sl2 == 0:
            n += 1
    return n >= _DELEGATE_MIN


@numba.njit(cache=True, nogil=True)
def _donor_state(edge_ptr, edge_lo, edge_hi, edge_rule, edge_target, s):
    """The state that s's byte edges reach on the most bytes, other than s, if those are at least
    ``_DELEGATE_MIN`` (the smallest such state on a tie); else -1."""
    best, best_w = -1, 0
    for e in range(edge_ptr[s], edge_ptr[s + 1]):
        t = edge_target[e]
        if edge_rule[e] >= 0 or edge_hi[e] >= 256 or t == s:
            continue
        w = 0
        for f in range(edge_ptr[s], edge_ptr[s + 1]):
            if edge_target[f] == t and edge_rule[f] < 0 and edge_hi[f] < 256:
                w += edge_hi[f] - edge_lo[f] + 1
        if w > best_w or (w == best_w and t < best):
            best, best_w = t, w
    return best if best_w >= _DELEGATE_MIN else -1


@numba.njit(**_KERNEL, inline="always")
def _first_at_least(a, lo, hi, v):
    """The first index in ``lo..hi`` of sorted ``a`` whose value is at least v (hi if none)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(**_KERNEL, inline="always")
def _put_range(acc_lo, acc_hi, n_rng, lo, hi):
    """Append trie positions lo..hi-1 to the sorted accepted ranges (joined to the last one when adjacent); the new count."""
    if hi <= lo:
        return n_rng
    if n_rng > 0 and acc_hi[n_rng - 1] == lo:
        acc_hi[n_rng - 1] = hi
        return n_rng
    acc_lo[n_rng] = lo
    acc_hi[n_rng] = hi
    return n_rng + 1


@numba.njit(**_KERNEL)
def _copy_subtree(i, end, trie_tok_ptr, d_lo, d_hi, d_node, d_ptr, d_ae, acc_lo, acc_hi, n_rng, rec_node, rec_ae_ptr,
                  rec_ae, n_rec, n_ae):
    """The donor's results for trie nodes i .. end-1 appended to the walk's: its accepted ranges there
    (``d_lo``/``d_hi``, sorted trie positions) and its records: (tokens added, n_rng, n_rec, n_ae),
    tokens added = -1 if ``rec_ae`` is full."""
    a, b = trie_tok_ptr[i], trie_tok_ptr[end]
    added = 0
    r = _first_at_least(d_hi, 0, d_hi.shape[0], a + 1)  # the first range ending past a
    while r < d_lo.shape[0] and d_lo[r] < b:
        lo, hi = max(d_lo[r], a), min(d_hi[r], b)
        n_rng = _put_range(acc_lo, acc_hi, n_rng, lo, hi)
        added += hi - lo
        r += 1
    n = d_node.shape[0]
    for r in range(_first_at_least(d_node, 0, n, i), _first_at_least(d_node, 0, n, end)):
        cnt = d_ptr[r + 1] - d_ptr[r]
        if n_ae + cnt > rec_ae.shape[0]:
            return -1, n_rng, n_rec, n_ae
        for c in range(cnt):
            rec_ae[n_ae + c] = d_ae[d_ptr[r] + c]
        n_ae += cnt
        rec_node[n_rec] = d_node[r]
        n_rec += 1
        rec_ae_ptr[n_rec] = n_ae
    return added, n_rng, n_rec, n_ae


@numba.njit(**_KERNEL)
def _classify_kernel(G, K, flags, first, end_null, s, node_lo, node_hi, trie_byte, trie_depth, trie_subtree, trie_tok_ptr,
                     sub_bytes, utf8_valid, utf8, st, org, row_ptr, ht_key, ht_gen, meta, max_items, top,
                     anchor, entry, stk_len, stk, sen, pathb, endk, ae_cnt, ae_stack, absorb, absorb_ascii, absorb_u, pair_u,
                     pair_top, pair_sl, sets, slots, memo_key, memo_val, memo_stamp, share, share_ascii, share_top,
                     share_sl, share_u, share_stk, acc_lo, acc_hi, rec_node, rec_ae_ptr, rec_ae, out, donor, dtop,
                     d_lo, d_hi, d_node, d_ptr, d_ae):
    """Classify the text tokens of trie nodes ``node_lo+1 .. node_hi-1`` (one trie; ``node_lo`` is its root)
    from a sub-chart seeded with (s, 0); see the module docstring.

    ``donor`` (a state, or -1): a state whose classification of this band is given (accepted tokens
    as sorted ranges of trie positions ``d_lo``..``d_hi``, records ``d_node`` with end positions ``d_ae`` by CSR ``d_ptr``). The walk
    follows the donor's configuration along the path (``dtop[d]``, its top state with no frames, or
    -1 once it has none or the rule's possible ends on the path differ); at a node where both are the
    same stack configuration, everything below reads alike, so the donor's results for that subtree
    are copied instead of walked (:func:`_copy_subtree`). With a donor the root's closed-set search
    is skipped.

    Writes the accepted tokens as sorted, disjoint ranges of trie positions (``acc_lo[k]`` ..
    ``acc_hi[k]``; a subtree accepted whole is one range, so nothing here costs per accepted token) and, for each dead subtree below a point where the
    rule could end, its node to ``rec_node`` and the positions on its path where the rule can end
    (bytes read before the end) to ``rec_ae`` (CSR by ``rec_ae_ptr``). Per-depth scratch (``max_token_len + 2`` rows): a *stack configuration*
    (``top`` state or -1 where the depth's sub-chart row, index depth + 1, is materialized instead;
    return states ``stk[d, :stk_len[d]]`` with ``sen`` = all of them can end empty; the ``anchor``
    origin of the bottom item; the ``entry`` depth whose materialized row it grew from), the path
    byte, whether the seed rule can end after that many bytes, the end positions on the path, and
    which characters the depth's configuration absorbs (``absorb``: 0 none, 1 ASCII bytes
    ``absorb_ascii[d]``, 2 those and every multi-byte character; strings read from UTF-8 state
    ``absorb_u[d]``): a child subtree made only of those is accepted whole (:func:`_bulk_ok`). Rows past the depths of ``stk`` are scratch.
    ``share = (kind, horizon, n)``, ``share_ascii``, ``share_*``: a closed-set answer for the root
    found by a band of a longer horizon and its n boundary members (frames in ``share_stk``), used
    instead of searching again when kind > 0; a search here that finds one fills them in. ``out`` gets (n_acc, n_rec, n_ae, visited) and, in ``out[5]``, the number of ranges. Returns 1, AE_FULL (``rec_ae`` too small), or GROW /
    LIMIT from the sub-chart; only 1 leaves a usable result.
    """
    state_final = G[3]
    # Row 0 is an empty dummy, so the seed rule's completion (origin 0) advances nothing. Row 1,
    # the seed's closure, is materialized for replays; the walk itself starts in stack mode.
    meta[0] = 1
    row_ptr[0] = 0
    row_ptr[1] = 0
    stk[0, 0] = s
    r = _seed_row(G, st, org, row_ptr, ht_key, ht_gen, meta, 1, stk[0], 1, 0, max_items)
    if r < 0:
        return r
    top[0] = s
    anchor[0] = 0
    entry[0] = 0
    stk_len[0] = 0
    endk[0] = False  # an end before the first byte is the callers' business (module docstring)
    scratch = top.shape[0]
    absorb[0] = 0
    absorb_u[0] = 0
    if node_hi - node_lo > _BULK_MIN and donor < 0:
        horizon = K[3]
        if share[0] > 0 and horizon <= share[1]:
            # Closed under the classes of a longer horizon: every string of the set up to that
            # length stays alive, so up to this band's length too, from the root and from every
            # member (and from any configuration of this band's class as a member's).
            absorb[0] = share[0]
            absorb_ascii[0, 0] = share_ascii[0]
            absorb_ascii[0, 1] = share_ascii[1]
            _memo_store(G, K, memo_key, memo_val, memo_stamp, 0, share_stk, 0, share_top, share_sl, share_u, share[2],
                        share_ascii[0], share_ascii[1], share[0])
        else:
            closed = node_hi - node_lo > _CLOSED_MIN
            kind, n = _absorption_memo(G, K, first, end_null, utf8, stk, sen, 0, s, 0, 0, closed, scratch, pair_u,
                                       pair_top, pair_sl, sets, slots, memo_key, memo_val, memo_stamp, absorb_ascii[0])
            absorb[0] = kind
            if closed and kind > 0 and share[0] == 0:
                m = 0
                for p in range(n):
                    if pair_u[p, 0] == 0:
                        share_top[m] = pair_top[p]
                        share_sl[m] = pair_sl[p]
                        for k in range(pair_sl[p]):
                            share_stk[m, k] = stk[scratch + 1 + p, k]
                        m += 1
                share[0] = kind
                share[1] = horizon
                share[2] = m
                share_ascii[0] = absorb_ascii[0, 0]
                share_ascii[1] = absorb_ascii[0, 1]
    ae_cnt[0] = 0
    dtop[0] = donor
    n_acc = 0
    n_rng = 0
    n_rec = 0
    n_ae = 0
    visited = 0
    rec_ae_ptr[0] = 0
    i = node_lo + 1
    while i < node_hi:
        d = trie_depth[i]
        b = trie_byte[i]
        pathb[d] = b
        visited += 1
        k0 = absorb[d - 1]
        if k0 != 0 and _bulk_ok(sub_bytes, utf8_valid, i, absorb_ascii[d - 1, 0], absorb_ascii[d - 1, 1], k0,
                                absorb_u[d - 1]):
            lo, hi = trie_tok_ptr[i], trie_tok_ptr[i + trie_subtree[i]]
            n_rng = _put_range(acc_lo, acc_hi, n_rng, lo, hi)
            n_acc += hi - lo
            i += trie_subtree[i]
            continue
        cnt = ae_cnt[d - 1]
        if endk[d - 1]:
            ae_stack[cnt] = d - 1  # the rule can end after d - 1 bytes; this node's byte follows
            cnt += 1
        alive = False
        x = top[d - 1]
        replay = False
        dtop[d] = -1
        y2 = -1
        if x >= 0 and dtop[d - 1] >= 0:
            st2, y2, sl2 = _step(G, first, end_null, dtop[d - 1], stk, sen, d, 0, 0, b)
            if st2 != _SCANNED or sl2 != 0:
                y2 = -1
        if x >= 0:
            sl = stk_len[d - 1]
            for k in range(sl):
                stk[d, k] = stk[d - 1, k]
                sen[d, k] = sen[d - 1, k]
            a = anchor[d - 1]
            status, y, sl = _step(G, first, end_null, x, stk, sen, d, sl, a, b)
            if status == _SCANNED:
                ends = end_null[y] and (sl == 0 or sen[d, sl - 1])
                if y == y2 and sl == 0 and a == 0 and entry[d - 1] == 0:
                    end = i + trie_subtree[i]
                    added, n_rng, n_rec, n_ae = _copy_subtree(i, end, trie_tok_ptr, d_lo, d_hi, d_node, d_ptr, d_ae,
                                                              acc_lo, acc_hi, n_rng, rec_node, rec_ae_ptr, rec_ae,
                                                              n_rec, n_ae)
                    if added < 0:
                        return AE_FULL
                    n_acc += added
                    i = end
                    continue
                if y2 >= 0 and ends == end_null[y2]:
                    dtop[d] = y2  # the rule's possible ends on the path still agree
                if a != 0 and ends:
                    replay = True  # the anchor's rule may end: its callers are in the chart
                else:
                    top[d] = y
                    stk_len[d] = sl
                    anchor[d] = a
                    entry[d] = entry[d - 1]
                    endk[d] = ends
                    row_ptr[d + 2] = row_ptr[d + 1]  # this depth's row stays empty: nothing refers to it
                    alive = True
            elif status == _COMPLEX:
                replay = True
            if replay:
                # Materialize rows entry+2 .. d+1 from the entry row by reading the path again.
                e0 = entry[d - 1]
                ok = True
                for j in range(e0 + 1, d + 1):
                    meta[0] = j + 1
                    r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, pathb[j], max_items)
                    if r < 0:
                        return r
                    if r == 0:
                        ok = False
                        break
                if ok:
                    y, yo, ends = _enter(state_final, flags, st, org, d + 1, row_ptr[d + 1], row_ptr[d + 2])
                    top[d] = y
                    anchor[d] = yo
                    stk_len[d] = 0
                    entry[d] = d
                    endk[d] = ends
                    alive = True
        else:
            meta[0] = d + 1
            r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, b, max_items)
            if r < 0:
                return r
            if r > 0:
                y, yo, ends = _enter(state_final, flags, st, org, d + 1, row_ptr[d + 1], row_ptr[d + 2])
                top[d] = y
                anchor[d] = yo
                stk_len[d] = 0
                entry[d] = d
                endk[d] = ends
                alive = True
        if not alive:
            if cnt > 0:
                if n_ae + cnt > rec_ae.shape[0]:
                    return AE_FULL
                for c in range(cnt):
                    rec_ae[n_ae + c] = ae_stack[c]
                n_ae += cnt
                rec_node[n_rec] = i
                n_rec += 1
                rec_ae_ptr[n_rec] = n_ae
            i += trie_subtree[i]
            continue
        ae_cnt[d] = cnt
        absorb[d] = 0
        absorb_u[d] = 0
        u = absorb_u[d - 1]
        nu = utf8[u, b]
        if k0 != 0 and nu >= 0 and ((b < 128 and _bit(absorb_ascii[d - 1, 0], absorb_ascii[d - 1, 1], b)) or
                                    (b >= 128 and k0 == 2)):
            # The parent keeps every string of its characters alive (read from UTF-8 state u, up
            # to the band's longest token); b starts one of them, so this node keeps alive what
            # may follow b (from UTF-8 state nu): no test needed, however small the subtree, and
            # multi-byte characters do not end the bulk acceptance.
            absorb[d] = k0
            absorb_ascii[d, 0] = absorb_ascii[d - 1, 0]
            absorb_ascii[d, 1] = absorb_ascii[d - 1, 1]
            absorb_u[d] = nu
        elif top[d] >= 0 and trie_subtree[i] > _BULK_MIN:
            absorb[d] = _absorption_memo(G, K, first, end_null, utf8, stk, sen, d, top[d], stk_len[d], anchor[d], False,
                                         scratch, pair_u, pair_top, pair_sl, sets, slots, memo_key, memo_val,
                                         memo_stamp, absorb_ascii[d])[0]
        n_rng = _put_range(acc_lo, acc_hi, n_rng, trie_tok_ptr[i], trie_tok_ptr[i + 1])
        n_acc += trie_tok_ptr[i + 1] - trie_tok_ptr[i]
        i += 1
    out[0] = n_acc
    out[1] = n_rec
    out[2] = n_ae
    out[3] = visited
    out[5] = n_rng
    return 1


@numba.njit(**_KERNEL)
def _classify_bands(G, minlen, rule_end, classes, reps, bcls, bmask, horizons, cls_dist, cls_number, cls_mark,
                    cls_queue, cls_meta, flags, first, end_null, s, bands, node_lo, node_hi, tok_lo, trie_byte, trie_depth, trie_subtree,
                    trie_tok_ptr, sub_bytes, utf8_valid, utf8, st, org, row_ptr, ht_key, ht_gen, meta,
                    max_items, top, anchor, entry, stk_len, stk, sen, pathb, endk, ae_cnt, ae_stack, absorb,
                    absorb_ascii, absorb_u, pair_u, pair_top, pair_sl, sets, slots, memo_key, memo_val, memo_stamp, share,
                    share_ascii,
                    share_top, share_sl, share_u, share_stk, acc_lo, acc_hi, rec_node, rec_ae_ptr, rec_ae, out, dtop,
                    donor, d_lo, d_hi, d_rp, d_ok, d_rec, d_node, d_ptr, d_ae):
    """:func:`_classify_kernel` for each band in ``bands``, in one call.

    Band b writes its accepted ranges at ``acc_lo[tok_lo[b]:]`` / ``acc_hi[tok_lo[b]:]`` (a band of
    n tokens has at most n ranges), its records at ``rec_node[node_lo[b]:]``
    and ``rec_ae_ptr[node_lo[b] + b:]``, its end positions at ``rec_ae[out[j, 4]:]``; ``out[j]``
    gets (n_acc, n_rec, n_ae, visited, end positions offset, n_ranges) of ``bands[j]``, with n_acc = -1
    when that band's sub-chart hit the item limit. ``share*`` is scratch for :func:`_classify_kernel`.
    ``donor`` (or -1) classified ``bands[j]`` as the ranges ``d_rp[j]:d_rp[j + 1]`` of ``d_lo``/``d_hi`` and records ``d_rec[j]:d_rec[j + 1]`` of
    ``d_node`` / ``d_ptr`` / ``d_ae``, if ``d_ok[j]`` (not when that band hit its item limit). ``classes[b]`` caches the horizon classes of band b's horizon
    (:func:`_class_of`, with the ``cls_*`` scratch). Bands run from the longest horizon down, so
    one closed-set search at the root serves every band of a shorter horizon. Returns 1, or
    AE_FULL / GROW (call again after growing).
    """
    share[0] = 0
    share[1] = 0
    share[2] = 0
    share_u[:] = 0
    if donor >= 0 and not _delegated(G, first, end_null, s, donor, stk, sen):
        donor = -1
    ae_off = 0
    done = np.int64(0)
    for _ in range(bands.shape[0]):
        j = -1
        for jj in range(bands.shape[0]):
            if (done >> jj) & 1 == 0 and (j < 0 or horizons[bands[jj]] > horizons[bands[j]]):
                j = jj
        done |= np.int64(1) << j
        b = bands[j]
        out[j, 4] = ae_off
        K = (minlen, rule_end, classes[b], horizons[b], cls_dist, cls_number, cls_mark, cls_queue, cls_meta, reps, bcls,
             bmask)
        dj = donor if d_ok[j] != 0 else -1
        status = _classify_kernel(G, K, flags, first, end_null, s, node_lo[b], node_hi[b], trie_byte, trie_depth,
                                  trie_subtree, trie_tok_ptr, sub_bytes, utf8_valid, utf8, st, org, row_ptr,
                                  ht_key, ht_gen, meta, max_items, top, anchor, entry, stk_len, stk, sen, pathb, endk,
                                  ae_cnt, ae_stack, absorb, absorb_ascii, absorb_u, pair_u, pair_top, pair_sl, sets, slots,
                                  memo_key, memo_val,
                                  memo_stamp * 16 + j, share, share_ascii, share_top, share_sl, share_u, share_stk,
                                  acc_lo[tok_lo[b]:], acc_hi[tok_lo[b]:], rec_node[node_lo[b]:],
                                  rec_ae_ptr[node_lo[b] + b:], rec_ae[ae_off:], out[j], dj, dtop,
                                  d_lo[d_rp[j]:d_rp[j + 1]], d_hi[d_rp[j]:d_rp[j + 1]], d_node[d_rec[j]:d_rec[j + 1]],
                                  d_ptr[d_rec[j]:d_rec[j + 1] + 1], d_ae)
        if status == LIMIT:
            out[j, 0] = -1
        elif status != 1:
            return status
        else:
            ae_off += out[j, 2]
    return 1


@numba.njit(**_KERNEL, inline="always")
def _popcount(m):
    """Set bits of a uint32 word (SWAR: constant time, unlike clearing bits one by one)."""
    m = m - ((m >> np.uint32(1)) & np.uint32(0x55555555))
    m = (m & np.uint32(0x33333333)) + ((m >> np.uint32(2)) & np.uint32(0x33333333))
    m = (m + (m >> np.uint32(4))) & np.uint32(0x0F0F0F0F)
    return np.int64(((m * np.uint32(0x01010101)) >> np.uint32(24)) & np.uint32(0xFF))


# Bit index of a power of two below 2**32 from the top five bits of its product with a de Bruijn sequence.
_DEBRUIJN = np.array([0, 1, 28, 2, 29, 14, 24, 3, 30, 22, 20, 15, 25, 17, 4, 8, 31, 27, 13, 23, 21, 19, 16, 7, 26, 12,
                      18, 6, 11, 5, 10, 9], np.int64)


@numba.njit(**_KERNEL, inline="always")
def _put_bits(out, k, w, m):
    """Write the ids of the set bits of word ``w`` (value ``m``) into ``out[k:]`` in increasing order; the new k."""
    m = np.uint64(m)
    while m != 0:
        low = m & (~m + np.uint64(1))
        out[k] = w * 32 + _DEBRUIJN[((low * np.uint64(0x077CB531)) & np.uint64(0xFFFFFFFF)) >> np.uint64(27)]
        k += 1
        m ^= low
    return k


@numba.njit(cache=True, nogil=True)
def _id_bits(ids, W):
    """The ids as a bitset of ``W`` uint32 words."""
    out = np.zeros(W, np.uint32)
    for t in ids:
        out[t >> 5] |= np.uint32(1) << np.uint32(t & 31)
    return out


@numba.njit(cache=True, nogil=True)
def _merge_accepted(parts, ids, band_bits, text_bits, n_text):
    """Union of band entries' accepted sets, stored in the cheapest form: (mode, int32 ids or uint32 words).

    ``parts[p] = (mode, off, len, band)``: the entry's ids are ``ids[off:off+len]``, as the accepted
    tokens (ACC_LIST) or as the tokens of band ``band`` (bitset ``band_bits[band]``) that are *not*
    accepted (ACC_COMPLEMENT).
    """
    W = text_bits.shape[0]
    total = 0
    lists_only = True
    for p in range(parts.shape[0]):
        total += parts[p, 2]
        lists_only = lists_only and parts[p, 0] != ACC_COMPLEMENT
    if lists_only and total <= W:
        # Small sets of accepted ids (structure, keys, literals): a sorted list, no pass over the words.
        out = np.empty(total, np.int32)
        k = 0
        for p in range(parts.shape[0]):
            if parts[p, 0] == ACC_LIST:
                for j in range(parts[p, 1], parts[p, 1] + parts[p, 2]):
                    out[k] = ids[j]
                    k += 1
        if k == 0:
            return ACC_NONE, np.zeros(0, np.uint32)
        return ACC_LIST, np.sort(out[:k]).view(np.uint32)
    words = np.zeros(W, np.uint32)
    one = np.uint32(1)
    for p in range(parts.shape[0]):
        mode, off, n, band = parts[p, 0], parts[p, 1], parts[p, 2], parts[p, 3]
        if mode == ACC_LIST:
            for j in range(off, off + n):
                t = ids[j]
                words[t >> 5] |= one << np.uint32(t & 31)
        elif mode == ACC_COMPLEMENT:
            for w in range(W):
                words[w] |= band_bits[band, w]
            for j in range(off, off + n):
                t = ids[j]
                words[t >> 5] &= ~(one << np.uint32(t & 31))
    count = 0
    for w in range(W):
        count += _popcount(words[w])
    if count == 0:
        return ACC_NONE, np.zeros(0, np.uint32)
    if count <= W or n_text - count <= W:
        keep_set = count <= n_text - count
        out = np.empty(count if keep_set else n_text - count, np.int32)
        k = 0
        for w in range(W):
            k = _put_bits(out, k, w, words[w] if keep_set else text_bits[w] & ~words[w])
        return (ACC_LIST if keep_set else ACC_COMPLEMENT), out.view(np.uint32)
    return ACC_BITS, words


_SORT_MAX = 256  # id lists up to this long are sorted; longer ones go through a bitset (a pass over V/32 words)


@numba.njit(cache=True, nogil=True)
def _pack_bands(counts, bands, node_lo, tok_lo, tok_hi, trie_tok_ids, acc_lo, acc_hi, rec_node, rec_ae_ptr, rec_ae,
                words):
    """The band entries of one :func:`_classify_bands` call, from its scratch buffers into four flat arrays.

    Per band ``bands[j]`` (``counts[j] = (n_acc, n_rec, n_ae, visited, offset of its end positions
    in rec_ae, n_ranges)``, n_acc = -1 after the item limit): its accepted set as sorted ids, itself
    (ACC_LIST) or the band's other tokens (ACC_COMPLEMENT), whichever is shorter, read off its
    accepted ranges of trie positions (the complement from the gaps between them, so a state that
    accepts almost everything costs its few rejected tokens); its records and end positions. Returns ``(modes,
    ptr[j] = (acc, rec, rec_ae_ptr, rec_ae) offsets into the four arrays, accepted, records,
    record pointers, end positions)``. A band past the item limit gets the conservative entry:
    nothing accepted, its whole trie one unconditional record. ``words`` is zeroed scratch of at
    least ceil(V/32) words (left zeroed).
    """
    nb = bands.shape[0]
    modes = np.zeros(nb, np.int64)
    ptr = np.zeros((nb + 1, 4), np.int64)
    for j in range(nb):
        n, n_rec, n_ae = counts[j, 0], counts[j, 1], counts[j, 2]
        band = tok_hi[bands[j]] - tok_lo[bands[j]]
        if n < 0:
            n_acc, n_rec, n_ae = 0, 1, 0
        else:
            n_acc = n if n <= band - n else band - n
            if n > 0:
                modes[j] = ACC_LIST if n <= band - n else ACC_COMPLEMENT
        ptr[j + 1, 0] = ptr[j, 0] + n_acc
        ptr[j + 1, 1] = ptr[j, 1] + n_rec
        ptr[j + 1, 2] = ptr[j, 2] + n_rec + 1
        ptr[j + 1, 3] = ptr[j, 3] + n_ae
    out_acc = np.empty(ptr[nb, 0], np.int32)
    out_rec = np.empty(ptr[nb, 1], np.int32)
    out_rap = np.zeros(ptr[nb, 2], np.int32)
    out_ae = np.empty(ptr[nb, 3], np.uint16)
    one = np.uint32(1)
    for j in range(nb):
        b = bands[j]
        n = counts[j, 0]
        if n < 0:
            out_rec[ptr[j, 1]] = node_lo[b]
            continue
        lo, m = tok_lo[b], counts[j, 5]
        k, c = ptr[j, 0], ptr[j + 1, 0] - ptr[j, 0]
        q = k
        if modes[j] == ACC_LIST:
            for r in range(lo, lo + m):
                for p in range(acc_lo[r], acc_hi[r]):
                    out_acc[q] = trie_tok_ids[p]
                    q += 1
        elif modes[j] == ACC_COMPLEMENT:
            prev = lo
            for r in range(lo, lo + m + 1):
                for p in range(prev, acc_lo[r] if r < lo + m else tok_hi[b]):
                    out_acc[q] = trie_tok_ids[p]
                    q += 1
                if r < lo + m:
                    prev = acc_hi[r]
        if c <= _SORT_MAX:
            out_acc[k:k + c] = np.sort(out_acc[k:k + c])
        else:
            # Larger sets: marked in the words and read back in id order, one pass over the words.
            for i in range(k, k + c):
                t = out_acc[i]
                words[t >> 5] |= one << np.uint32(t & 31)
            for w in range(words.shape[0]):
                k = _put_bits(out_acc, k, w, words[w])
            words[:] = 0
        n_rec, n_ae = counts[j, 1], counts[j, 2]
        r, pl = ptr[j, 1], node_lo[b] + b
        out_rec[r:r + n_rec] = rec_node[node_lo[b]:node_lo[b] + n_rec]
        out_rap[ptr[j, 2]:ptr[j, 2] + n_rec + 1] = rec_ae_ptr[pl:pl + n_rec + 1]
        out_ae[ptr[j, 3]:ptr[j, 3] + n_ae] = rec_ae[counts[j, 4]:counts[j, 4] + n_ae]
    return modes, ptr, out_acc, out_rec, out_rap, out_ae


@numba.njit(cache=True, nogil=True)
def _classify_and_pack(G, minlen, rule_end, classes, reps, bcls, bmask, horizons, cls_dist, cls_number, cls_mark,
                       cls_queue, cls_meta, flags, first, end_null, node_lo, node_hi, tok_lo, tok_hi,
                       trie_byte, trie_depth, trie_subtree, trie_tok_ptr, trie_tok_ids, sub_bytes, utf8_valid, utf8,
                       st, org, row_ptr, ht_key, ht_gen, meta, max_items, top, anchor, entry, stk_len, stk, sen,
                       pathb, endk, ae_cnt, ae_stack, absorb, absorb_ascii, absorb_u, pair_u, pair_top, pair_sl, sets,
                       slots, memo_key, memo_val, share, share_ascii, share_top, share_sl, share_u, share_stk, acc_lo,
                       acc_hi, rec_node, rec_ae_ptr, rec_ae, words, dtop, s, bands, memo_stamp, counts, donor, d_lo,
                       d_hi, d_rp, d_ok, d_rec, d_node, d_ptr, d_ae):
    """:func:`_classify_bands` then, if it finished, :func:`_pack_bands`, in one call: (status, packed...).

    The arguments that stay the same from one first visit to the next come first, so a caller
    binds them once; the status is 1 or what :func:`_classify_bands` returned (the packed arrays
    are then empty). The donor arguments are :func:`_classify_bands`'.
    """
    status = _classify_bands(G, minlen, rule_end, classes, reps, bcls, bmask, horizons, cls_dist, cls_number, cls_mark,
                             cls_queue, cls_meta, flags, first, end_null, s, bands, node_lo, node_hi, tok_lo, trie_byte,
                             trie_depth, trie_subtree, trie_tok_ptr, sub_bytes, utf8_valid, utf8, st,
                             org, row_ptr, ht_key, ht_gen, meta, max_items, top, anchor, entry, stk_len, stk, sen,
                             pathb, endk, ae_cnt, ae_stack, absorb, absorb_ascii, absorb_u, pair_u, pair_top, pair_sl,
                             sets, slots, memo_key, memo_val, memo_stamp, share, share_ascii, share_top, share_sl,
                             share_u, share_stk, acc_lo, acc_hi, rec_node, rec_ae_ptr, rec_ae, counts, dtop, donor,
                             d_lo, d_hi, d_rp, d_ok, d_rec, d_node, d_ptr, d_ae)
    if status != 1:
        z = np.zeros(0, np.int32)
        return status, np.zeros(0, np.int64), np.zeros((1, 4), np.int64), z, z, z, np.zeros(0, np.uint16)
    modes, ptr, out_acc, out_rec, out_rap, out_ae = _pack_bands(counts, bands, node_lo, tok_lo, tok_hi, trie_tok_ids,
                                                                acc_lo, acc_hi, rec_node, rec_ae_ptr, rec_ae, words)
    return status, modes, ptr, out_acc, out_rec, out_rap, out_ae


@numba.njit(cache=True, nogil=True)
def _resolve_records(rec_node, rec_ae_ptr, rec_ae, follow_row, trie_tok_ptr, trie_tok_ids, token_bytes, token_offsets):
    """Keep the records whose subtrees stay uncertain under FOLLOW ``follow_row`` (uint64[4]).

    Returns ``(pairs, pos_ptr, pos)``: for each kept record, ``(node, after)`` in ``pairs``, where
    ``after`` packs up to three after-end bytes that can follow the rule (bytes 0-2, count in the top
    byte; 0 keeps the subtree unconditionally: more such bytes, or the fallback entry's record,
    which has no end positions), and its end positions whose next byte can follow the rule in
    ``pos[pos_ptr[j]:pos_ptr[j+1]]`` (none for the fallback record).
    """
    n = rec_node.shape[0]
    pairs = np.empty(2 * n, np.int32)
    pos_ptr = np.zeros(n + 1, np.int64)
    pos = np.empty(rec_ae.shape[0], np.int32)
    k = 0
    m = 0
    for j in range(n):
        a, b = rec_ae_ptr[j], rec_ae_ptr[j + 1]
        node = rec_node[j]
        path = token_offsets[trie_tok_ids[trie_tok_ptr[node]]]  # any token of the subtree spells the path
        cnt = 0
        packed = 0
        m0 = m
        for p in range(a, b):
            c = token_bytes[path + rec_ae[p]]
            if (follow_row[c >> 6] >> np.uint64(c & 63)) & np.uint64(1):
                if cnt < 3:
                    packed |= np.int32(c) << (8 * cnt)
                cnt += 1
                pos[m] = rec_ae[p]
                m += 1
        if a == b or cnt > 0:
            pairs[2 * k] = node
            pairs[2 * k + 1] = (cnt << 24) | packed if 0 < cnt <= 3 else 0
            k += 1
            pos_ptr[k] = m
        else:
            m = m0
    return pairs[: 2 * k].copy(), pos_ptr[: k + 1].copy(), pos[:m].copy()


@numba.njit(cache=True, nogil=True)
def _text_bits(token_kind, W):
    out = np.zeros(W, np.uint32)
    for t in range(token_kind.shape[0]):
        if token_kind[t] == 0:
            out[t >> 5] |= np.uint32(1) << np.uint32(t & 31)
    return out


def _utf8_table() -> np.ndarray:
    """UTF-8 prefix automaton: ``table[u, b]`` is the state after byte b in state u, or -1 (invalid).

    State 0 is a character boundary; 1-3 need that many continuation bytes; 4-7 are the restricted
    first continuations after E0, ED, F0, F4 (no overlongs, no surrogates, nothing past U+10FFFF).
    """
    t = np.full((8, 256), -1, np.int8)
    t[0, 0x00:0x80] = 0
    t[0, 0xC2:0xE0] = 1
    t[0, 0xE0] = 4
    t[0, 0xE1:0xED] = 2
    t[0, 0xED] = 5
    t[0, 0xEE:0xF0] = 2
    t[0, 0xF0] = 6
    t[0, 0xF1:0xF4] = 3
    t[0, 0xF4] = 7
    t[1, 0x80:0xC0] = 0
    t[2, 0x80:0xC0] = 1
    t[3, 0x80:0xC0] = 2
    t[4, 0xA0:0xC0] = 1
    t[5, 0x80:0xA0] = 1
    t[6, 0x90:0xC0] = 2
    t[7, 0x80:0x90] = 2
    return t


UTF8 = _utf8_table()


@numba.njit(cache=True, nogil=True)
def _subtree_sets(trie_byte, trie_subtree, utf8):
    """Per node: the bytes on it and below (``uint64[n, 4]``), and the UTF-8 states u (bit u of a
    uint8) from which every path from it reads as valid UTF-8 (ending mid-character allowed)."""
    n = trie_byte.shape[0]
    sub = np.zeros((n, 4), np.uint64)
    valid = np.zeros(n, np.uint16)  # bit u: every path from this node is valid when read in UTF-8 state u
    one = np.uint64(1)
    for i in range(n - 1, -1, -1):
        b = trie_byte[i]
        sub[i, b >> 6] |= one << np.uint64(b & 63)
        kids = np.uint16(0xFF)
        j = i + 1
        end = i + trie_subtree[i]
        while j < end:
            for w in range(4):
                sub[i, w] |= sub[j, w]
            kids &= valid[j]
            j += trie_subtree[j]
        v = np.uint16(0)
        for u in range(8):
            nu = utf8[u, b]
            if nu >= 0 and (kids >> np.uint16(nu)) & np.uint16(1):
                v |= np.uint16(1) << np.uint16(u)
        valid[i] = v
    return sub, valid.astype(np.uint8)


class Forest:
    """The text tokens split by byte length into bands, one trie per band, all tries in one set of arrays.

    Band k holds the tokens of ``lo_k .. hi_k`` bytes (1-4, 5-16, 17-64, 65-256, up to the longest
    token). Its trie is the flat preorder layout of :mod:`stencil.grammar.vocab`, rooted at node
    ``node_lo[k]`` and ending before ``node_hi[k]``; token slices (``trie_tok_ptr``) and
    ``token_node`` use the concatenated numbering. A band's classification depends only on what a
    state reaches within ``hi_k`` bytes, which is what lets far-apart positions of a counter share.
    """

    def __init__(self, info: TokenizerInfo):
        lengths = np.diff(info.token_offsets)
        in_order = info.trie_tok_ids  # text tokens sorted by bytes
        self.bands: list[tuple[int, int]] = []
        parts = []
        lo, hi = 1, 4
        while lo <= info.max_token_len:
            sel = in_order[(lengths[in_order] >= lo) & (lengths[in_order] <= hi)]
            if sel.shape[0]:
                self.bands.append((lo, min(hi, info.max_token_len)))
                parts.append(_build_trie(info.token_bytes, info.token_offsets, sel.astype(np.int32), info.vocab_size))
            lo, hi = hi + 1, 4 * hi
        node_base = np.cumsum([0] + [p[0].shape[0] for p in parts])
        tok_base = np.cumsum([0] + [p[4].shape[0] for p in parts])
        self.node_lo = node_base[:-1].astype(np.int64)
        self.node_hi = node_base[1:].astype(np.int64)
        self.trie_byte = np.concatenate([p[0] for p in parts])
        self.trie_depth = np.concatenate([p[1] for p in parts])
        self.trie_subtree = np.concatenate([p[2] for p in parts])
        self.trie_tok_ptr = np.concatenate([p[3][:-1] + tok_base[k] for k, p in enumerate(parts)] + [tok_base[-1:]]).astype(np.int32)
        self.trie_tok_ids = np.concatenate([p[4] for p in parts]).astype(np.int32)
        self.token_node = np.full(info.vocab_size, -1, np.int32)
        self.tok_pos = np.full(info.vocab_size, -1, np.int32)  # trie position of each text token
        self.tok_pos[self.trie_tok_ids] = np.arange(self.trie_tok_ids.shape[0], dtype=np.int32)
        for k, p in enumerate(parts):
            mine = p[5] >= 0
            self.token_node[mine] = p[5][mine] + node_base[k]
        self.band_tok_lo = tok_base[:-1].astype(np.int64)
        self.band_tok_hi = tok_base[1:].astype(np.int64)
        words = (info.vocab_size + 31) // 32
        self.band_bits = np.stack([_id_bits(self.trie_tok_ids[a:b], words) for a, b in zip(self.band_tok_lo, self.band_tok_hi)])
        self.horizons = np.array([hi for _, hi in self.bands], np.int64)
        self.sub_bytes, self.utf8_valid = _subtree_sets(self.trie_byte, self.trie_subtree, UTF8)


@dataclass(slots=True)
class StateMasks:
    """One band of a state's classification, grammar-independent (shared by every grammar with the same horizon).

    ``acc``: sorted int32 ids, the accepted tokens (``ACC_LIST``) or the band's tokens that are not
    accepted (``ACC_COMPLEMENT``). ``rec_node``/``rec_ae_ptr``/``rec_ae``: dead subtrees (forest
    nodes) reached after the rule could end, with the positions on their path where it can end
    (uint16, bytes read before the end; resolved per grammar by :func:`_resolve_records`).
    """

    acc_mode: int
    acc: np.ndarray
    n_accepted: int
    rec_node: np.ndarray
    rec_ae_ptr: np.ndarray
    rec_ae: np.ndarray
    visited: int = 0
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return self.acc.nbytes + self.rec_node.nbytes + self.rec_ae_ptr.nbytes + self.rec_ae.nbytes

    def fields(self) -> tuple:
        """The fields as a plain tuple (``StateMasks(*t)`` rebuilds it): what :class:`MaskStore` keeps.
        The garbage collector stops tracking a tuple of arrays and numbers, while it walks every
        instance of a class in each full collection, and a store holds tens of thousands of entries."""
        return (self.acc_mode, self.acc, self.n_accepted, self.rec_node, self.rec_ae_ptr, self.rec_ae, self.visited,
                self.seconds)


@numba.njit(cache=True, nogil=True)
def _bfs(G, seeds, n_seeds, pick, limit, out):
    """Breadth-first from ``seeds[:n_seeds]`` (in that order) over the grammar's states, entering a
    called rule at its start and going on at the call's return state: the states with ``pick[s]``
    in that order into ``out``, at most ``limit``. Returns how many. Seeds out of range are skipped."""
    rule_start, rule_nullable, state_rule, state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target, root = G
    ns = state_rule.shape[0]
    seen = np.zeros(ns, np.bool_)
    rule_seen = np.zeros(rule_start.shape[0], np.bool_)
    queue = np.empty(ns, np.int32)
    n = 0
    for k in range(n_seeds):
        q = seeds[k]
        if 0 <= q < ns and not seen[q]:
            seen[q] = True
            queue[n] = q
            n += 1
    i = 0
    m = 0
    while i < n and m < limit:
        s = queue[i]
        i += 1
        if pick[s]:
            out[m] = s
            m += 1
        for e in range(edge_ptr[s], edge_ptr[s + 1]):
            r = edge_rule[e]
            if r >= 0 and not rule_seen[r]:
                rule_seen[r] = True
                q = rule_start[r]
                if not seen[q]:
                    seen[q] = True
                    queue[n] = q
                    n += 1
            t = edge_target[e]
            if not seen[t]:
                seen[t] = True
                queue[n] = t
                n += 1
    return m


@numba.njit(cache=True, nogil=True)
def _bfs_states(G):
    """States in BFS order from the root's start, entering a called rule at its start (int32)."""
    ns = G[2].shape[0]
    order = np.empty(ns, np.int32)
    n = _bfs(G, np.array([G[0][G[9]]], np.int32), 1, np.ones(ns, np.bool_), ns, order)
    return order[:n].copy()


@numba.njit(cache=True, nogil=True)
def _frontier(G, flags, state_entry, st, org, row_ptr, meta, limit):
    """Up to ``limit`` lookup states (``flags`` nonzero) without an entry, nearest first, from where
    a decoder's chart stands.

    Seeds are the states of the chart's last row, then the return states of the calls that its
    items' rules will return to (found in their origin rows, and theirs, up to eight levels), so
    the search goes on past the end of the rule being matched. The chart may be changing under this
    call (the decoder runs beside the worker): everything read is range-checked, and a wrong seed
    costs only the order of the warm-up, never an entry's content.
    """
    state_rule, edge_ptr, edge_rule, edge_target = G[2], G[4], G[7], G[8]
    ns = state_rule.shape[0]
    out = np.empty(max(limit, 0), np.int32)
    n0 = meta[0]
    if n0 < 1 or n0 >= row_ptr.shape[0]:
        return out[:0]
    a, b = row_ptr[n0 - 1], row_ptr[n0]
    if not 0 <= a <= b <= st.shape[0] or b - a > 4096:
        return out[:0]
    seeds = np.empty(4 * (b - a) + 64, np.int32)
    n = 0
    # (state, origin) pairs whose callers to look up: the last row's items, then their callers'
    pend_s = np.empty(seeds.shape[0], np.int32)
    pend_o = np.empty(seeds.shape[0], np.int32)
    n_pend = 0
    for k in range(a, b):
        s = st[k]
        if 0 <= s < ns:
            seeds[n] = s
            n += 1
            if org[k] < n0 - 1 and n_pend < pend_s.shape[0]:
                pend_s[n_pend] = s
                pend_o[n_pend] = org[k]
                n_pend += 1
    done = 0
    for _ in range(8):  # levels of callers
        stop = n_pend
        while done < stop and n < seeds.shape[0]:
            r, o = state_rule[pend_s[done]], pend_o[done]
            done += 1
            if not 0 <= o < n0 - 1:
                continue
            c0, c1 = row_ptr[o], row_ptr[o + 1]
            if not 0 <= c0 <= c1 <= st.shape[0]:
                continue
            for k in range(c0, min(c1, c0 + 4096)):
                p = st[k]
                if not 0 <= p < ns:
                    continue
                for e in range(edge_ptr[p], edge_ptr[p + 1]):
                    if edge_rule[e] == r and n < seeds.shape[0]:
                        seeds[n] = edge_target[e]
                        n += 1
                        if org[k] <= o and n_pend < pend_s.shape[0]:  # its own callers: row org[k]
                            pend_s[n_pend] = p
                            pend_o[n_pend] = org[k]
                            n_pend += 1
    m = _bfs(G, seeds, n, (flags != 0) & (state_entry < 0), limit, out)
    return out[:m]


_SCRATCH = threading.local()


class _Scratch:
    """Buffers of :func:`_classify_kernel` for one vocabulary, reused by a thread's classifications.

    The kernel writes every per-depth entry before reading it; only the absorption memo is reset
    per state. The hash-table generation (``meta[1]``) keeps increasing across calls, so its
    stamps never need clearing.
    """

    def __init__(self, forest: Forest, max_token_len: int):
        depth = max_token_len + 2
        self.top, self.anchor, self.entry, self.stk_len = (np.zeros(depth, np.int32) for _ in range(4))
        self.stk = np.zeros((depth + 1 + _PAIRS, STACK_MAX + 1), np.int32)  # rows past the depths: scratch
        self.sen = np.zeros((depth + 1 + _PAIRS, STACK_MAX + 1), np.bool_)
        self.pathb = np.zeros(depth, np.uint8)
        self.endk = np.zeros(depth, np.bool_)
        self.ae_cnt = np.zeros(depth, np.int32)
        self.ae_stack = np.zeros(depth, np.uint16)
        self.absorb = np.zeros(depth, np.int64)
        self.absorb_ascii = np.zeros((depth, 2), np.uint64)
        self.absorb_u = np.zeros(depth, np.int64)
        self.pair_u = np.zeros((_PAIRS, 4), np.int64)
        self.pair_top, self.pair_sl = (np.zeros(_PAIRS, np.int64) for _ in range(2))
        self.sets = np.zeros((_PAIRS, 6), np.uint64)
        self.slots = np.full(4 * _PAIRS, -1, np.int64)
        self.memo_key = np.full((1024, 8), -1, np.int64)  # column 7: the classification that wrote the slot
        self.memo_val = np.zeros((1024, 3), np.uint64)
        # A root closed-set answer shared between the bands of one call (see _classify_kernel).
        self.share = np.zeros(3, np.int64)
        self.share_ascii = np.zeros(2, np.uint64)
        self.share_top, self.share_sl, self.share_u = (np.zeros(_PAIRS, np.int64) for _ in range(3))
        self.share_stk = np.zeros((_PAIRS, STACK_MAX + 1), np.int32)
        self.stamp = 0
        # Accepted ranges of trie positions, band b's at band_tok_lo[b] (a band of n tokens has at most n).
        self.acc_lo = np.empty(int(forest.band_tok_hi[-1]), np.int32)
        self.acc_hi = np.empty(int(forest.band_tok_hi[-1]), np.int32)
        self.rec_node = np.empty(int(forest.node_hi[-1]), np.int32)  # band b at node_lo[b]
        self.rec_ae_ptr = np.zeros(int(forest.node_hi[-1]) + len(forest.bands), np.int32)  # at node_lo[b] + b
        self.rec_ae = np.empty(4096, np.uint16)
        self.counts = np.zeros(4, np.int64)
        self.words = np.zeros(forest.token_node.shape[0] // 32 + 1, np.uint32)
        self.dtop = np.zeros(depth, np.int64)
        self.st = np.empty(4096, np.int32)
        self.org = np.empty(4096, np.int32)
        self.row_ptr = np.zeros(depth + 2, np.int32)
        self.ht_key = np.zeros(256, np.int64)
        self.ht_gen = np.zeros(256, np.int64)
        self.meta = np.zeros(3, np.int64)
        self.cls_meta = np.zeros(1, np.int64)
        self.cls_dist = self.cls_number = self.cls_mark = self.cls_queue = np.zeros(0, np.int64)
        self._bound: tuple | None = None  # see bound()

    def rule_capacity(self, n: int) -> None:
        """Make the horizon-class scratch fit rules of ``n`` states."""
        if self.cls_dist.shape[0] < n:
            self.cls_dist = np.zeros(n, np.int64)
            self.cls_number = np.zeros(n, np.int64)
            self.cls_mark = np.zeros(n, np.int64)  # stamps from cls_meta, which only grows
            self.cls_queue = np.zeros(4 * n + 64, np.int64)

    def bound(self, G, flags, sets, classes, forest: Forest, max_items: int, rebind: bool = False) -> tuple:
        """:func:`_classify_and_pack` compiled for these arguments and the arguments it keeps: (kernel, arguments).

        Kept for the last grammar this thread classified for (by identity: a grammar's cache passes
        the same arrays every time), so a first visit neither gathers 65 arguments nor has the
        dispatcher type them; gathered again after a scratch array was replaced (``rebind``).
        """
        b = self._bound
        first, end_null = sets if sets is not None else (None, None)
        if (not rebind and b is not None and b[0] is G and b[1] is flags and b[2] is first and b[3] is end_null
                and b[4] is classes and b[5] == max_items):
            return b[6], b[7]
        if sets is None:
            first, end_null = grammar_sets(G)[:2]
        if classes is None:
            n_states = G[2].shape[0]
            classes = (min_lengths(G), np.append(G[0][1:], n_states).astype(np.int64),
                       np.zeros((len(forest.bands), n_states), np.int64)) + byte_classes(G, _UTF8_CUTS)
        minlen, rule_end, cls, reps, bcls, bmask = classes
        self.rule_capacity(int((rule_end - G[0]).max(initial=1)))
        args = (G, minlen, rule_end, cls, reps, bcls, bmask, forest.horizons, self.cls_dist, self.cls_number,
                self.cls_mark, self.cls_queue, self.cls_meta, flags, first, end_null, forest.node_lo, forest.node_hi,
                forest.band_tok_lo, forest.band_tok_hi, forest.trie_byte, forest.trie_depth,
                forest.trie_subtree, forest.trie_tok_ptr, forest.trie_tok_ids, forest.sub_bytes, forest.utf8_valid,
                UTF8, self.st, self.org, self.row_ptr, self.ht_key, self.ht_gen, self.meta, int(max_items), self.top,
                self.anchor, self.entry, self.stk_len, self.stk, self.sen, self.pathb, self.endk, self.ae_cnt,
                self.ae_stack, self.absorb, self.absorb_ascii, self.absorb_u, self.pair_u, self.pair_top,
                self.pair_sl, self.sets, self.slots, self.memo_key, self.memo_val, self.share, self.share_ascii,
                self.share_top, self.share_sl, self.share_u, self.share_stk, self.acc_lo, self.acc_hi, self.rec_node,
                self.rec_ae_ptr, self.rec_ae, self.words, self.dtop)
        f = _compiled(_classify_and_pack, (*args, np.int32(0), np.zeros(1, np.int64), 0, np.zeros((1, 6), np.int64),
                                           *_no_donor(1)))
        self._bound = (G, flags, first if sets is not None else None, end_null if sets is not None else None,
                       classes, max_items, f, args)
        return f, args


def _scratch(forest: Forest, max_token_len: int) -> _Scratch:
    cache = getattr(_SCRATCH, "by_forest", None)
    if cache is None:
        cache = _SCRATCH.by_forest = weakref.WeakKeyDictionary()
    x = cache.get(forest)
    if x is None:
        x = cache[forest] = _Scratch(forest, max_token_len)
    return x


@functools.lru_cache(maxsize=8)
def _no_donor(n_bands: int) -> tuple:
    """The donor arguments of :func:`_classify_and_pack` for no donor (made once per band count: the
    kernel only reads them)."""
    z = np.zeros(0, np.int32)
    return (-1, z, z, np.zeros(n_bands + 1, np.int64), np.zeros(n_bands, np.int64), np.zeros(n_bands + 1, np.int64),
            z, np.zeros(1, np.int64), np.zeros(0, np.uint16))


@numba.njit(cache=True, nogil=True)
def _accepted_ranges(mode, ids, tok_pos, lo, hi):
    """A band entry's accepted set (``ids``: the accepted tokens for ACC_LIST, the band's others for
    ACC_COMPLEMENT) as sorted, disjoint ranges of trie positions in ``lo .. hi``: (starts, ends)."""
    n = ids.shape[0]
    words = np.zeros((hi - lo) // 32 + 1, np.uint32)  # the positions sorted through a bitset
    for k in range(n):
        p = tok_pos[ids[k]] - lo
        words[p >> 5] |= np.uint32(1) << np.uint32(p & 31)
    pos = np.empty(n, np.int64)
    k = 0
    for w in range(words.shape[0]):
        k = _put_bits(pos, k, w, words[w])
    pos += lo
    r_lo = np.empty(n + 1, np.int32)
    r_hi = np.empty(n + 1, np.int32)
    m = 0
    if mode == ACC_LIST:
        for p in pos:
            m = _put_range(r_lo, r_hi, m, p, p + 1)
    elif mode == ACC_COMPLEMENT:
        prev = lo
        for p in pos:
            m = _put_range(r_lo, r_hi, m, prev, p)
            prev = p + 1
        m = _put_range(r_lo, r_hi, m, prev, hi)
    return r_lo[:m], r_hi[:m]


def _donor_args(forest: Forest, donor: int, parts: list[StateMasks], bands: np.ndarray) -> tuple:
    """The donor arguments of :func:`_classify_and_pack` for ``bands`` from the donor's band entries
    ``parts`` (all bands): accepted sets as ranges of trie positions (CSR), records concatenated."""
    ok = np.zeros(bands.shape[0], np.int64)
    rec = np.zeros(bands.shape[0] + 1, np.int64)
    rp = np.zeros(bands.shape[0] + 1, np.int64)
    los, his, nodes, ptrs, aes = [], [], [], [np.zeros(1, np.int64)], []
    n_ae = 0
    for j, b in enumerate(bands.tolist()):
        e = parts[b]
        # A band past the item limit is one unconditional record at its root: nothing to copy from.
        ok[j] = not (e.rec_node.shape[0] == 1 and e.rec_node[0] == forest.node_lo[b])
        r_lo, r_hi = _accepted_ranges(e.acc_mode, e.acc, forest.tok_pos, forest.band_tok_lo[b], forest.band_tok_hi[b])
        los.append(r_lo)
        his.append(r_hi)
        rp[j + 1] = rp[j] + r_lo.shape[0]
        rec[j + 1] = rec[j] + e.rec_node.shape[0]
        nodes.append(e.rec_node)
        ptrs.append(e.rec_ae_ptr[1:].astype(np.int64) + n_ae)
        aes.append(e.rec_ae)
        n_ae += e.rec_ae.shape[0]
    return (donor, np.concatenate(los), np.concatenate(his), rp, ok, rec, np.concatenate(nodes).astype(np.int32),
            np.concatenate(ptrs), np.concatenate(aes).astype(np.uint16))


def classify_state(G, flags: np.ndarray, s: int, forest: Forest, bands: Iterable[int], max_token_len: int,
                   sets: tuple[np.ndarray, np.ndarray] | None = None,
                   classes: tuple[np.ndarray, ...] | None = None, *,
                   max_items_per_row: int = 50_000,
                   donor: tuple[int, list[StateMasks]] | None = None) -> list[StateMasks]:
    """Classify the tokens of the given bands of the forest for state ``s``, one trie walk per band, one kernel call.

    ``sets`` = (FIRST, end_null) from :func:`grammar_sets`; ``classes`` = (rule minimum lengths,
    rule ends, horizon-class cache ``int64[n_bands, n_states]``, zeros when fresh) for
    :func:`_class_of`, then the three arrays of :func:`byte_classes`; both are computed when not
    given. A band whose sub-chart exceeds
    ``max_items_per_row`` gets a conservative entry: nothing accepted, the whole band uncertain, so
    the full parser decides (and raises its own limit error).

    ``donor`` = (state, its band entries): a state of the same rule whose results are copied below
    the first bytes that lead both to the same configuration (:func:`_delegated`).
    """
    t0 = time.perf_counter()
    bands = np.array(list(bands), np.int64)
    donor_args = _no_donor(bands.shape[0]) if donor is None else _donor_args(forest, donor[0], donor[1], bands)
    sc = _scratch(forest, max_token_len)
    f, args = sc.bound(G, flags, sets, classes, forest, max_items_per_row)
    sc.stamp += 1  # a new owner stamp for the absorption memo
    counts = np.zeros((bands.shape[0], 6), np.int64)
    while True:
        status, modes, ptr, acc, rec_node, rec_ae_ptr, rec_ae = f(*args, np.int32(s), bands, sc.stamp, counts,
                                                                  *donor_args)
        if status == 1:
            break
        if status == AE_FULL:
            sc.rec_ae = np.empty(2 * sc.rec_ae.shape[0], np.uint16)
        else:  # GROW: a row needs room in the item arrays and at most half the hash table
            if sc.ht_key.shape[0] // 2 < max_items_per_row:
                sc.ht_key = np.zeros(2 * sc.ht_key.shape[0], np.int64)
                sc.ht_gen = np.zeros(sc.ht_key.shape[0], np.int64)
            sc.st = np.empty(2 * sc.st.shape[0], np.int32)
            sc.org = np.empty(sc.st.shape[0], np.int32)
        f, args = sc.bound(G, flags, sets, classes, forest, max_items_per_row, rebind=True)
    seconds = (time.perf_counter() - t0) / max(len(bands), 1)
    p = ptr.tolist()
    return [StateMasks(mode, acc[a0:a1], max(n_acc, 0), rec_node[r0:r1], rec_ae_ptr[q0:q1], rec_ae[e0:e1],
                       visited if n_acc >= 0 else 0, seconds)
            for mode, (n_acc, _, _, visited, _), (a0, r0, q0, e0), (a1, r1, q1, e1)
            in zip(modes.tolist(), (c[:5] for c in counts.tolist()), p, p[1:])]


# ----------------------------------------------------------------------------------------------
# The shared store (per tokenizer) and its on-disk cache
# ----------------------------------------------------------------------------------------------

_MAGIC = 0x53544D4B  # "STMK"


def _save(path: Path, e: StateMasks) -> None:
    header = np.array([_MAGIC, _FORMAT_VERSION, e.acc_mode, e.acc.shape[0], e.n_accepted, e.rec_node.shape[0],
                       e.rec_ae.shape[0], e.visited], np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        for a in (header, e.acc, e.rec_node, e.rec_ae_ptr, e.rec_ae):
            f.write(np.ascontiguousarray(a).tobytes())
    os.replace(tmp, path)


def _load(path: Path) -> StateMasks | None:
    """The entry stored at ``path``, or None if it is missing, truncated or of another format."""
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError:
        return None
    if raw.shape[0] < 64:
        return None
    h = raw[:64].view(np.int64)
    if h[0] != _MAGIC or h[1] != _FORMAT_VERSION:
        return None
    n_acc_words, n_rec, n_ae = int(h[3]), int(h[5]), int(h[6])
    sizes = (4 * n_acc_words, 4 * n_rec, 4 * (n_rec + 1), 2 * n_ae)
    if raw.shape[0] != 64 + sum(sizes):
        return None
    parts = []
    off = 64
    for size in sizes:
        parts.append(raw[off:off + size])
        off += size
    return StateMasks(int(h[2]), parts[0].view(np.int32).copy(), int(h[4]), parts[1].view(np.int32).copy(),
                      parts[2].view(np.int32).copy(), parts[3].view(np.uint16).copy(), int(h[7]), 0.0)


class MaskStore:
    """Per-tokenizer store of :class:`StateMasks`, keyed by sub-grammar hash, LRU-bounded by bytes.

    Thread-safe. Two threads asking for the same missing key compute it once: the second waits.
    With a ``cache_dir``, entries are also read from and written to
    ``<cache_dir>/<vocabulary fingerprint>/<key>.bin``.
    """

    def __init__(self, info: TokenizerInfo, *, max_bytes: int = 1 << 30):
        self.fingerprint = info.fingerprint
        self.words = (info.vocab_size + 31) // 32
        self.text_bits = _text_bits(info.token_kind, self.words)
        self.n_text = int(info.trie_tok_ids.shape[0])
        self.forest = Forest(info)
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self._entries: OrderedDict[bytes, tuple] = OrderedDict()  # key -> StateMasks.fields()
        self._inflight: dict[bytes, threading.Lock] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def has(self, keys: tuple[bytes, ...]) -> bool:
        """Whether every one of ``keys`` is in memory now."""
        with self._lock:
            return all(k in self._entries for k in keys)

    def get_many(self, keys: tuple[bytes, ...], compute: Callable[[list[int]], list[StateMasks]],
                 cache_dir: Path | None = None) -> list[StateMasks]:
        """The entries for ``keys``: from memory, else from ``cache_dir``, else ``compute(missing indices)``.

        One ``compute`` call produces every entry this thread has to make (the band walks of a state
        run in one kernel call); keys another thread is already making are awaited.
        """
        out: list[StateMasks | None] = [None] * len(keys)
        mine: list[int] = []
        waits: list[tuple[int, threading.Lock]] = []
        entries, inflight = self._entries, self._inflight
        with self._lock:
            for i, key in enumerate(keys):
                e = entries.get(key)
                if e is not None:
                    entries.move_to_end(key)
                    out[i] = StateMasks(*e)
                elif key in inflight:
                    waits.append((i, inflight[key]))
                else:
                    mine.append(i)
            self.hits += len(keys) - len(mine) - len(waits)
            if not mine and not waits:
                return out  # type: ignore[return-value]
            # Held while this call makes its keys: a waiter acquires and releases it (a lock is a
            # one-shot event at a tenth of the cost of threading.Event).
            done = threading.Lock()
            done.acquire()
            for i in mine:
                inflight[keys[i]] = done
        made = False
        n_disk = 0
        try:
            todo = mine
            if cache_dir is not None:
                todo = []
                for i in mine:
                    e = _load(cache_dir / self.fingerprint / f"{keys[i].hex()}.bin")
                    if e is None:
                        todo.append(i)
                    else:
                        out[i] = e
                n_disk = len(mine) - len(todo)
            if todo:
                for i, e in zip(todo, compute(todo)):
                    out[i] = e
                    if cache_dir is not None:
                        try:
                            _save(cache_dir / self.fingerprint / f"{keys[i].hex()}.bin", e)
                        except OSError:
                            pass  # a read-only or full cache directory only costs recomputation
            made = True
        finally:
            with self._lock:
                if made:
                    self.misses += len(mine) - n_disk
                    self.disk_hits += n_disk
                    for i in mine:
                        e = out[i]
                        entries[keys[i]] = e.fields()
                        self.nbytes += e.nbytes
                    while self.nbytes > self.max_bytes and len(entries) > 1:
                        _, old = entries.popitem(last=False)
                        self.nbytes -= StateMasks(*old).nbytes
                for i in mine:
                    del inflight[keys[i]]
            done.release()
        for i, ev in waits:
            ev.acquire()
            ev.release()
            # Usually there now; recomputed if the making thread failed or the LRU dropped it.
            out[i] = self.get_many((keys[i],), lambda todo, i=i: [compute([i])[0]], cache_dir)[0]
        return out  # type: ignore[return-value]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


_STORES: dict[str, MaskStore] = {}
_STORES_LOCK = threading.Lock()


def mask_store(info: TokenizerInfo) -> MaskStore:
    """The process-wide :class:`MaskStore` of this vocabulary (by fingerprint)."""
    fp = info.fingerprint
    with _STORES_LOCK:
        s = _STORES.get(fp)
        if s is None:
            s = _STORES[fp] = MaskStore(info)
        return s


# ----------------------------------------------------------------------------------------------
# Cross-grammar keys
# ----------------------------------------------------------------------------------------------


class _Keys:
    """Cross-grammar keys: a state's horizon structure plus the canonical hashes of the rules it calls.

    A rule's key hashes the sub-grammar reachable from it (rules renumbered in BFS order, each
    rule's automaton hashed once). A state's key for a band hashes what it reaches within the band's
    longest token (:func:`_state_key_bytes`) and the keys of the rules called there: the positions
    of a counter (``char{0,255}``) at least that far from its bound share the band's entry.
    """

    def __init__(self, grammar, G) -> None:
        self.g = grammar
        self.G = G
        self.minlen = min_lengths(G)
        ns = grammar.n_states
        self.rule_end = np.append(grammar.rule_start[1:], ns).astype(np.int64)
        # Each rule's own automaton hashed (the part of a rule key that is the rule's), made once.
        self.digests = np.zeros((grammar.n_rules, 16), np.uint8)
        self.digest_known = np.zeros(grammar.n_rules, np.uint8)
        # The rule keys made so far, for _state_key_bytes (which appends them to a state's structure).
        self.rule_keys = np.zeros((grammar.n_rules, 16), np.uint8)
        self.rule_known = np.zeros(grammar.n_rules, np.uint8)
        self._key_bytes = None  # _state_key_bytes compiled for this grammar's argument types

    def make_rule_keys(self, rules: np.ndarray) -> None:
        """Make the keys of ``rules``: each hashes the digests of the rules reachable from it, in
        BFS order, and their calls as positions in that order (:func:`_closure_bytes`).

        Two kernel calls for all of them (the closures with the structures of the rules not hashed
        yet, then the closures' bytes) and one BLAKE2b per new rule and per key. Safe to run on two threads at
        once: they write the same values, each key before its flag.
        """
        rules = np.asarray(rules, np.int64)
        n_rules = self.rule_known.shape[0]
        order = np.empty(min(rules.shape[0] * n_rules, 1 << 20), np.int64)
        ptr = np.empty(rules.shape[0] + 1, np.int64)
        while True:
            need, raw, off = _rule_closures(self.G, self.rule_end, rules, self.digest_known, order, ptr)
            if need is not None:
                break
            order = np.empty(2 * order.shape[0], np.int64)
        if need.shape[0]:
            view, off = memoryview(raw), off.tolist()
            digests = b"".join(hashlib.blake2b(view[off[j]:off[j + 1]], digest_size=16).digest()
                               for j in range(need.shape[0]))
            self.digests[need] = np.frombuffer(digests, np.uint8).reshape(-1, 16)
            self.digest_known[need] = 1
        raw, off = _closure_bytes(self.G, self.rule_end, order, ptr, self.digests)
        view, off = memoryview(raw), off.tolist()
        prefix = hashlib.blake2b(f"stencil-masks-{_FORMAT_VERSION}".encode(), digest_size=16)
        keys = []
        for j in range(rules.shape[0]):
            h = prefix.copy()
            h.update(view[off[j]:off[j + 1]])
            keys.append(h.digest())
        self.rule_keys[rules] = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)
        self.rule_known[rules] = 1  # after the keys: a kernel reading concurrently sees each whole or not at all

    def state_keys(self, s: int, horizons: np.ndarray) -> tuple[bytes, ...]:
        """One key per horizon: the state's horizon structure and the keys of the rules called in it."""
        nh = horizons.shape[0]
        work = np.empty(nh + 1 + self.rule_known.shape[0], np.int64)
        args = (self.G, self.minlen, s, self.rule_end[self.g.state_rule[s]], horizons, self.rule_keys,
                self.rule_known, _FORMAT_VERSION, work)
        if self._key_bytes is None:
            self._key_bytes = _compiled(_state_key_bytes, args)
        while True:
            raw, n_missing = self._key_bytes(*args)
            if n_missing == 0:
                break
            self.make_rule_keys(work[nh + 1:nh + 1 + n_missing].copy())
        p = work[:nh + 1].tolist()
        view = memoryview(raw)
        return tuple(hashlib.blake2b(view[p[k]:p[k + 1]], digest_size=20).digest() for k in range(nh))


# ----------------------------------------------------------------------------------------------
# The per-grammar cache: resolved entries in flat pools the mask kernel reads in one call
# ----------------------------------------------------------------------------------------------


SUFFIX_MAX = 4096  # (token, end) pairs of an entry's uncertain set turned into a suffix trie; more: walk subtrees


@numba.njit(**_KERNEL, inline="always")
def _bytes_less(data, offsets, i, j):
    """Is byte string i of ``data`` (at ``offsets``) before string j (bytes, then index: a stable order)?"""
    a, b = offsets[i], offsets[j]
    la, lb = offsets[i + 1] - a, offsets[j + 1] - b
    for c in range(min(la, lb)):
        if data[a + c] != data[b + c]:
            return data[a + c] < data[b + c]
    return la < lb or (la == lb and i < j)


@numba.njit(cache=True, nogil=True)
def _sort_strings(data, offsets):
    """Indices of the byte strings of ``data`` (at ``offsets``) sorted by (bytes, index): a merge sort."""
    m = offsets.shape[0] - 1
    order = np.arange(m).astype(np.int32)
    tmp = np.empty(m, np.int32)
    width = 1
    while width < m:
        for lo in range(0, m, 2 * width):
            mid = min(lo + width, m)
            hi = min(lo + 2 * width, m)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if _bytes_less(data, offsets, order[j], order[i]):
                    tmp[k] = order[j]
                    j += 1
                else:
                    tmp[k] = order[i]
                    i += 1
                k += 1
            tmp[k:k + mid - i] = order[i:mid]
            k += mid - i
            tmp[k:k + hi - j] = order[j:hi]
        order, tmp = tmp, order
        width *= 2
    return order


@numba.njit(cache=True, nogil=True)
def _suffix_block(pairs, pos_ptr, pos, trie_tok_ptr, trie_tok_ids, trie_subtree, token_bytes, token_offsets,
                  suffix_max):
    """The uncertain tokens' suffixes after each possible rule end, as a trie in one int32 block.

    An uncertain token is allowed iff, for one of its end positions k, the bytes after k can be
    read by the rule's callers right after the rule completes. That completion row is the same for
    every token, so the mask fill builds it once and walks this trie of distinct suffixes instead
    of every token's bytes. Layout: ``[n_nodes, n_tokens, byte[n], depth[n], subtree[n],
    tok_ptr[n+1], token ids]`` (the flat preorder trie layout of :mod:`stencil.grammar.vocab`).
    Empty when a record is unconditional or there are more than ``suffix_max`` (token, end) pairs.
    """
    none = np.zeros(0, np.int32)
    n_rec = pairs.shape[0] // 2
    total = 0
    for j in range(n_rec):
        node = pairs[2 * j]
        if pos_ptr[j + 1] == pos_ptr[j]:
            return none
        ends = np.unique(pos[pos_ptr[j]:pos_ptr[j + 1]])
        total += (trie_tok_ptr[node + trie_subtree[node]] - trie_tok_ptr[node]) * ends.shape[0]
        if total > suffix_max:
            return none
    if total == 0:
        return none
    # (token, end) pairs, token-major, ends ascending; their suffixes token[end:] as strings.
    toks = np.empty(total, np.int32)
    starts = np.empty(total, np.int64)  # where each suffix starts in token_bytes
    offsets = np.zeros(total + 1, np.int64)
    k = 0
    for j in range(n_rec):
        node = pairs[2 * j]
        ends = np.unique(pos[pos_ptr[j]:pos_ptr[j + 1]])
        for q in range(trie_tok_ptr[node], trie_tok_ptr[node + trie_subtree[node]]):
            t = trie_tok_ids[q]
            for e in ends:
                toks[k] = t
                starts[k] = token_offsets[t] + e
                offsets[k + 1] = offsets[k] + token_offsets[t + 1] - starts[k]
                k += 1
    data = np.empty(offsets[total], np.uint8)
    for k in range(total):
        data[offsets[k]:offsets[k + 1]] = token_bytes[starts[k]:starts[k] + offsets[k + 1] - offsets[k]]
    tb, td, ts, tp, tids, _ = _build_trie(data, offsets, _sort_strings(data, offsets), total)
    n = tb.shape[0]
    out = np.empty(2 + 4 * n + 1 + tids.shape[0], np.int32)
    out[0] = n
    out[1] = tids.shape[0]
    out[2:2 + n] = tb
    out[2 + n:2 + 2 * n] = td
    out[2 + 2 * n:2 + 3 * n] = ts
    out[2 + 3 * n:3 + 4 * n] = tp
    for i in range(tids.shape[0]):
        out[3 + 4 * n + i] = toks[tids[i]]
    return out


@numba.njit(cache=True, nogil=True)
def _build_entry(modes, accs, rec_nodes, rec_ae_ptrs, rec_aes, follow_row, band_bits, text_bits, n_text, trie_tok_ptr,
                 trie_tok_ids, trie_subtree, token_bytes, token_offsets, suffix_max):
    """A grammar's entry for one combination of band entries: (accepted mode, its data, uncertain pairs, suffix block).

    Band p's entry is ``modes[p]``, ``accs[p]``, ``rec_nodes[p]``, ``rec_ae_ptrs[p]``, ``rec_aes[p]``
    (the fields of :class:`StateMasks`, one tuple per field). The accepted sets are merged
    (:func:`_merge_accepted`), each band's records resolved with FOLLOW ``follow_row``
    (:func:`_resolve_records`; nodes stay sorted, the bands' tries being laid out in band order),
    and the suffix trie of the uncertain tokens built (:func:`_suffix_block`, empty when there is
    none).
    """
    nb = len(accs)
    parts = np.empty((nb, 4), np.int64)
    total = 0
    for p in range(nb):
        total += accs[p].shape[0]
    acc = np.empty(total, np.int32)
    o = 0
    for p in range(nb):
        a = accs[p]
        parts[p, 0] = modes[p]
        parts[p, 1] = o
        parts[p, 2] = a.shape[0]
        parts[p, 3] = p
        acc[o:o + a.shape[0]] = a
        o += a.shape[0]
    mode, data = _merge_accepted(parts, acc, band_bits, text_bits, n_text)
    n_pairs = 0
    n_pos = 0
    resolved = []
    for p in range(nb):
        res = _resolve_records(rec_nodes[p], rec_ae_ptrs[p], rec_aes[p], follow_row, trie_tok_ptr, trie_tok_ids,
                               token_bytes, token_offsets)
        n_pairs += res[0].shape[0]
        n_pos += res[2].shape[0]
        resolved.append(res)
    unc = np.empty(n_pairs, np.int32)
    pos_ptr = np.zeros(n_pairs // 2 + 1, np.int64)
    pos = np.empty(n_pos, np.int32)
    i = 0
    k = 0
    for res in resolved:
        pr, pp, ps = res
        unc[i:i + pr.shape[0]] = pr
        for j in range(1, pp.shape[0]):
            pos_ptr[i // 2 + j] = pos_ptr[i // 2] + pp[j]
        pos[k:k + ps.shape[0]] = ps
        i += pr.shape[0]
        k += ps.shape[0]
    block = np.zeros(0, np.int32)
    if n_pairs > 0:
        block = _suffix_block(unc, pos_ptr, pos, trie_tok_ptr, trie_tok_ids, trie_subtree, token_bytes, token_offsets,
                              suffix_max)
    return mode, data, unc, block


class MaskCache:
    """The token-mask cache of one compiled grammar.

    A state's entry merges its band entries (one per token-length band of the :class:`Forest`,
    each from the shared store); states whose band keys coincide share the merged entry.
    ``pools`` is an immutable snapshot ``(state_entry, ent, ids, bits)`` that the mask kernel reads:

    * ``state_entry[s]``: row of ``ent`` for state s, or -1 while not computed;
    * ``ent[i] = (acc_mode, acc_off, acc_len, unc_off, unc_len, suffix_off)``: the accepted set is
      ``ids[acc_off:acc_off+acc_len]`` (ACC_LIST; ACC_COMPLEMENT: the text tokens *not* accepted) or
      ``bits[acc_off]`` (ACC_BITS); the uncertain subtrees are ``unc_len`` pairs ``(forest node, after-end
      bytes)`` at ``ids[unc_off:unc_off+2*unc_len]``, nodes sorted (see :func:`_resolve_records`);
      ``ids[suffix_off:]`` holds their suffix trie (:func:`_suffix_block`), or ``suffix_off`` is -1.

    Writers (under a lock) fill free capacity in place and publish ``state_entry[s]`` last, or
    publish a grown copy; a reader holding an older snapshot sees a consistent, smaller cache.
    """

    def __init__(self, compiled, *, cache_dir: str | os.PathLike | None = None, max_items_per_row: int = 50_000):
        g = compiled.grammar
        info = compiled.tokenizer_info
        self.info = info
        self.grammar = g
        self.G = grammar_arrays(g)
        self.flags = state_flags(g.edge_ptr, g.edge_lo, g.edge_rule)
        self.first, self.end_null, self.follow = grammar_sets(self.G)
        self.store = mask_store(info)
        self.forest = self.store.forest
        self.words = self.store.words
        self.text_bits = self.store.text_bits
        # Token roles for the mask: named special tokens are grammar symbols; stop tokens are allowed
        # when the grammar is complete (unless the grammar names them, then they are symbols).
        self.special_symbol_of_token = compiled.special_symbol_of_token
        self.special_ids = np.flatnonzero(self.special_symbol_of_token >= 0).astype(np.int32)
        self.special_syms = self.special_symbol_of_token[self.special_ids].astype(np.int32)
        self.is_stop = np.zeros(info.vocab_size, np.bool_)
        self.is_stop[info.stop_token_ids] = True
        self.is_stop[self.special_ids] = False
        self.stop_ids = np.flatnonzero(self.is_stop).astype(np.int32)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_items_per_row = int(max_items_per_row)
        self._keys = _Keys(g, self.G)
        self._horizons = self.forest.horizons
        self._classes = (self._keys.minlen, self._keys.rule_end, np.zeros((len(self.forest.bands), g.n_states), np.int64)
                         ) + byte_classes(self.G, _UTF8_CUTS)
        self._combos: dict[tuple[bytes, ...], int] = {}  # band keys + FOLLOW bytes -> row of ent
        # Structure + FOLLOW bytes -> row of ent, for _known_states: (slots, rows, bytes, counts).
        self._table = (np.full(256, -1, np.int64), np.zeros((64, 4), np.int64), np.empty(16384, np.uint8),
                       np.zeros(2, np.int64))
        self._known = None  # _known_states compiled for this grammar's argument types
        self._known_args = (self.G, self._keys.minlen, self._keys.rule_end, self.follow, self.forest.horizons)
        forest = self.forest
        self._build_args = (forest.band_bits, self.text_bits, self.store.n_text, forest.trie_tok_ptr,
                            forest.trie_tok_ids, forest.trie_subtree, info.token_bytes, info.token_offsets, SUFFIX_MAX)
        self._build = None  # _build_entry compiled for these arguments' types (band entries' arrays are alike)
        self._state_keys: dict[int, tuple[bytes, ...]] = {}  # state -> its band keys (the decoder and warm-up share them)
        self._lock = threading.Lock()
        self._n_ent = 0
        self._n_ids = 0
        self._n_bits = 0
        self.pools = (np.full(g.n_states, -1, np.int32), np.zeros((16, 6), np.int32), np.zeros(1024, np.int32),
                      np.zeros((1, self.words), np.uint32))
        # state -> (seconds of band walks run for it, trie nodes they visited): for profiling
        self.computed: dict[int, tuple[float, int]] = {}
        self._warm_thread_started = False
        # The recognizers decoding with this cache (matchers register theirs with track): the background warm-up
        # starts where they stand (see frontier).
        self._charts: weakref.WeakSet = weakref.WeakSet()

    # -- entries ------------------------------------------------------------------------------

    def lookup_states(self) -> np.ndarray:
        """The states a mask may look up (those with an edge), in the order a decoder likely reaches them."""
        order = _bfs_states(self.G)
        return order[self.flags[order] != 0]

    def track(self, recognizer) -> None:
        """Let the background warm-up start from where ``recognizer`` (a decoder's chart) stands."""
        self._charts.add(recognizer)

    def frontier(self, limit: int = 8) -> list[int]:
        """Up to ``limit`` states without an entry, nearest first to where the tracked decoders stand.

        A decoder's next steps reach these states first; the warm-up computes them before it goes
        on in BFS order from the root. Reads the charts without a lock (see :func:`_frontier`).
        """
        out: list[int] = []
        for rec in list(self._charts)[:4]:
            st, org, row_ptr, _, _, meta = rec.chart
            for s in _frontier(self.G, self.flags, self.pools[0], st, org, row_ptr, meta, limit).tolist():
                if s not in out:
                    out.append(s)
            if len(out) >= limit:
                break
        return out[:limit]

    def band_keys(self, s: int) -> tuple[bytes, ...]:
        """The cross-grammar keys of state s, one per band: what it reaches within the band's longest token."""
        s = int(s)
        keys = self._state_keys.get(s)
        if keys is None:
            keys = self._state_keys[s] = self._keys.state_keys(s, self._horizons)
        return keys

    def state_masks(self, s: int) -> list[StateMasks]:
        """The grammar-independent band entries of state s (shared store, disk cache, or fresh walks)."""
        return self._band_entries(int(s), self.band_keys(s))

    def _band_entries(self, s: int, keys: tuple[bytes, ...], donor: bool = True) -> list[StateMasks]:
        """The band entries of state s (keys ``keys``) from the store, or walked.

        A walk gets a donor (:meth:`_donor_of`) whose entries are fetched first, and made without a
        donor if missing: an "any name but these" state of an object copies most of its results
        from the state after a character off the names (shared by every such rule with the same
        value schema) instead of walking the whole vocabulary again.
        """
        given = None
        if donor and not self.store.has(keys):
            t = self._donor_of(s)
            if t >= 0:
                # Keys made for the donor alone are not kept: the state may never be reached, and
                # if it is, the table may register it without keys.
                given = (t, self._band_entries(t, self._keys.state_keys(t, self._horizons), donor=False))
        return self.store.get_many(keys, lambda bands: classify_state(
            self.G, self.flags, s, self.forest, bands, self.info.max_token_len, (self.first, self.end_null),
            self._classes, max_items_per_row=self.max_items_per_row, donor=given), self.cache_dir)

    def _donor_of(self, s: int) -> int:
        """The state that s's byte edges reach for the most bytes, other than s, if those are at least
        ``_DELEGATE_MIN``; else -1 (:func:`_donor_state`). The walk checks byte by byte which of them it can copy."""
        g = self.grammar
        return int(_donor_state(g.edge_ptr, g.edge_lo, g.edge_hi, g.edge_rule, g.edge_target, s))

    def ensure(self, states: Iterable[int]) -> None:
        """Compute and register the entries of ``states`` that are missing.

        One kernel call registers every state whose structure and FOLLOW set the grammar has seen
        (:func:`_known_states`): a state of a known key combination costs no keys, no store and no
        Python per state. The others get their band keys, their band entries (the shared store,
        or a walk) and a merged entry for their key combination and FOLLOW set.
        """
        given = np.fromiter(states, np.int64)
        todo = given.copy()
        pending = np.empty(todo.shape[0], np.int64)
        with self._lock:
            if self._known is None:
                self._known = _compiled(_known_states, (*self._known_args, self.pools[0], *self._table, todo, pending))
            n = self._known(*self._known_args, self.pools[0], *self._table, todo, pending)
            while n < 0:  # the table is full: grow it and start again from the states as given
                self._table = _grown_table(*self._table)
                todo[:] = given
                n = self._known(*self._known_args, self.pools[0], *self._table, todo, pending)
        if n == 0:
            return
        for s, e in zip(todo[:n].tolist(), pending[:n].tolist()):
            row = int(self._table[1][e, 3])  # made meanwhile, for an earlier state alike
            if row < 0:
                keys = self.band_keys(s)
                r = int(self.grammar.state_rule[s])
                # The merged entry resolves uncertain records with the rule's FOLLOW set: rules
                # alike within the horizon but followed by different bytes must not share it.
                combo = keys + (self.follow[r].tobytes(),)
                row = self._combos.get(combo)
                if row is None:
                    parts = self._band_entries(s, keys)
                    row = self._add_entry(combo, parts, self.follow[r])
                    self.computed[s] = (sum(p.seconds for p in parts), sum(p.visited for p in parts))
            with self._lock:
                self.pools[0][s] = row
                self._table[1][e, 3] = row

    def _add_entry(self, combo: tuple[bytes, ...], parts: list[StateMasks], follow_row: np.ndarray) -> int:
        """Merge band entries into one pooled entry (resolving uncertain records with FOLLOW ``follow_row``);
        its row, kept for ``combo`` (the band keys and the FOLLOW set)."""
        args = (tuple(p.acc_mode for p in parts), tuple(p.acc for p in parts), tuple(p.rec_node for p in parts),
                tuple(p.rec_ae_ptr for p in parts), tuple(p.rec_ae for p in parts), follow_row) + self._build_args
        if self._build is None:
            self._build = _compiled(_build_entry, args)
        mode, data, unc, block = self._build(*args)
        mode = int(mode)
        n_block = block.shape[0]
        n_list = data.shape[0] if mode in (ACC_LIST, ACC_COMPLEMENT) else 0
        with self._lock:
            row = self._combos.get(combo)
            if row is not None:
                return row
            state_entry, ent, ids, bits = self.pools
            need_ids = self._n_ids + n_list + unc.shape[0] + n_block
            need_bits = self._n_bits + (mode == ACC_BITS)
            grow = self._n_ent >= ent.shape[0] or need_ids > ids.shape[0] or need_bits > bits.shape[0]
            if grow:
                state_entry = state_entry.copy()
                ent = _grown(ent, self._n_ent + 1)
                ids = _grown(ids, need_ids)
                bits = _grown(bits, need_bits)
            if mode == ACC_BITS:
                bits[self._n_bits] = data
                acc_off, acc_len = self._n_bits, 1
                self._n_bits += 1
            else:
                acc_off, acc_len = self._n_ids, n_list
                ids[acc_off:acc_off + n_list] = data.view(np.int32)
                self._n_ids += n_list
            ids[self._n_ids:self._n_ids + unc.shape[0]] = unc
            unc_off = self._n_ids
            self._n_ids += unc.shape[0]
            suffix_off = -1
            if n_block:
                ids[self._n_ids:self._n_ids + n_block] = block
                suffix_off = self._n_ids
                self._n_ids += n_block
            ent[self._n_ent] = (mode, acc_off, acc_len, unc_off, unc.shape[0] // 2, suffix_off)
            row = self._n_ent
            self._n_ent += 1
            self._combos[combo] = row
            if grow:
                # A new snapshot only when an array was replaced: the same tuple tells the decoder
                # that its bound arguments still hold (rebinding them costs it a few µs).
                self.pools = (state_entry, ent, ids, bits)
            return row

    @property
    def n_computed(self) -> int:
        """States with a registered entry."""
        return int((self.pools[0] >= 0).sum())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.pools)

    # -- background work ----------------------------------------------------------------------

    def warm_up(self, background: bool = True) -> None:
        """Compute every lookup state's entry now, or queue that work for the background worker.

        The background worker is one daemon thread per process; its kernels release the GIL, so it
        runs beside the decode loop. A state the decoder needs first is computed by the decoder
        (or awaited, if the worker is on it).
        """
        if not background:
            self.ensure(self.lookup_states())
            return
        if self._warm_thread_started:
            return
        self._warm_thread_started = True
        _background().submit(self)


def _grown_table(slots: np.ndarray, table: np.ndarray, data: np.ndarray, count: np.ndarray) -> tuple:
    """The structure table of :func:`_known_states` with twice the room everywhere (rows keep their numbers)."""
    table = _grown(table, 2 * table.shape[0])
    data = _grown(data, 2 * data.shape[0])
    slots = np.full(2 * slots.shape[0], -1, np.int64)
    _rehash(slots, table, int(count[0]))
    return slots, table, data, count


@numba.njit(cache=True, nogil=True)
def _rehash(slots, table, n):
    mask = slots.shape[0] - 1
    for e in range(n):
        slot = table[e, 0] & mask
        while slots[slot] >= 0:
            slot = (slot + 1) & mask
        slots[slot] = e


def _grown(a: np.ndarray, need: int) -> np.ndarray:
    out = np.zeros((max(need, 2 * a.shape[0]),) + a.shape[1:], a.dtype)
    out[: a.shape[0]] = a
    return out


# When a decoder last asked for a mask (time.monotonic()), and how many compiles are running.
_LAST_DECODER_ACTIVITY = [0.0]
_COMPILES = [0]
QUIET_SECONDS = 0.002  # the worker waits until no mask was asked for during this long
BACKOFF_SECONDS = 0.01  # and, while a decoder or compile is busy, sleeps this long between looks


def decoder_active() -> None:
    """Record that a decoder is asking for masks now (the background worker then stays out of its way)."""
    _LAST_DECODER_ACTIVITY[0] = time.monotonic()


class compiling:
    """Context manager around a grammar compile: the background worker pauses meanwhile."""

    def __enter__(self) -> None:
        _COMPILES[0] += 1

    def __exit__(self, *exc) -> None:
        _COMPILES[0] -= 1
        decoder_active()


class _Worker:
    """One daemon thread that warms up queued mask caches, one state at a time, newest grammar first:
    the states nearest to where its decoders stand (:meth:`MaskCache.frontier`), then the rest in
    BFS order from the root.

    It works only while no grammar is being compiled and no decoder has asked for a mask for
    ``QUIET_SECONDS``: in a serving loop that is while the model runs, so the warm-up costs the
    decoder neither a core nor the GIL; a decoder that fills masks back to back does its own
    (lazy) work.
    """

    def __init__(self) -> None:
        self._jobs: list = []  # heap of (-submission number, number, cache ref, remaining states)
        self._seq = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stencil-mask-warmup", daemon=True)
        self._thread.start()

    def submit(self, cache: MaskCache) -> None:
        with self._lock:
            self._seq += 1
            heapq.heappush(self._jobs, (-self._seq, self._seq, weakref.ref(cache), None))
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            while True:
                with self._lock:
                    if not self._jobs:
                        self._wake.clear()
                        break
                    prio, seq, ref, states = heapq.heappop(self._jobs)
                cache = ref()
                if cache is None:
                    continue
                if states is None:
                    states = deque(cache.lookup_states().tolist())
                near: list[int] = []  # the frontier, searched again whenever a decoder asked for a mask
                stamp = None
                try:
                    for _ in range(8):
                        if not states:
                            break
                        if time.monotonic() - _LAST_DECODER_ACTIVITY[0] < QUIET_SECONDS or _COMPILES[0] > 0:
                            time.sleep(BACKOFF_SECONDS)  # long enough not to churn the GIL
                            continue
                        # Where the decoders stand first: their next steps need those states.
                        if stamp != _LAST_DECODER_ACTIVITY[0]:
                            stamp = _LAST_DECODER_ACTIVITY[0]
                            near = cache.frontier(8)
                        cache.ensure((near.pop(0),) if near else (states.popleft(),))
                except Exception:  # noqa: BLE001 - warm-up is an optimization; the decoder recomputes and reports
                    states.clear()
                del cache
                if states:
                    with self._lock:
                        heapq.heappush(self._jobs, (prio, seq, ref, states))


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _background() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER
