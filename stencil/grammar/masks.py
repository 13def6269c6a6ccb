"""The adaptive token-mask cache: for each automaton state, which tokens it accepts on its own.

Why this works
--------------
The recognizer's current row holds Earley items ``(state, origin)``. Every way to read a token's
bytes from that row starts by scanning the token's first byte from some item X of the row. From
there the derivation either stays inside X's rule instance for the whole token (nested rules may be
called and finish inside the token), or X's rule instance *ends* after the first byte and before the
token's last one, and the rest depends on X's caller. So each token can be classified per automaton
state s, without knowing any caller, by reading it from a fresh sub-chart seeded with ``(s, 0)``:

* **accepted**: some path consumes the whole token while staying inside the rule (an item is alive
  after its last byte);
* **uncertain**: not accepted, but the rule of s can end after k bytes, 1 <= k < len(token), and
  the byte after that end could follow the rule somewhere in the grammar;
* **rejected**: everything else.

An end before the first byte (k = 0) never makes a token uncertain: in the real chart the rule's
completion at that point has already advanced its callers, whose items are in the row themselves.
The sub-chart's seed item gets origin 0, and row 0 of the sub-chart is an empty dummy row, so the
seed rule's own completion advances nothing, and "the rule can end here" is simply "an item with
origin 0 is in a final state".

Then ``mask = ⋃ accepted(s) ∪ {t ∈ ⋃ uncertain(s) : the full parser accepts t}`` over the distinct
states s of the row that have a byte edge. Only states matter, not origins, so one entry per state
serves every request, every position and every grammar that shares the state's sub-grammar.

Context expansion. Whether a token is uncertain depends on the bytes that can follow the rule, which
depend on the grammar around it; the walk itself does not. So the cached (shareable) part records,
for every dead trie subtree below a point where the rule could end, the bytes right after each such
end on its path ("after-end bytes"). A grammar *resolves* these records with the FOLLOW set (over
bytes) of the state's rule: a subtree stays uncertain only if one of its after-end bytes can follow
the rule; otherwise it is rejected. Uncertain tokens are kept as those trie subtrees, so the mask
fill checks them with the real parser by walking the subtrees and skipping dead prefixes.

Storage (XGrammar's adaptive choice). The accepted set is stored as the cheapest of: a sorted id
list, a sorted list of the text tokens *not* accepted (the complement: string-content states accept
almost everything), or a bitset of ``ceil(V/32)`` words. The uncertain set is a list of trie nodes.

Computing a state's entry
-------------------------
:func:`classify_state` walks the flat token trie once (see :mod:`stencil.grammar.vocab`), one
kernel call per state. Each depth keeps either a single *DFA state* (the only item that can still
scan is ``(x, 0)`` and x has no rule edges: the next byte is a plain automaton step) or an Earley
row of the sub-chart; a rejected prefix skips its whole subtree. Regular stretches (string
contents, numbers, literals, keys) are thus walked at automaton speed, and the Earley machinery runs
only where rules are called.

Entries are built lazily on a state's first visit, shared process-wide per tokenizer through a key
that hashes everything the classification reads (the state's rule, every rule reachable from it,
with canonical numbering), optionally persisted in an on-disk cache, and can be finished in a
background thread (:meth:`MaskCache.warm_up`): the kernels release the GIL.
"""

from __future__ import annotations

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
from stencil.grammar.vocab import TokenizerInfo

__all__ = [
    "ACC_NONE",
    "ACC_LIST",
    "ACC_BITS",
    "ACC_COMPLEMENT",
    "HAS_BYTES",
    "HAS_RULES",
    "StateMasks",
    "MaskStore",
    "MaskCache",
    "mask_store",
    "classify_state",
    "state_flags",
    "follow_sets",
]

# Per-state flags.
HAS_BYTES = 1  # the state has a byte edge (symbol < 256): it can scan text
HAS_RULES = 2  # the state has a rule edge

# How a state's accepted set is stored.
ACC_NONE = 0
ACC_LIST = 1  # sorted accepted ids
ACC_BITS = 2  # a bitset row (uint32 words)
ACC_COMPLEMENT = 3  # sorted ids of the text tokens that are NOT accepted

AE_FULL = -10  # _classify_kernel: the after-end byte buffer is full

# Bump when the classification or the entry format changes: it is part of every cache key.
_FORMAT_VERSION = 1


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
def follow_sets(G):
    """FOLLOW over bytes: ``uint64[n_rules, 4]``, the bytes that can come right after rule r ends.

    FIRST(state) = bytes of its byte edges, FIRST of the rules it calls, and past nullable calls the
    FIRST of the target. For every call ``p --<R>--> q`` in rule A: FIRST(q) ⊆ FOLLOW(R), and if A
    can end from q through nullable calls only, FOLLOW(A) ⊆ FOLLOW(R). Special-token symbols are
    left out: text can never spell them, so no text token continues through one.
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
    return follow


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


@numba.njit(**_KERNEL)
def _decide(state_final, flags, st, org, begin, end):
    """For a materialized row: (the lone scanning item's state and origin, or -1, -1; can the seed rule end here)."""
    n_scan = 0
    cand = -1
    ends = False
    for k in range(begin, end):
        s = st[k]
        if org[k] == 0 and state_final[s] != 0:
            ends = True
        if flags[s] & HAS_BYTES:
            n_scan += 1
            cand = k
    # Only items that can scan make progress: a waiter completes only after its callee scans, and
    # the callee's items would be in this row. A lone scanner without rule edges is a plain
    # automaton walk until its rule may end (then a row is materialized to complete its callers).
    if n_scan == 1 and (flags[st[cand]] & HAS_RULES) == 0:
        return st[cand], org[cand], ends
    return -1, -1, ends


@numba.njit(**_KERNEL)
def _classify_kernel(G, flags, s, trie_byte, trie_depth, trie_subtree, trie_tok_ptr, trie_tok_ids,
                     st, org, row_ptr, ht_key, ht_gen, meta, max_items, targets, mode, morg, endk, ae_cnt, ae_stack,
                     acc, rec_node, rec_ae_ptr, rec_ae, out):
    """Classify every text token from a sub-chart seeded with (s, 0); see the module docstring.

    Writes accepted ids to ``acc`` (trie order) and, for each dead subtree below a point where the
    rule could end, its node to ``rec_node`` and its after-end bytes to ``rec_ae`` (CSR by
    ``rec_ae_ptr``). Per-depth scratch (``max_token_len + 2``): ``mode``/``morg``, the lone
    scanning item (state, origin) that decides the future, or -1 where the sub-chart row (index
    depth + 1) is materialized; ``endk``, whether the seed rule can end after that many bytes;
    ``ae_cnt``/``ae_stack``, the after-end bytes on the path. ``out`` gets (n_acc, n_rec, n_ae,
    visited). Returns 1, AE_FULL (``rec_ae`` too small), or GROW / LIMIT from the sub-chart; only
    1 leaves a usable result.
    """
    state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target = G[3], G[4], G[5], G[6], G[7], G[8]
    # Row 0 is an empty dummy, so the seed rule's completion (origin 0) advances nothing.
    endk[0] = False
    ae_cnt[0] = 0
    meta[0] = 1
    row_ptr[0] = 0
    row_ptr[1] = 0
    if (flags[s] & HAS_RULES) == 0:
        mode[0] = s
        morg[0] = 0
        row_ptr[2] = 0
    else:
        targets[0] = s
        r = _seed_row(G, st, org, row_ptr, ht_key, ht_gen, meta, 1, targets, 1, 0, max_items)
        if r < 0:
            return r
        x0, o0, _ = _decide(state_final, flags, st, org, row_ptr[1], row_ptr[2])
        mode[0] = x0
        morg[0] = o0
    # endk[0] stays False: an end before the first byte is the callers' business (module docstring).
    n_acc = 0
    n_rec = 0
    n_ae = 0
    visited = 0
    rec_ae_ptr[0] = 0
    n = trie_byte.shape[0]
    i = 1
    while i < n:
        d = trie_depth[i]
        b = trie_byte[i]
        visited += 1
        cnt = ae_cnt[d - 1]
        if endk[d - 1]:
            ae_stack[cnt] = b
            cnt += 1
        x = mode[d - 1]
        alive = False
        if x >= 0:
            o = morg[d - 1]
            nt = 0
            for e in range(edge_ptr[x], edge_ptr[x + 1]):
                if edge_rule[e] >= 0 or edge_lo[e] > b:
                    break  # byte edges come first, sorted by lo
                if b <= edge_hi[e]:
                    targets[nt] = edge_target[e]
                    nt += 1
            if nt == 1 and (flags[targets[0]] & HAS_RULES) == 0 and (o == 0 or state_final[targets[0]] == 0):
                y = targets[0]
                mode[d] = y
                morg[d] = o
                endk[d] = state_final[y] != 0
                row_ptr[d + 2] = row_ptr[d + 1]  # this depth's row stays empty: nothing refers to it
                alive = True
            elif nt > 0:
                r = _seed_row(G, st, org, row_ptr, ht_key, ht_gen, meta, d + 1, targets, nt, o, max_items)
                if r < 0:
                    return r
                y, yo, ends = _decide(state_final, flags, st, org, row_ptr[d + 1], row_ptr[d + 2])
                mode[d] = y
                morg[d] = yo
                endk[d] = ends
                alive = True
        else:
            meta[0] = d + 1
            r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, b, max_items)
            if r < 0:
                return r
            if r > 0:
                y, yo, ends = _decide(state_final, flags, st, org, row_ptr[d + 1], row_ptr[d + 2])
                mode[d] = y
                morg[d] = yo
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
        for k in range(trie_tok_ptr[i], trie_tok_ptr[i + 1]):
            acc[n_acc] = trie_tok_ids[k]
            n_acc += 1
        i += 1
    out[0] = n_acc
    out[1] = n_rec
    out[2] = n_ae
    out[3] = visited
    return 1


@numba.njit(cache=True, nogil=True)
def _pack_accepted(acc, text_bits, n_text):
    """Choose the cheapest storage for an accepted set: (mode, int32 ids or uint32 words)."""
    W = text_bits.shape[0]
    n = acc.shape[0]
    if n == 0:
        return ACC_NONE, np.zeros(0, np.uint32)
    if n <= W and n <= n_text - n:
        return ACC_LIST, np.sort(acc).view(np.uint32)
    words = np.zeros(W, np.uint32)
    for t in acc:
        words[t >> 5] |= np.uint32(1) << np.uint32(t & 31)
    if n_text - n <= W:
        out = np.empty(n_text - n, np.int32)
        k = 0
        for w in range(W):
            m = text_bits[w] & ~words[w]
            if m == 0:
                continue
            for bit in range(32):
                if (m >> np.uint32(bit)) & np.uint32(1):
                    out[k] = w * 32 + bit
                    k += 1
        return ACC_COMPLEMENT, out.view(np.uint32)
    return ACC_BITS, words


@numba.njit(cache=True, nogil=True)
def _resolve_records(rec_node, rec_ae_ptr, rec_ae, follow_row):
    """The record nodes whose subtrees stay uncertain under FOLLOW ``follow_row`` (uint64[4]).

    A record with no after-end bytes is unconditional (the fallback entry uses it).
    """
    out = np.empty(rec_node.shape[0], np.int32)
    k = 0
    for j in range(rec_node.shape[0]):
        a, b = rec_ae_ptr[j], rec_ae_ptr[j + 1]
        keep = a == b
        for p in range(a, b):
            c = rec_ae[p]
            if (follow_row[c >> 6] >> np.uint64(c & 63)) & np.uint64(1):
                keep = True
                break
        if keep:
            out[k] = rec_node[j]
            k += 1
    return out[:k].copy()


@numba.njit(cache=True, nogil=True)
def _text_bits(token_kind, W):
    out = np.zeros(W, np.uint32)
    for t in range(token_kind.shape[0]):
        if token_kind[t] == 0:
            out[t >> 5] |= np.uint32(1) << np.uint32(t & 31)
    return out


@dataclass
class StateMasks:
    """A state's grammar-independent classification (shareable across grammars with the same sub-grammar).

    ``acc`` holds int32 ids (``ACC_LIST``, ``ACC_COMPLEMENT``) or uint32 words (``ACC_BITS``), as uint32.
    ``rec_node``/``rec_ae_ptr``/``rec_ae``: dead trie subtrees reached after the rule could end, with
    the bytes right after each such end (resolved per grammar by :func:`_resolve_records`).
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


def classify_state(G, flags: np.ndarray, s: int, info: TokenizerInfo, text_bits: np.ndarray,
                   *, max_items_per_row: int = 50_000) -> StateMasks:
    """Classify every text token for state ``s`` (one trie walk; see the module docstring).

    A state whose sub-chart exceeds ``max_items_per_row`` gets a conservative entry: nothing
    accepted, everything uncertain, so the full parser decides (and raises its own limit error).
    """
    t0 = time.perf_counter()
    max_deg = int(np.diff(G[4]).max(initial=1))
    targets = np.empty(max(max_deg, 1), np.int32)
    n_nodes = info.trie_byte.shape[0]
    depth = info.max_token_len + 2
    mode = np.empty(depth, np.int32)
    morg = np.empty(depth, np.int32)
    endk = np.zeros(depth, np.bool_)
    ae_cnt = np.zeros(depth, np.int32)
    ae_stack = np.empty(depth, np.uint8)
    acc = np.empty(max(info.vocab_size, 1), np.int32)
    rec_node = np.empty(n_nodes, np.int32)
    rec_ae_ptr = np.empty(n_nodes + 1, np.int32)
    rec_ae = np.empty(4096, np.uint8)
    counts = np.zeros(4, np.int64)
    cap = 4096
    ht = 256
    while True:
        st = np.empty(cap, np.int32)
        org = np.empty(cap, np.int32)
        row_ptr = np.zeros(depth + 2, np.int32)
        ht_key = np.zeros(ht, np.int64)
        ht_gen = np.zeros(ht, np.int64)
        meta = np.zeros(3, np.int64)
        status = _classify_kernel(
            G, flags, np.int32(s), info.trie_byte, info.trie_depth, info.trie_subtree, info.trie_tok_ptr,
            info.trie_tok_ids, st, org, row_ptr, ht_key, ht_gen, meta, max_items_per_row, targets, mode, morg, endk,
            ae_cnt, ae_stack, acc, rec_node, rec_ae_ptr, rec_ae, counts)
        if status == AE_FULL:
            rec_ae = np.empty(2 * rec_ae.shape[0], np.uint8)
        elif status == GROW:
            # A row needs room in the item arrays and at most half the hash table.
            if ht // 2 < max_items_per_row:
                ht *= 2
            cap *= 2
        else:
            break
    n_acc, n_rec, n_ae, visited = (int(x) for x in counts)
    if status == LIMIT:
        return StateMasks(ACC_NONE, np.zeros(0, np.uint32), 0, np.zeros(1, np.int32), np.zeros(2, np.int32),
                          np.zeros(0, np.uint8), 0, time.perf_counter() - t0)
    n_text = int(info.trie_tok_ids.shape[0])
    mode, data = _pack_accepted(acc[:n_acc], text_bits, n_text)
    return StateMasks(int(mode), data, int(n_acc), rec_node[:n_rec].copy(), rec_ae_ptr[:n_rec + 1].copy(),
                      rec_ae[:n_ae].copy(), int(visited), time.perf_counter() - t0)


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
    sizes = (4 * n_acc_words, 4 * n_rec, 4 * (n_rec + 1), n_ae)
    if raw.shape[0] != 64 + sum(sizes):
        return None
    parts = []
    off = 64
    for size in sizes:
        parts.append(raw[off:off + size])
        off += size
    return StateMasks(int(h[2]), parts[0].view(np.uint32).copy(), int(h[4]), parts[1].view(np.int32).copy(),
                      parts[2].view(np.int32).copy(), parts[3].copy(), int(h[7]), 0.0)


class MaskStore:
    """Per-tokenizer store of :class:`StateMasks`, keyed by sub-grammar hash, LRU-bounded by bytes.

    Thread-safe. Two threads asking for the same missing key compute it once: the second waits.
    """

    def __init__(self, info: TokenizerInfo, *, max_bytes: int = 1 << 30):
        self.fingerprint = info.fingerprint
        self.words = (info.vocab_size + 31) // 32
        self.text_bits = _text_bits(info.token_kind, self.words)
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self._entries: OrderedDict[bytes, StateMasks] = OrderedDict()
        self._inflight: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, compute: Callable[[], StateMasks], cache_dir: Path | None = None) -> StateMasks:
        """The entry for ``key``: from memory, else from ``cache_dir``, else ``compute()`` (then stored)."""
        while True:
            with self._lock:
                e = self._entries.get(key)
                if e is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return e
                ev = self._inflight.get(key)
                if ev is None:
                    ev = self._inflight[key] = threading.Event()
                    break
            ev.wait()
        try:
            path = cache_dir / self.fingerprint / f"{key.hex()}.bin" if cache_dir is not None else None
            e = _load(path) if path is not None else None
            if e is None:
                e = compute()
                if path is not None:
                    try:
                        _save(path, e)
                    except OSError:
                        pass  # a read-only or full cache directory only costs recomputation
                with self._lock:
                    self.misses += 1
            else:
                with self._lock:
                    self.disk_hits += 1
            with self._lock:
                self._entries[key] = e
                self.nbytes += e.nbytes
                while self.nbytes > self.max_bytes and len(self._entries) > 1:
                    _, old = self._entries.popitem(last=False)
                    self.nbytes -= old.nbytes
            return e
        finally:
            with self._lock:
                del self._inflight[key]
            ev.set()

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
    """Canonical hashes of the sub-grammar reachable from each rule (rules renumbered in BFS order)."""

    def __init__(self, grammar) -> None:
        self.g = grammar
        ns = grammar.n_states
        self.rule_end = np.append(grammar.rule_start[1:], ns).astype(np.int64)
        self._struct: dict[int, tuple[bytes, list[int]]] = {}
        self._closure: dict[int, bytes] = {}

    def _rule_struct(self, r: int) -> tuple[bytes, list[int]]:
        hit = self._struct.get(r)
        if hit is None:
            g = self.g
            s0, s1 = int(g.rule_start[r]), int(self.rule_end[r])
            e0, e1 = int(g.edge_ptr[s0]), int(g.edge_ptr[s1])
            rules = g.edge_rule[e0:e1]
            h = hashlib.blake2b(digest_size=16)
            for a in (g.state_final[s0:s1].astype(np.int32), g.edge_ptr[s0:s1 + 1] - e0, g.edge_lo[e0:e1],
                      g.edge_hi[e0:e1], (rules >= 0).astype(np.int32), g.edge_target[e0:e1] - s0):
                h.update(np.ascontiguousarray(a, np.int32).tobytes())
            hit = self._struct[r] = (h.digest(), rules[rules >= 0].tolist())
        return hit

    def rule_key(self, r: int) -> bytes:
        hit = self._closure.get(r)
        if hit is None:
            order = [r]
            index = {r: 0}
            h = hashlib.blake2b(digest_size=16)
            h.update(f"stencil-masks-{_FORMAT_VERSION}".encode())
            i = 0
            while i < len(order):
                digest, refs = self._rule_struct(order[i])
                for q in refs:
                    if q not in index:
                        index[q] = len(order)
                        order.append(q)
                h.update(digest)
                h.update(np.array([index[q] for q in refs], np.int64).tobytes())
                i += 1
            hit = self._closure[r] = h.digest()
        return hit

    def state_key(self, s: int) -> bytes:
        r = int(self.g.state_rule[s])
        return self.rule_key(r) + int(s - self.g.rule_start[r]).to_bytes(4, "little")


# ----------------------------------------------------------------------------------------------
# The per-grammar cache: resolved entries in flat pools the mask kernel reads in one call
# ----------------------------------------------------------------------------------------------


class MaskCache:
    """The token-mask cache of one compiled grammar.

    ``pools`` is an immutable snapshot ``(state_entry, ent, ids, bits)`` that the mask kernel reads:

    * ``state_entry[s]``: row of ``ent`` for state s, or -1 while not computed;
    * ``ent[i] = (acc_mode, acc_off, acc_len, unc_off, unc_len)``: the accepted set is
      ``ids[acc_off:acc_off+acc_len]`` (ACC_LIST / ACC_COMPLEMENT) or ``bits[acc_off]`` (ACC_BITS);
      the uncertain trie nodes (preorder) are ``ids[unc_off:unc_off+unc_len]``.

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
        self.follow = follow_sets(self.G)
        self.store = mask_store(info)
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
        self._keys = _Keys(g)
        self._lock = threading.Lock()
        self._n_ent = 0
        self._n_ids = 0
        self._n_bits = 0
        self.pools = (np.full(g.n_states, -1, np.int32), np.zeros((16, 5), np.int32), np.zeros(1024, np.int32),
                      np.zeros((1, self.words), np.uint32))
        self.computed_seconds = 0.0
        self._warm_thread_started = False

    # -- entries ------------------------------------------------------------------------------

    def lookup_states(self) -> np.ndarray:
        """The states a mask may look up (those with an edge), in the order a decoder likely reaches them."""
        g = self.grammar
        seen = np.zeros(g.n_states, np.bool_)
        rule_seen = np.zeros(g.n_rules, np.bool_)
        start = int(g.rule_start[g.root])
        order = [start]
        seen[start] = True
        rule_seen[g.root] = True
        i = 0
        while i < len(order):
            s = order[i]
            i += 1
            for e in range(g.edge_ptr[s], g.edge_ptr[s + 1]):
                r = int(g.edge_rule[e])
                if r >= 0 and not rule_seen[r]:
                    rule_seen[r] = True
                    q = int(g.rule_start[r])
                    if not seen[q]:
                        seen[q] = True
                        order.append(q)
                t = int(g.edge_target[e])
                if not seen[t]:
                    seen[t] = True
                    order.append(t)
        order = np.array(order, np.int32)
        return order[self.flags[order] != 0]

    def state_key(self, s: int) -> bytes:
        """The cross-grammar key of state s: its rule's reachable sub-grammar, canonically hashed."""
        return self._keys.state_key(int(s))

    def state_masks(self, s: int) -> StateMasks:
        """The grammar-independent entry of state s (shared store, disk cache, or a fresh walk)."""
        s = int(s)
        return self.store.get(self.state_key(s), lambda: self._classify(s), self.cache_dir)

    def _classify(self, s: int) -> StateMasks:
        e = classify_state(self.G, self.flags, s, self.info, self.store.text_bits,
                           max_items_per_row=self.max_items_per_row)
        self.computed_seconds += e.seconds
        return e

    def ensure(self, states: Iterable[int]) -> None:
        """Compute and register the entries of ``states`` that are missing."""
        for s in states:
            s = int(s)
            if self.pools[0][s] < 0:
                self._register(s, self.state_masks(s))

    def _register(self, s: int, e: StateMasks) -> None:
        unc = _resolve_records(e.rec_node, e.rec_ae_ptr, e.rec_ae, self.follow[self.grammar.state_rule[s]])
        n_list = e.acc.shape[0] if e.acc_mode in (ACC_LIST, ACC_COMPLEMENT) else 0
        with self._lock:
            state_entry, ent, ids, bits = self.pools
            if state_entry[s] >= 0:
                return
            need_ids = self._n_ids + n_list + unc.shape[0]
            need_bits = self._n_bits + (e.acc_mode == ACC_BITS)
            if self._n_ent >= ent.shape[0] or need_ids > ids.shape[0] or need_bits > bits.shape[0]:
                state_entry = state_entry.copy()
                ent = _grown(ent, self._n_ent + 1)
                ids = _grown(ids, need_ids)
                bits = _grown(bits, need_bits)
            if e.acc_mode == ACC_BITS:
                bits[self._n_bits] = e.acc
                acc_off, acc_len = self._n_bits, 1
                self._n_bits += 1
            else:
                acc_off, acc_len = self._n_ids, n_list
                ids[acc_off:acc_off + n_list] = e.acc.view(np.int32)
                self._n_ids += n_list
            ids[self._n_ids:self._n_ids + unc.shape[0]] = unc
            ent[self._n_ent] = (e.acc_mode, acc_off, acc_len, self._n_ids, unc.shape[0])
            self._n_ids += unc.shape[0]
            state_entry[s] = self._n_ent
            self._n_ent += 1
            self.pools = (state_entry, ent, ids, bits)

    @property
    def n_computed(self) -> int:
        """States with a registered entry."""
        return self._n_ent

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


def _grown(a: np.ndarray, need: int) -> np.ndarray:
    out = np.zeros((max(need, 2 * a.shape[0]),) + a.shape[1:], a.dtype)
    out[: a.shape[0]] = a
    return out


class _Worker:
    """One daemon thread that warms up queued mask caches, a few states at a time, newest grammar first."""

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
                try:
                    for _ in range(8):
                        if not states:
                            break
                        cache.ensure((states.popleft(),))
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
