"""The byte-level recognizer: an Earley chart over the IR's rule automata, in numba.

An *item* is ``(state, origin)``: some rule's automaton is in ``state`` and the rule began at byte
row ``origin``. Row i holds every item alive after i bytes. The rows form the persistent stack of
DESIGN.md: all nondeterministic parses share the rows behind them, a rule's caller is found
through the origin back-pointer, and rollback just forgets the newest rows (O(1)).

Per row, three closures run to a fixpoint over a worklist (the row itself):

* **predict**: an item whose state has an edge ``<R>`` adds ``(start(R), i)``; if R derives the
  empty string the edge is also stepped over at once (Aycock & Horspool's fix for nullable rules,
  so completion never has to look at the row being built);
* **complete**: an item in a final state of rule R with origin o < i steps every item of row o that
  waits on ``<R>``;
* **scan** (between rows): every item with a byte edge matching the next symbol moves to the next row.

This handles left recursion and ambiguity with no special cases. Items are deduplicated per row
with a small open-addressing hash table. A row larger than ``max_items_per_row`` raises
:class:`~stencil.errors.ParserLimitError` instead of stalling.

Symbols are bytes (0..255) or special tokens (256 + k); see :mod:`stencil.grammar.ir`.
"""

from __future__ import annotations

import numba
import numpy as np

from stencil.errors import ParserLimitError
from stencil.grammar.ir import Grammar

# The kernels allocate nothing, so they run without numba's reference counting (``_nrt=False``):
# unpacking the grammar tuple otherwise costs an atomic incref/decref per array per call, which
# made one ``advance`` several times slower than the work it does.
_KERNEL = dict(cache=True, nogil=True, _nrt=False)

# Status codes of the kernels (a non-negative status is the size of the new row).
GROW = -1  # the item arrays are full: grow them and call again (nothing was committed)
LIMIT = -2  # the row exceeded max_items_per_row

def grammar_arrays(g: Grammar) -> tuple:
    """The grammar's flat arrays as the tuple the kernels take."""
    return (
        g.rule_start,
        g.rule_nullable,
        g.state_rule,
        g.state_final,
        g.edge_ptr,
        g.edge_lo,
        g.edge_hi,
        g.edge_rule,
        g.edge_target,
        np.int32(g.root),
    )


@numba.njit(**_KERNEL, inline="always")
def _add(st, org, ht_key, ht_gen, gen, end, cap, s, o):
    """Insert item (s, o) at position ``end`` unless present; return the new end (-1 if out of room)."""
    key = (np.int64(s) << 32) | np.int64(o)
    mask = ht_key.shape[0] - 1
    h = ((key * np.int64(0x9E3779B97F4A7C15)) >> 20) & mask
    while ht_gen[h] == gen:
        if ht_key[h] == key:
            return end
        h = (h + 1) & mask
    if end >= cap:
        return -1
    ht_gen[h] = gen
    ht_key[h] = key
    st[end] = s
    org[end] = o
    return end + 1


@numba.njit(**_KERNEL, inline="always")
def _row_cap(st, ht_key, begin, max_items):
    """How far a row starting at ``begin`` may grow: storage, half the hash table, and the limit."""
    return min(st.shape[0], begin + ht_key.shape[0] // 2, begin + max_items)


@numba.njit(**_KERNEL, inline="always")
def _full(end, begin, max_items):
    """The status when a row ran out of room: the user's limit, or just our buffers."""
    return LIMIT if end - begin >= max_items else GROW


@numba.njit(**_KERNEL)
def _closure(G, st, org, row_ptr, row, begin, end, ht_key, ht_gen, gen, max_items):
    """Run predict/complete to a fixpoint over row ``row`` (items begin..end); return its end or a status."""
    rule_start, rule_nullable, state_rule, state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target, root = G
    cap = _row_cap(st, ht_key, begin, max_items)
    j = begin
    while j < end:
        s = st[j]
        o = org[j]
        j += 1
        if state_final[s] != 0 and o < row:
            r = state_rule[s]
            for k in range(row_ptr[o], row_ptr[o + 1]):
                s2 = st[k]
                for e in range(edge_ptr[s2], edge_ptr[s2 + 1]):
                    if edge_rule[e] == r:
                        new = _add(st, org, ht_key, ht_gen, gen, end, cap, edge_target[e], org[k])
                        if new < 0:
                            return _full(end, begin, max_items)
                        end = new
        for e in range(edge_ptr[s], edge_ptr[s + 1]):
            r = edge_rule[e]
            if r < 0:
                continue
            new = _add(st, org, ht_key, ht_gen, gen, end, cap, rule_start[r], row)
            if new < 0:
                return _full(end, begin, max_items)
            end = new
            if rule_nullable[r] != 0:
                new = _add(st, org, ht_key, ht_gen, gen, end, cap, edge_target[e], o)
                if new < 0:
                    return _full(end, begin, max_items)
                end = new
    return end


@numba.njit(**_KERNEL, inline="always")
def _close_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, row, begin, end, gen):
    """Close row ``row`` (items begin..end) and make it the chart's last; its end, or GROW / LIMIT."""
    end = _closure(G, st, org, row_ptr, row, begin, end, ht_key, ht_gen, gen, max_items)
    if end < 0:
        return end
    row_ptr[row + 1] = end
    meta[0] = row + 1
    return end


@numba.njit(**_KERNEL)
def init_chart(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items):
    """Row 0: the root rule predicted at byte 0.

    ``meta`` = [n_rows, hash generation, last status, rewinds, replacements]; rewinds counts the times
    the row count went back (rollback, reset), so a kernel that remembers a result computed from rows
    behind the last one knows whether those rows may have been rewritten since; replacements counts
    the times the chart's arrays were replaced (see ``Recognizer.chart``), so a kernel handed their
    addresses once knows whether they still hold the chart.
    """
    rule_start = G[0]
    root = G[9]
    meta[1] += 1
    gen = meta[1]
    row_ptr[0] = 0
    end = _add(st, org, ht_key, ht_gen, gen, 0, 1, rule_start[root], 0)
    return _close_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, 0, 0, end, gen)


@numba.njit(**_KERNEL)
def advance(G, st, org, row_ptr, ht_key, ht_gen, meta, sym, max_items):
    """Scan symbol ``sym`` from the last row into a new row and close it.

    Returns the new row's size (0: rejected, and nothing changes), or GROW / LIMIT.
    """
    state_final, edge_ptr, edge_lo, edge_hi, edge_rule, edge_target = G[3], G[4], G[5], G[6], G[7], G[8]
    n = meta[0]
    if n + 1 >= row_ptr.shape[0]:
        return GROW
    meta[1] += 1
    gen = meta[1]
    begin = row_ptr[n]
    end = begin
    cap = _row_cap(st, ht_key, begin, max_items)
    for k in range(row_ptr[n - 1], row_ptr[n]):
        s = st[k]
        for e in range(edge_ptr[s], edge_ptr[s + 1]):
            if edge_rule[e] >= 0:
                break  # byte edges come first
            if edge_lo[e] <= sym <= edge_hi[e]:
                new = _add(st, org, ht_key, ht_gen, gen, end, cap, edge_target[e], org[k])
                if new < 0:
                    return _full(end, begin, max_items)
                end = new
            elif edge_lo[e] > sym:
                break
    if end == begin:
        return 0
    end = _close_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, n, begin, end, gen)
    return end if end < 0 else end - begin


@numba.njit(**_KERNEL)
def advance_many(G, st, org, row_ptr, ht_key, ht_gen, meta, syms, max_items):
    """Advance over ``syms`` until one fails; return how many were consumed.

    ``meta[2]`` gets the status of the symbol that stopped the walk (0 rejected, GROW or LIMIT),
    or 1 when all were consumed. The caller undoes partial progress on rejection and continues
    after growing on GROW.
    """
    for i in range(syms.shape[0]):
        r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, syms[i], max_items)
        if r <= 0:
            meta[2] = r
            return i
    meta[2] = 1
    return syms.shape[0]


@numba.njit(**_KERNEL)
def is_accepting(G, st, org, row_ptr, meta):
    """True if the root rule can end after the bytes seen so far."""
    state_rule, state_final, root = G[2], G[3], G[9]
    n = meta[0]
    for k in range(row_ptr[n - 1], row_ptr[n]):
        s = st[k]
        if org[k] == 0 and state_final[s] != 0 and state_rule[s] == root:
            return True
    return False


@numba.njit(**_KERNEL)
def can_continue(G, st, org, row_ptr, meta):
    """True if some symbol can still be consumed from the last row."""
    edge_ptr, edge_rule = G[4], G[7]
    n = meta[0]
    for k in range(row_ptr[n - 1], row_ptr[n]):
        s = st[k]
        if edge_ptr[s] < edge_ptr[s + 1] and edge_rule[edge_ptr[s]] < 0:
            return True
    return False


# single_scan_symbol answers besides a symbol
NO_SYMBOL = -1  # the last row can scan nothing
MANY_SYMBOLS = -2  # the last row can scan more than one symbol


@numba.njit(**_KERNEL)
def single_scan_symbol(G, st, row_ptr, meta):
    """The only symbol the last row can scan, if there is exactly one; else NO_SYMBOL or MANY_SYMBOLS.

    What jump-forward asks at every step: a byte forced by the grammar is one the last row's items
    all agree on. Stops at the first second symbol seen.
    """
    edge_ptr, edge_lo, edge_hi, edge_rule = G[4], G[5], G[6], G[7]
    n = meta[0]
    sym = NO_SYMBOL
    for k in range(row_ptr[n - 1], row_ptr[n]):
        s = st[k]
        for e in range(edge_ptr[s], edge_ptr[s + 1]):
            if edge_rule[e] >= 0:
                break  # byte edges come first
            lo = edge_lo[e]
            if lo != edge_hi[e] or (sym != NO_SYMBOL and sym != lo):
                return MANY_SYMBOLS
            sym = lo
    return sym


class Recognizer:
    """Incremental recognizer for one grammar: feed bytes, ask whether the input so far is complete.

    A rejected input leaves the state unchanged. ``rollback_bytes(n)`` undoes the last n bytes.
    ``chart`` is the tuple ``(st, org, row_ptr, ht_key, ht_gen, meta)`` of the chart's arrays, replaced
    by a new tuple whenever an array is.
    """

    def __init__(self, grammar: Grammar, *, max_items_per_row: int = 50_000, initial_capacity: int = 4096):
        self.grammar = grammar
        self.G = grammar_arrays(grammar)
        self.max_items_per_row = int(max_items_per_row)
        self._st = np.zeros(initial_capacity, np.int32)
        self._org = np.zeros(initial_capacity, np.int32)
        self._row_ptr = np.zeros(256, np.int32)
        self._ht_key = np.zeros(64, np.int64)
        self._ht_gen = np.zeros(64, np.int64)
        self._meta = np.zeros(5, np.int64)
        self._new_chart()
        self.reset()

    # -- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the empty input."""
        self._meta[3] += 1
        while True:
            r = init_chart(self.G, self._st, self._org, self._row_ptr, self._ht_key, self._ht_gen, self._meta,
                           self.max_items_per_row)
            if r != GROW:
                break
            self._grow()
        self._check(r, 0)

    @property
    def num_bytes(self) -> int:
        """How many bytes (symbols) have been consumed."""
        return int(self._meta[0]) - 1

    def fork(self) -> "Recognizer":
        """An independent copy (only the used part of the chart is copied)."""
        other = Recognizer.__new__(Recognizer)
        other.grammar = self.grammar
        other.G = self.G
        other.max_items_per_row = self.max_items_per_row
        used = int(self._row_ptr[self._meta[0]])
        other._st = self._st.copy() if used * 2 > self._st.shape[0] else _with_capacity(self._st, used)
        other._org = self._org.copy() if used * 2 > self._org.shape[0] else _with_capacity(self._org, used)
        other._row_ptr = self._row_ptr.copy()
        other._ht_key = np.zeros(self._ht_key.shape[0], np.int64)
        other._ht_gen = np.zeros(self._ht_gen.shape[0], np.int64)
        other._meta = self._meta.copy()
        other._new_chart()
        return other

    # -- feeding ---------------------------------------------------------------------------

    def accept_symbol(self, sym: int) -> bool:
        """Consume one byte (0..255) or special-token symbol (256+k); False leaves the state unchanged."""
        while True:
            r = advance(self.G, self._st, self._org, self._row_ptr, self._ht_key, self._ht_gen, self._meta,
                        int(sym), self.max_items_per_row)
            if r != GROW:
                break
            self._grow()
        self._check(r, self.num_bytes)
        return r > 0

    def accept_bytes(self, data: bytes | bytearray | np.ndarray) -> bool:
        """Consume all of ``data`` or nothing; False leaves the state unchanged."""
        syms = np.frombuffer(bytes(data), np.uint8).astype(np.int32) if not isinstance(data, np.ndarray) else data
        return self.accept_symbols(syms)

    def accept_symbols(self, syms: np.ndarray) -> bool:
        """Consume every symbol (int32 array) or nothing."""
        n0 = int(self._meta[0])
        done = 0
        while done < syms.shape[0]:
            done += advance_many(self.G, self._st, self._org, self._row_ptr, self._ht_key, self._ht_gen,
                                 self._meta, syms[done:], self.max_items_per_row)
            status = int(self._meta[2])
            if status == GROW:
                self._grow()
            elif status != 1:
                at = int(self._meta[0]) - 1
                self._meta[0] = n0
                self._check(status, at)
                return False
        return True

    def rollback_bytes(self, n: int) -> None:
        """Forget the last ``n`` consumed symbols."""
        if n < 0 or n > self.num_bytes:
            raise ValueError(f"cannot roll back {n} bytes: only {self.num_bytes} consumed")
        if n:
            self._meta[0] -= n
            self._meta[3] += 1

    # -- queries ---------------------------------------------------------------------------

    def is_accepting(self) -> bool:
        """True if the input so far is a complete sentence of the grammar."""
        return bool(is_accepting(self.G, self._st, self._org, self._row_ptr, self._meta))

    def can_continue(self) -> bool:
        """True if at least one more symbol could be consumed."""
        return bool(can_continue(self.G, self._st, self._org, self._row_ptr, self._meta))

    def row_size(self) -> int:
        """Items in the current row (a measure of ambiguity)."""
        n = int(self._meta[0])
        return int(self._row_ptr[n] - self._row_ptr[n - 1])

    # -- internals -------------------------------------------------------------------------

    def _grow(self) -> None:
        """Make room after a GROW status: more item storage, a larger hash table, more rows."""
        # A mask walk may stop with the row count at the end of row_ptr (that is why it asked).
        n = int(self._meta[0])
        used = int(self._row_ptr[min(n, self._row_ptr.shape[0] - 1)])
        grew = False
        if used + min(self._ht_key.shape[0] // 2, self.max_items_per_row) >= self._st.shape[0]:
            self._st = _with_capacity(self._st, 2 * self._st.shape[0])
            self._org = _with_capacity(self._org, 2 * self._org.shape[0])
            grew = True
        elif self._ht_key.shape[0] // 2 < self.max_items_per_row:
            self._ht_key = np.zeros(2 * self._ht_key.shape[0], np.int64)
            self._ht_gen = np.zeros(self._ht_key.shape[0], np.int64)
            grew = True
        if n + 2 >= self._row_ptr.shape[0]:
            self._row_ptr = _with_capacity(self._row_ptr, 2 * self._row_ptr.shape[0])
            grew = True
        assert grew, "GROW reported with room to spare"
        self._new_chart()

    def _new_chart(self) -> None:
        # Callers that bind the arrays once (the matcher's direct kernel calls) compare this tuple
        # by identity to know their binding still holds the chart's arrays.
        self.chart = (self._st, self._org, self._row_ptr, self._ht_key, self._ht_gen, self._meta)
        self._meta[4] += 1

    def _check(self, r: int, at: int) -> None:
        if r == LIMIT:
            raise ParserLimitError(
                f"parser limit: more than {self.max_items_per_row} items in one row after "
                f"{at} bytes (the grammar is too ambiguous here; raise max_items_per_row "
                "or simplify the grammar)"
            )


def _with_capacity(a: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(max(n, 16), a.dtype)
    m = min(a.shape[0], out.shape[0])
    out[:m] = a[:m]
    return out


def grammar_accepts(grammar: Grammar, data: bytes) -> bool:
    """True iff all of ``data`` is a sentence of ``grammar``."""
    r = Recognizer(grammar)
    return r.accept_bytes(data) and r.is_accepting()
