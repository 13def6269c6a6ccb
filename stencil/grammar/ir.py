"""The Grammar IR: a list of rules whose bodies are byte-level automata.

Frontends (EBNF, Lark, regex, JSON Schema, ...) describe each rule body with a small expression
tree (:class:`Lit`, :class:`ByteClass`, :class:`CharClass`, :class:`Seq`, :class:`Alt`,
:class:`Repeat`, :class:`Ref`) and hand it to a :class:`GrammarBuilder`. ``build()`` lowers every
body to an automaton whose edges read one byte range or one rule reference, removes epsilon edges,
determinizes and minimizes it where that stays small, and packs all rules into flat numpy arrays
(:class:`Grammar`) that the numba recognizer walks.

Edges read *symbols*: 0..255 are bytes, and 256 + k is the k-th special token the grammar names
(:class:`Special`, listed in ``Grammar.special_tokens``), which only that token id can produce.

Flat layout (all ``int32`` unless said otherwise), states numbered globally across rules::

    rule_start[r]            start state of rule r
    state_rule[s]            the rule that state s belongs to
    state_final[s]  (uint8)  1 if the rule may end in s
    edge_ptr[s]..edge_ptr[s+1]   the outgoing edges of s (CSR), byte edges first, sorted by lo
    edge_lo[e], edge_hi[e]   inclusive symbol range of a byte edge (unused for rule edges)
    edge_rule[e]             -1 for a byte edge, else the referenced rule id
    edge_target[e]           the state reached
    rule_nullable[r] (uint8) 1 if rule r derives the empty string

Code points become UTF-8 byte paths here (:func:`utf8_ranges`), so everything downstream sees
bytes only, and surrogates (U+D800..U+DFFF) can never be produced.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from numba import njit

from stencil.errors import GrammarError

MAX_CODE_POINT = 0x10FFFF

# ----------------------------------------------------------------------------------------------
# Expression trees (what frontends produce)
# ----------------------------------------------------------------------------------------------


class Expr:
    """Base class of rule-body expressions. Instances are immutable and hashable."""

    __slots__ = ()


@dataclass(frozen=True)
class Lit(Expr):
    """A literal byte string (``b""`` is the empty string)."""

    data: bytes


@dataclass(frozen=True)
class ByteClass(Expr):
    """Exactly one byte from inclusive ``ranges`` [(lo, hi), ...] with 0 <= lo <= hi <= 255."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CharClass(Expr):
    """Exactly one Unicode scalar value from inclusive code-point ``ranges``, encoded as UTF-8.

    Surrogates are dropped: they have no UTF-8 encoding.
    """

    ranges: tuple[tuple[int, int], ...]

    def negate(self) -> "CharClass":
        """Every code point (0..U+10FFFF) not in this class."""
        return CharClass(complement_ranges(self.ranges, MAX_CODE_POINT))


@dataclass(frozen=True)
class Seq(Expr):
    """Concatenation; ``Seq(())`` is the empty string."""

    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Alt(Expr):
    """Alternation; ``Alt(())`` is the empty language (matches nothing)."""

    options: tuple[Expr, ...]


@dataclass(frozen=True)
class Repeat(Expr):
    """``body`` repeated between ``lo`` and ``hi`` times (``hi=None``: unbounded)."""

    body: Expr
    lo: int = 0
    hi: int | None = None


@dataclass(frozen=True)
class Special(Expr):
    """A special token, named by its content (e.g. ``<|im_end|>``): it matches that token id only, never text.

    In the automata it is the symbol ``256 + k`` where k indexes :attr:`Grammar.special_tokens`;
    the compiler binds it to the tokenizer's id.
    """

    name: str


@dataclass(frozen=True)
class Ref(Expr):
    """A reference to the rule called ``name``."""

    name: str


@dataclass(frozen=True)
class Automaton(Expr):
    """A finite automaton whose edges read sub-expressions: states ``0..n_states-1``, start state 0.

    ``edges`` holds ``(source, label, target)`` triples, where ``label`` is any expression (rule
    references included); ``finals`` are the accepting states. The language is the union, over paths
    from 0 to a final state, of the concatenated labels. Frontends use it for languages that an
    expression tree states only at exponential size (automaton products, counters, optional
    comma-separated members).
    """

    n_states: int
    edges: tuple[tuple[int, Expr, int], ...]
    finals: tuple[int, ...]


EMPTY = Seq(())
NOTHING = Alt(())


def lit(text: str | bytes) -> Lit:
    """A literal; ``str`` is UTF-8 encoded."""
    return Lit(text.encode("utf-8") if isinstance(text, str) else bytes(text))


def seq(*items: Expr) -> Expr:
    """Concatenation that flattens nested sequences and drops empty literals."""
    out: list[Expr] = []
    for it in items:
        if isinstance(it, Seq):
            out.extend(it.items)
        elif isinstance(it, Lit) and not it.data:
            continue
        else:
            out.append(it)
    return out[0] if len(out) == 1 else Seq(tuple(out))


def alt(*options: Expr) -> Expr:
    """Alternation that flattens nested alternations."""
    out: list[Expr] = []
    for o in options:
        out.extend(o.options if isinstance(o, Alt) else (o,))
    return out[0] if len(out) == 1 else Alt(tuple(out))


def opt(x: Expr) -> Repeat:
    return Repeat(x, 0, 1)


def star(x: Expr) -> Repeat:
    return Repeat(x, 0, None)


def plus(x: Expr) -> Repeat:
    return Repeat(x, 1, None)


def chars(*ranges: tuple[int, int] | str) -> CharClass:
    """A character class from single characters and (lo, hi) pairs of characters or code points."""
    rs = []
    for r in ranges:
        if isinstance(r, str):
            rs.append((ord(r), ord(r)))
        else:
            lo, hi = (ord(x) if isinstance(x, str) else int(x) for x in r)
            rs.append((lo, hi))
    return CharClass(normalize_ranges(rs))


# ----------------------------------------------------------------------------------------------
# Range helpers
# ----------------------------------------------------------------------------------------------


def normalize_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort and merge overlapping or adjacent inclusive ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted((int(a), int(b)) for a, b in ranges):
        if lo > hi:
            continue
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def complement_ranges(ranges: Iterable[tuple[int, int]], maximum: int) -> tuple[tuple[int, int], ...]:
    """The inclusive ranges of 0..maximum not covered by ``ranges``."""
    out = []
    nxt = 0
    for lo, hi in normalize_ranges(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = max(nxt, hi + 1)
    if nxt <= maximum:
        out.append((nxt, maximum))
    return tuple(out)


_UTF8_BANDS = ((0x0, 0x7F, 1), (0x80, 0x7FF, 2), (0x800, 0xFFFF, 3), (0x10000, 0x10FFFF, 4))


def _utf8_split(lo: int, hi: int, n: int) -> list[list[tuple[int, int]]]:
    """Byte-range sequences for code points lo..hi that all encode to n bytes."""
    if n == 1:
        return [[(lo, hi)]]
    # Split where the leading bytes change so that the continuation bytes cover full ranges.
    shift = 6 * (n - 1)
    if lo >> shift == hi >> shift:
        lead = _lead_byte(lo, n)
        return [[(lead, lead)] + tail for tail in _utf8_cont(lo & ((1 << shift) - 1), hi & ((1 << shift) - 1), n - 1)]
    out = []
    mask = (1 << shift) - 1
    if lo & mask:
        out += _utf8_split(lo, lo | mask, n)
        lo = (lo | mask) + 1
    if (hi & mask) != mask:
        tail_lo = hi & ~mask
        tail = _utf8_split(tail_lo, hi, n)
        hi = tail_lo - 1
    else:
        tail = []
    if lo <= hi:
        out.append([(_lead_byte(lo, n), _lead_byte(hi, n))] + [(0x80, 0xBF)] * (n - 1))
    return out + tail


def _lead_byte(cp: int, n: int) -> int:
    prefix = {2: 0xC0, 3: 0xE0, 4: 0xF0}[n]
    return prefix | (cp >> (6 * (n - 1)))


def _utf8_cont(lo: int, hi: int, k: int) -> list[list[tuple[int, int]]]:
    """Continuation-byte sequences (k bytes) for the low bits lo..hi."""
    if k == 1:
        return [[(0x80 | lo, 0x80 | hi)]]
    shift = 6 * (k - 1)
    mask = (1 << shift) - 1
    if lo >> shift == hi >> shift:
        b = 0x80 | (lo >> shift)
        return [[(b, b)] + t for t in _utf8_cont(lo & mask, hi & mask, k - 1)]
    out = []
    if lo & mask:
        out += _utf8_cont(lo, lo | mask, k)
        lo = (lo | mask) + 1
    tail = []
    if (hi & mask) != mask:
        tail_lo = hi & ~mask
        tail = _utf8_cont(tail_lo, hi, k)
        hi = tail_lo - 1
    if lo <= hi:
        out.append([(0x80 | (lo >> shift), 0x80 | (hi >> shift))] + [(0x80, 0xBF)] * (k - 1))
    return out + tail


def utf8_ranges(ranges: Iterable[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Code-point ranges -> list of byte-range sequences whose union is exactly their UTF-8 encodings.

    Surrogates are excluded, so the result only ever matches well-formed UTF-8.
    """
    cps = complement_ranges(complement_ranges(ranges, MAX_CODE_POINT) + ((0xD800, 0xDFFF),), MAX_CODE_POINT)
    out: list[list[tuple[int, int]]] = []
    for lo, hi in cps:
        for blo, bhi, n in _UTF8_BANDS:
            a, b = max(lo, blo), min(hi, bhi)
            if a <= b:
                out += _utf8_split(a, b, n)
    return out


# ----------------------------------------------------------------------------------------------
# Automata construction
# ----------------------------------------------------------------------------------------------

# An NFA edge: (lo, hi, rule, target); rule == -1 for a byte range, -2 for epsilon.
_EPS = -2


@dataclass
class GrammarLimits:
    """Bounds on grammar construction, so a pathological grammar fails clearly instead of stalling."""

    max_nfa_states: int = 2_000_000
    max_dfa_states: int = 20_000


class _Lowering:
    """Lowers one rule body to an NFA, with rule references and special tokens numbered locally.

    Local numbering (first use in the expression) makes the result a function of the expression
    alone, so identical bodies in any grammar share one automaton (see :func:`_rule_automaton`).
    """

    def __init__(self, limits: GrammarLimits) -> None:
        self.refs: dict[str, int] = {}
        self.specials: list[str] = []
        self.limits = limits
        self.nfa = _NFA()
        # (continuation byte ranges, target) -> the state that reads them: UTF-8 paths of every
        # character class that end in the same state share their tails, which keeps the subset
        # construction from making one copy of each tail per source state.
        self._tails: dict[tuple, int] = {}

    def lower(self, e: Expr, s: int) -> int:
        """Add ``e`` starting at state s; return its end state (a state with no outgoing edges yet)."""
        if isinstance(e, (Lit, Seq, Repeat, Automaton)):
            return self._lower_open(e, s)
        t = self.nfa.new()
        self.lower_into(e, s, t)
        return t

    def lower_into(self, e: Expr, s: int, t: int) -> None:
        """Add ``e`` as paths from s to the existing state t, adding edges into t but none out of it.

        Like :meth:`lower`, this never adds an edge into s, so expressions lowered from one state
        (alternatives, automaton edges) can share it.
        """
        nfa = self.nfa
        if isinstance(e, ByteClass):
            for lo, hi in normalize_ranges(e.ranges):
                nfa.add(s, lo, hi, -1, t)
        elif isinstance(e, CharClass):
            for path in _utf8_paths(e.ranges):
                lo, hi = path[0]
                nfa.add(s, lo, hi, -1, self._tail(path[1:], t))
        elif isinstance(e, Alt):
            for o in e.options:
                self.lower_into(o, s, t)
        elif isinstance(e, Ref):
            nfa.add(s, 0, 0, self.refs.setdefault(e.name, len(self.refs)), t)
        elif isinstance(e, Special):
            if e.name not in self.specials:
                self.specials.append(e.name)
            sym = 256 + self.specials.index(e.name)
            nfa.add(s, sym, sym, -1, t)
        elif isinstance(e, Lit) and len(e.data) == 1:
            nfa.add(s, e.data[0], e.data[0], -1, t)
        elif (isinstance(e, Lit) and not e.data) or (isinstance(e, Seq) and not e.items):
            nfa.add(s, 0, 0, _EPS, t)
        elif isinstance(e, Seq):
            for it in e.items[:-1]:
                s = self.lower(it, s)
            self.lower_into(e.items[-1], s, t)
        elif isinstance(e, Lit):
            self.lower_into(Lit(e.data[-1:]), self._lower_open(Lit(e.data[:-1]), s), t)
        elif isinstance(e, (Repeat, Automaton)):
            nfa.add(self._lower_open(e, s), 0, 0, _EPS, t)
        else:
            raise TypeError(f"not a grammar expression: {e!r}")

    def _tail(self, path: tuple[tuple[int, int], ...], t: int) -> int:
        if not path:
            return t
        key = (path, t)
        q = self._tails.get(key)
        if q is None:
            q = self.nfa.new()
            self.nfa.add(q, path[0][0], path[0][1], -1, self._tail(path[1:], t))
            self._tails[key] = q
        return q

    def _lower_open(self, e: Expr, s: int) -> int:
        nfa = self.nfa
        if nfa.n > self.limits.max_nfa_states:
            raise GrammarError(
                f"grammar too large: more than {self.limits.max_nfa_states} automaton states "
                "(a very large bounded repetition?)"
            )
        if isinstance(e, Lit):
            for b in e.data:
                t = nfa.new()
                nfa.add(s, b, b, -1, t)
                s = t
            return s
        if isinstance(e, Seq):
            for it in e.items:
                s = self.lower(it, s)
            return s
        if isinstance(e, Repeat):
            if e.lo < 0 or (e.hi is not None and e.hi < e.lo):
                raise GrammarError(f"bad repetition bounds {{{e.lo},{e.hi}}}")
            for _ in range(e.lo):
                s = self.lower(e.body, s)
            if e.hi is None:
                # s --eps--> a --body--> b --eps--> a ; a is the exit.
                a = nfa.new()
                nfa.add(s, 0, 0, _EPS, a)
                self.lower_into(e.body, a, a) if _single_step(e.body) else nfa.add(self.lower(e.body, a), 0, 0, _EPS, a)
                return a
            end = nfa.new()
            for _ in range(e.hi - e.lo):
                nfa.add(s, 0, 0, _EPS, end)
                s = self.lower(e.body, s)
            nfa.add(s, 0, 0, _EPS, end)
            return end
        if isinstance(e, Automaton):
            # Labels never add edges into their start state, so they can share the node states.
            nodes = [nfa.new() for _ in range(e.n_states)]
            nfa.add(s, 0, 0, _EPS, nodes[0])
            end = nfa.new()
            for p, label, q in e.edges:
                self.lower_into(label, nodes[p], nodes[q])
            for f in e.finals:
                nfa.add(nodes[f], 0, 0, _EPS, end)
            return end
        raise TypeError(f"not a grammar expression: {e!r}")


def _single_step(e: Expr) -> bool:
    """Whether every path of ``e`` is one edge (a class, reference, special, or one byte), so it can loop on a state."""
    if isinstance(e, Alt):
        return all(_single_step(o) for o in e.options)
    return isinstance(e, (ByteClass, CharClass, Ref, Special)) or (isinstance(e, Lit) and len(e.data) == 1)


@lru_cache(maxsize=4096)
def _utf8_paths(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[tuple[int, int], ...], ...]:
    return tuple(tuple(p) for p in utf8_ranges(ranges))


class _NFA:
    """An NFA under construction, as flat edge lists (source, lo, hi, rule, target)."""

    def __init__(self) -> None:
        self.n = 0
        self.src: list[int] = []
        self.lo: list[int] = []
        self.hi: list[int] = []
        self.rule: list[int] = []
        self.tgt: list[int] = []

    def new(self) -> int:
        self.n += 1
        return self.n - 1

    def add(self, s: int, lo: int, hi: int, rule: int, t: int) -> None:
        self.src.append(s)
        self.lo.append(lo)
        self.hi.append(hi)
        self.rule.append(rule)
        self.tgt.append(t)

    def csr(self) -> tuple[np.ndarray, ...]:
        """(ptr, lo, hi, rule, target): the edges grouped by source state, in insertion order."""
        src = np.array(self.src, np.int64)
        order = np.argsort(src, kind="stable")
        ptr = np.zeros(self.n + 1, np.int64)
        np.cumsum(np.bincount(src, minlength=self.n), out=ptr[1:])
        return (ptr, *(np.array(x, np.int64)[order] for x in (self.lo, self.hi, self.rule, self.tgt)))


@dataclass(frozen=True)
class _RuleAutomaton:
    """One rule's epsilon-free automaton with local state numbers; state 0 is the start.

    CSR arrays like :class:`Grammar`'s: ``final[s]``, edges ``ptr[s]..ptr[s+1]`` with ``lo``, ``hi``,
    ``rule`` (-1: byte edge) and ``target``; byte edges first, sorted by ``lo``.
    """

    final: np.ndarray
    ptr: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    rule: np.ndarray
    target: np.ndarray

    @property
    def n_states(self) -> int:
        return int(self.final.shape[0])


def _determinize_minimize(nfa: _NFA, start: int, end: int, max_states: int) -> _RuleAutomaton | None:
    """The minimal DFA (states in canonical BFS order) of the NFA from ``start`` to ``end``.

    None if the subset construction grows past ``max_states`` states.
    """
    ok, *arrays = _nfa_to_minimal_dfa(*(np.array(x, np.int64) for x in (nfa.src, nfa.lo, nfa.hi, nfa.rule, nfa.tgt)),
                                      nfa.n, start, end, max_states)
    return _RuleAutomaton(*arrays) if ok else None


@njit(cache=True, nogil=True)
def _nfa_to_minimal_dfa(src, lo, hi, rule, tgt, n, start, end, max_states):
    """One kernel call for a rule: NFA edge lists -> CSR -> :func:`_subset_dfa` -> :func:`minimal_dfa`, as int32 arrays."""
    order = np.argsort(src, kind="mergesort")
    ptr = np.zeros(n + 1, np.int64)
    for e in range(src.shape[0]):
        ptr[src[e] + 1] += 1
    for q in range(n):
        ptr[q + 1] += ptr[q]
    ok, final, dptr, dlo, dhi, drule, dtgt = _subset_dfa(ptr, lo[order], hi[order], rule[order], tgt[order],
                                                         start, end, max_states)
    if not ok:
        z = np.zeros(0, np.int32)
        return False, final, z, z, z, z, z
    final, dptr, dlo, dhi, drule, dtgt = minimal_dfa(final, dptr, dlo, dhi, drule, dtgt)
    return (True, final, dptr.astype(np.int32), dlo.astype(np.int32), dhi.astype(np.int32), drule.astype(np.int32),
            dtgt.astype(np.int32))


@njit(cache=True, nogil=True)
def _grown(a, need):
    if need <= a.shape[0]:
        return a
    out = np.empty(max(need, 2 * a.shape[0]), a.dtype)
    out[: a.shape[0]] = a
    return out


@njit(cache=True, nogil=True)
def _closure(seeds, ptr, rule, tgt, stamp, gen, stack, out):
    """Epsilon closure of ``seeds`` into ``out`` (unsorted); returns its size. ``stamp[q] == gen`` marks members."""
    k = 0
    sp = 0
    for q in seeds:
        if stamp[q] != gen:
            stamp[q] = gen
            out[k] = q
            k += 1
            stack[sp] = q
            sp += 1
    while sp > 0:
        sp -= 1
        q = stack[sp]
        for e in range(ptr[q], ptr[q + 1]):
            if rule[e] == -2:
                t = tgt[e]
                if stamp[t] != gen:
                    stamp[t] = gen
                    out[k] = t
                    k += 1
                    stack[sp] = t
                    sp += 1
    return k


@njit(cache=True, nogil=True)
def _intern(members, pool, n_pool, offs, n_sets, table, hashes):
    """The id of the state set ``members`` (sorted), adding it if new; returns the id and the grown stores."""
    k = members.shape[0]
    h = np.int64(1469598103934665603)
    for q in members:
        h = (h ^ q) * np.int64(1099511628211)
    mask = table.shape[0] - 1
    j = h & mask
    while table[j] >= 0:
        c = table[j]
        if hashes[c] == h and offs[c + 1] - offs[c] == k:
            same = True
            base = offs[c]
            for i in range(k):
                if pool[base + i] != members[i]:
                    same = False
                    break
            if same:
                return c, pool, n_pool, offs, n_sets, table, hashes
        j = (j + 1) & mask
    c = n_sets
    pool = _grown(pool, n_pool + k)
    pool[n_pool:n_pool + k] = members
    n_pool += k
    offs = _grown(offs, c + 2)
    offs[c + 1] = n_pool
    hashes = _grown(hashes, c + 1)
    hashes[c] = h
    n_sets += 1
    table[j] = c
    if 2 * n_sets > table.shape[0]:
        table = np.full(2 * table.shape[0], -1, np.int64)
        mask = table.shape[0] - 1
        for x in range(n_sets):
            j = hashes[x] & mask
            while table[j] >= 0:
                j = (j + 1) & mask
            table[j] = x
    return c, pool, n_pool, offs, n_sets, table, hashes


@njit(cache=True, nogil=True)
def _subset_dfa(nptr, nlo, nhi, nrule, ntgt, start, end, max_states):
    """Subset construction over byte ranges (cut at every range boundary) and rule references.

    Returns (ok, final, ptr, lo, hi, rule, target); ok is False past ``max_states`` states. Each
    state's byte edges come first, sorted and with adjacent ranges to one target merged, then one
    edge per referenced rule in rule order.
    """
    n_nfa = nptr.shape[0] - 1
    n_edges = nlo.shape[0]
    stamp = np.zeros(n_nfa, np.int64)
    gen = 1
    stack = np.empty(n_nfa, np.int64)
    buf = np.empty(n_nfa, np.int64)
    pool = np.empty(1024, np.int64)
    offs = np.zeros(256, np.int64)
    hashes = np.empty(256, np.int64)
    table = np.full(512, -1, np.int64)
    n_pool = 0
    n_sets = 0
    blo = np.empty(n_edges, np.int64)
    bhi = np.empty(n_edges, np.int64)
    btg = np.empty(n_edges, np.int64)
    rr = np.empty(n_edges, np.int64)
    rt = np.empty(n_edges, np.int64)
    cut_buf = np.empty(2 * n_edges, np.int64)
    off_buf = np.empty(2 * n_edges + 1, np.int64)
    fill_buf = np.empty(2 * n_edges, np.int64)
    k0 = np.empty(n_edges, np.int64)
    k1 = np.empty(n_edges, np.int64)
    bucket = np.empty(64, np.int64)
    final = np.zeros(256, np.uint8)
    ptr = np.zeros(257, np.int64)
    olo = np.empty(1024, np.int64)
    ohi = np.empty(1024, np.int64)
    orule = np.empty(1024, np.int64)
    otgt = np.empty(1024, np.int64)
    n_out = 0
    seed = np.empty(1, np.int64)
    seed[0] = start
    k = _closure(seed, nptr, nrule, ntgt, stamp, gen, stack, buf)
    buf[:k].sort()
    c, pool, n_pool, offs, n_sets, table, hashes = _intern(buf[:k], pool, n_pool, offs, n_sets, table, hashes)
    i = 0
    while i < n_sets:
        members = pool[offs[i]:offs[i + 1]]  # read before any _intern below may grow the pool
        final = _grown(final, i + 1)
        j = np.searchsorted(members, end)
        final[i] = 1 if j < members.shape[0] and members[j] == end else 0
        nb = 0
        nr = 0
        for q in members:
            for e in range(nptr[q], nptr[q + 1]):
                if nrule[e] == -1:
                    blo[nb] = nlo[e]
                    bhi[nb] = nhi[e]
                    btg[nb] = ntgt[e]
                    nb += 1
                elif nrule[e] >= 0:
                    rr[nr] = nrule[e]
                    rt[nr] = ntgt[e]
                    nr += 1
        first_byte_edge = n_out
        if nb > 0:
            # elementary intervals between the sorted, distinct range boundaries (scratch arrays, no allocation)
            for x in range(nb):
                cut_buf[2 * x] = blo[x]
                cut_buf[2 * x + 1] = bhi[x] + 1
            cut_buf[:2 * nb].sort()
            nc = 0
            for x in range(2 * nb):
                if nc == 0 or cut_buf[x] != cut_buf[nc - 1]:
                    cut_buf[nc] = cut_buf[x]
                    nc += 1
            cuts = cut_buf[:nc]
            off = off_buf[:nc + 1]
            off[:] = 0
            for x in range(nb):
                k0[x] = np.searchsorted(cuts, blo[x])
                k1[x] = np.searchsorted(cuts, bhi[x] + 1)
                for kk in range(k0[x], k1[x]):
                    off[kk + 1] += 1
            for kk in range(nc):
                off[kk + 1] += off[kk]
            bucket = _grown(bucket, off[nc])
            fill = fill_buf[:nc]
            fill[:] = off[:nc]
            for x in range(nb):
                for kk in range(k0[x], k1[x]):
                    bucket[fill[kk]] = btg[x]
                    fill[kk] += 1
            for kk in range(nc - 1):
                if off[kk + 1] == off[kk]:
                    continue
                gen += 1
                k = _closure(bucket[off[kk]:off[kk + 1]], nptr, nrule, ntgt, stamp, gen, stack, buf)
                buf[:k].sort()
                c, pool, n_pool, offs, n_sets, table, hashes = _intern(buf[:k], pool, n_pool, offs, n_sets, table, hashes)
                if n_sets > max_states:
                    return False, final[:0], ptr[:0], olo[:0], ohi[:0], orule[:0], otgt[:0]
                if n_out > first_byte_edge and otgt[n_out - 1] == c and ohi[n_out - 1] + 1 == cuts[kk]:
                    ohi[n_out - 1] = cuts[kk + 1] - 1
                    continue
                olo = _grown(olo, n_out + 1)
                ohi = _grown(ohi, n_out + 1)
                orule = _grown(orule, n_out + 1)
                otgt = _grown(otgt, n_out + 1)
                olo[n_out] = cuts[kk]
                ohi[n_out] = cuts[kk + 1] - 1
                orule[n_out] = -1
                otgt[n_out] = c
                n_out += 1
        if nr > 0:
            # insertion sort of the (rule, target) pairs by rule: states call few rules
            for x in range(1, nr):
                r_x, t_x = rr[x], rt[x]
                y = x - 1
                while y >= 0 and rr[y] > r_x:
                    rr[y + 1] = rr[y]
                    rt[y + 1] = rt[y]
                    y -= 1
                rr[y + 1] = r_x
                rt[y + 1] = t_x
            a = 0
            while a < nr:
                b = a
                while b < nr and rr[b] == rr[a]:
                    b += 1
                gen += 1
                k = _closure(rt[a:b], nptr, nrule, ntgt, stamp, gen, stack, buf)
                buf[:k].sort()
                c, pool, n_pool, offs, n_sets, table, hashes = _intern(buf[:k], pool, n_pool, offs, n_sets, table, hashes)
                if n_sets > max_states:
                    return False, final[:0], ptr[:0], olo[:0], ohi[:0], orule[:0], otgt[:0]
                olo = _grown(olo, n_out + 1)
                ohi = _grown(ohi, n_out + 1)
                orule = _grown(orule, n_out + 1)
                otgt = _grown(otgt, n_out + 1)
                olo[n_out] = 0
                ohi[n_out] = 0
                orule[n_out] = rr[a]
                otgt[n_out] = c
                n_out += 1
                a = b
        ptr = _grown(ptr, i + 2)
        ptr[i + 1] = n_out
        i += 1
    return True, final[:n_sets], ptr[:n_sets + 1], olo[:n_out], ohi[:n_out], orule[:n_out], otgt[:n_out]


@njit(cache=True, nogil=True)
def minimal_dfa(final, ptr, lo, hi, rule, tgt):
    """The minimal automaton of a DFA in CSR arrays (edges ``ptr[s]..ptr[s+1]``, range edges
    ``rule == -1`` sorted by ``lo``, then rule edges; ranges may be bytes or code points).

    Trim (drop states that reach no final state, keeping the start), merge equivalent states
    (:func:`_refine_partial_dfa`), and number the result in BFS order from the start.

    The BFS order over byte-sorted edges makes the numbering canonical: equal languages give
    equal arrays.
    """
    n = final.shape[0]
    m = lo.shape[0]
    # live states: those that reach a final state
    in_ptr = np.zeros(n + 1, np.int64)
    for e in range(m):
        in_ptr[tgt[e] + 1] += 1
    for q in range(n):
        in_ptr[q + 1] += in_ptr[q]
    fill = in_ptr[:-1].copy()
    src_of = np.empty(m, np.int64)
    for q in range(n):
        for e in range(ptr[q], ptr[q + 1]):
            src_of[fill[tgt[e]]] = q
            fill[tgt[e]] += 1
    live = np.zeros(n, np.bool_)
    stack = np.empty(n, np.int64)
    sp = 0
    for q in range(n):
        if final[q]:
            live[q] = True
            stack[sp] = q
            sp += 1
    while sp > 0:
        sp -= 1
        q = stack[sp]
        for j in range(in_ptr[q], in_ptr[q + 1]):
            p = src_of[j]
            if not live[p]:
                live[p] = True
                stack[sp] = p
                sp += 1
    live[0] = True
    new = np.full(n, -1, np.int64)
    n_live = 0
    for q in range(n):
        if live[q]:
            new[q] = n_live
            n_live += 1
    # transitions between live states, one per (state, symbol): byte ranges cut at every boundary
    n_cut = 0
    cuts_all = np.empty(2 * m, np.int64)
    for e in range(m):
        if rule[e] == -1:
            cuts_all[n_cut] = lo[e]
            cuts_all[n_cut + 1] = hi[e] + 1
            n_cut += 2
    cuts = np.unique(cuts_all[:n_cut])
    n_t = 0
    for q in range(n):
        if live[q]:
            for e in range(ptr[q], ptr[q + 1]):
                if live[tgt[e]]:
                    if rule[e] == -1:
                        n_t += np.searchsorted(cuts, hi[e] + 1) - np.searchsorted(cuts, lo[e])
                    else:
                        n_t += 1
    tail = np.empty(n_t, np.int64)
    label = np.empty(n_t, np.int64)
    head = np.empty(n_t, np.int64)
    fin = np.zeros(n_live, np.bool_)
    x = 0
    for q in range(n):
        if live[q]:
            fin[new[q]] = final[q] != 0
            for e in range(ptr[q], ptr[q + 1]):
                if live[tgt[e]]:
                    if rule[e] == -1:
                        for kk in range(np.searchsorted(cuts, lo[e]), np.searchsorted(cuts, hi[e] + 1)):
                            tail[x] = new[q]
                            label[x] = kk
                            head[x] = new[tgt[e]]
                            x += 1
                    else:
                        tail[x] = new[q]
                        label[x] = cuts.shape[0] + rule[e]
                        head[x] = new[tgt[e]]
                        x += 1
    block = _refine_partial_dfa(n_live, tail, label, head, fin)
    # BFS over blocks from the start's, reading each block's first state's edges
    rep = np.full(n_live, -1, np.int64)
    old_of = np.empty(n_live, np.int64)
    for q in range(n):
        if live[q]:
            old_of[new[q]] = q
    for q in range(n_live):
        if rep[block[q]] < 0:
            rep[block[q]] = q
    number = np.full(n_live, -1, np.int64)
    order = np.empty(n_live, np.int64)
    number[block[0]] = 0
    order[0] = block[0]
    n_out_states = 1
    out_final = np.zeros(n_live, np.uint8)
    out_ptr = np.zeros(n_live + 1, np.int64)
    out_lo = np.empty(m, np.int64)
    out_hi = np.empty(m, np.int64)
    out_rule = np.empty(m, np.int64)
    out_tgt = np.empty(m, np.int64)
    n_e = 0
    i = 0
    while i < n_out_states:
        q = old_of[rep[order[i]]]
        out_final[i] = final[q]
        first = n_e
        for e in range(ptr[q], ptr[q + 1]):
            if not live[tgt[e]]:
                continue
            tb = block[new[tgt[e]]]
            if number[tb] < 0:
                number[tb] = n_out_states
                order[n_out_states] = tb
                n_out_states += 1
            t = number[tb]
            if rule[e] == -1 and n_e > first and out_rule[n_e - 1] == -1 and out_tgt[n_e - 1] == t \
                    and out_hi[n_e - 1] + 1 == lo[e]:
                out_hi[n_e - 1] = hi[e]
                continue
            out_lo[n_e] = lo[e]
            out_hi[n_e] = hi[e]
            out_rule[n_e] = rule[e]
            out_tgt[n_e] = t
            n_e += 1
        out_ptr[i + 1] = n_e
        i += 1
    return (out_final[:n_out_states], out_ptr[:n_out_states + 1], out_lo[:n_e], out_hi[:n_e],
            out_rule[:n_e], out_tgt[:n_e])


@njit(cache=True, nogil=True)
def _mark(e, elems, loc, set_of, first, marked, touched, n_touched):
    """Move element e to the marked front of its set; record the set as touched."""
    s = set_of[e]
    i = loc[e]
    j = first[s] + marked[s]
    elems[i] = elems[j]
    loc[elems[i]] = i
    elems[j] = e
    loc[e] = j
    if marked[s] == 0:
        touched[n_touched] = s
        n_touched += 1
    marked[s] += 1
    return n_touched


@njit(cache=True, nogil=True)
def _split(n_sets, elems, set_of, first, past, marked, touched, n_touched):
    """Split every touched set into its marked and unmarked parts; the smaller part gets the new id."""
    while n_touched > 0:
        n_touched -= 1
        s = touched[n_touched]
        j = first[s] + marked[s]
        if j == past[s]:
            marked[s] = 0
            continue
        if marked[s] <= past[s] - j:
            first[n_sets] = first[s]
            past[n_sets] = j
            first[s] = j
        else:
            past[n_sets] = past[s]
            first[n_sets] = j
            past[s] = j
        for i in range(first[n_sets], past[n_sets]):
            set_of[elems[i]] = n_sets
        marked[s] = 0
        marked[n_sets] = 0
        n_sets += 1
    return n_sets


@njit(cache=True, nogil=True)
def _refine_partial_dfa(n, tail, label, head, final):
    """Valmari and Lehtinen's minimization of a partial DFA (2008): the block of every state.

    Two refinable partitions, of the states ("blocks") and of the transitions ("cords", grouped by
    label), split each other: a cord splits the blocks by which states have a transition in it, and a
    new block splits the cords by which transitions enter it. Each element moves O(log n) times.
    """
    m = tail.shape[0]
    size = max(n, m) + 1
    marked = np.zeros(size, np.int64)
    touched = np.zeros(size, np.int64)
    # blocks
    b_elems = np.arange(n)
    b_loc = np.arange(n)
    b_set = np.zeros(n, np.int64)
    b_first = np.zeros(n + 1, np.int64)
    b_past = np.zeros(n + 1, np.int64)
    b_past[0] = n
    n_blocks = 1 if n > 0 else 0
    n_touched = 0
    for q in range(n):
        if final[q]:
            n_touched = _mark(q, b_elems, b_loc, b_set, b_first, marked, touched, n_touched)
    n_blocks = _split(n_blocks, b_elems, b_set, b_first, b_past, marked, touched, n_touched)
    if m == 0:
        return b_set
    # cords: transitions sorted by label, one set per label
    c_elems = np.argsort(label, kind="mergesort")
    c_loc = np.empty(m, np.int64)
    c_set = np.empty(m, np.int64)
    c_first = np.zeros(m + 1, np.int64)
    c_past = np.zeros(m + 1, np.int64)
    n_cords = 0
    for i in range(m):
        t = c_elems[i]
        if i > 0 and label[t] != label[c_elems[i - 1]]:
            c_past[n_cords] = i
            n_cords += 1
            c_first[n_cords] = i
        c_set[t] = n_cords
        c_loc[t] = i
    c_past[n_cords] = m
    n_cords += 1
    # incoming transitions of every state
    in_ptr = np.zeros(n + 1, np.int64)
    for t in range(m):
        in_ptr[head[t] + 1] += 1
    for q in range(n):
        in_ptr[q + 1] += in_ptr[q]
    fill = in_ptr[:-1].copy()
    incoming = np.empty(m, np.int64)
    for t in range(m):
        incoming[fill[head[t]]] = t
        fill[head[t]] += 1
    b = 1
    c = 0
    while c < n_cords:
        n_touched = 0
        for i in range(c_first[c], c_past[c]):
            n_touched = _mark(tail[c_elems[i]], b_elems, b_loc, b_set, b_first, marked, touched, n_touched)
        n_blocks = _split(n_blocks, b_elems, b_set, b_first, b_past, marked, touched, n_touched)
        c += 1
        while b < n_blocks:
            n_touched = 0
            for i in range(b_first[b], b_past[b]):
                q = b_elems[i]
                for j in range(in_ptr[q], in_ptr[q + 1]):
                    n_touched = _mark(incoming[j], c_elems, c_loc, c_set, c_first, marked, touched, n_touched)
            n_cords = _split(n_cords, c_elems, c_set, c_first, c_past, marked, touched, n_touched)
            b += 1
    return b_set


def _eps_free(nfa: _NFA, start: int, end: int) -> _RuleAutomaton:
    """Epsilon removal without determinization (the fallback when subsets blow up), trimmed."""
    ptr, lo, hi, rule, tgt = (x.tolist() for x in nfa.csr())

    def closure(s: int) -> list[int]:
        seen = {s}
        stack = [s]
        while stack:
            q = stack.pop()
            for e in range(ptr[q], ptr[q + 1]):
                if rule[e] == _EPS and tgt[e] not in seen:
                    seen.add(tgt[e])
                    stack.append(tgt[e])
        return sorted(seen)

    reach = {start: 0}
    order = [start]
    final: list[bool] = []
    edges: list[list[tuple[int, int, int, int]]] = []
    i = 0
    while i < len(order):
        clo = closure(order[i])
        i += 1
        final.append(end in clo)
        out = set()
        for c in clo:
            for e in range(ptr[c], ptr[c + 1]):
                if rule[e] != _EPS:
                    if tgt[e] not in reach:
                        reach[tgt[e]] = len(order)
                        order.append(tgt[e])
                    out.add((lo[e], hi[e], rule[e], reach[tgt[e]]))
        edges.append(sorted(e for e in out if e[2] == -1) + sorted(e for e in out if e[2] != -1))
    # Trim: keep the start and the states from which a final state is reachable.
    n = len(final)
    rev: list[list[int]] = [[] for _ in range(n)]
    for s in range(n):
        for *_, t in edges[s]:
            rev[t].append(s)
    live = {s for s in range(n) if final[s]}
    stack = list(live)
    while stack:
        t = stack.pop()
        for s in rev[t]:
            if s not in live:
                live.add(s)
                stack.append(s)
    live.add(0)
    keep = sorted(live)
    new = {s: i for i, s in enumerate(keep)}
    kept = [[(a, b, r, new[t]) for a, b, r, t in edges[s] if t in live] for s in keep]
    flat = [e for es in kept for e in es]
    cols = list(zip(*flat)) if flat else [(), (), (), ()]
    return _RuleAutomaton(
        np.array([final[s] for s in keep], np.uint8),
        np.array([0] + list(np.cumsum([len(es) for es in kept])), np.int32),
        *(np.array(c, np.int32) for c in cols),
    )


# ----------------------------------------------------------------------------------------------
# The grammar
# ----------------------------------------------------------------------------------------------


@dataclass
class Grammar:
    """A compiled grammar: rule expressions plus their automata packed in flat arrays."""

    rule_names: list[str]
    rule_exprs: list[Expr]
    root: int
    rule_start: np.ndarray
    rule_nullable: np.ndarray
    state_rule: np.ndarray
    state_final: np.ndarray
    edge_ptr: np.ndarray
    edge_lo: np.ndarray
    edge_hi: np.ndarray
    edge_rule: np.ndarray
    edge_target: np.ndarray
    special_tokens: list[str] = field(default_factory=list)

    @property
    def n_rules(self) -> int:
        return len(self.rule_names)

    @property
    def n_states(self) -> int:
        return int(self.state_rule.shape[0])

    def rule_id(self, name: str) -> int:
        try:
            return self.rule_names.index(name)
        except ValueError:
            raise GrammarError(f"no rule named {name!r}") from None

    def to_ebnf(self) -> str:
        """The grammar as readable EBNF (GBNF dialect), from the rule expressions."""
        lines = []
        order = [self.root] + [r for r in range(self.n_rules) if r != self.root]
        for r in order:
            aux: list[str] = [self.rule_names[r]]  # owner name, then helper rules for automata
            lines.append(f"{self.rule_names[r]} ::= {format_expr(self.rule_exprs[r], aux=aux)}")
            lines.extend(aux[1:])
        return "\n".join(lines) + "\n"

    def dump_automata(self) -> str:
        """The automata, one line per state: ``rule.state [final] edges``, for debugging."""
        out = []
        for s in range(self.n_states):
            r = int(self.state_rule[s])
            parts = []
            for e in range(self.edge_ptr[s], self.edge_ptr[s + 1]):
                if self.edge_rule[e] < 0:
                    parts.append(f"{_fmt_byte_range(int(self.edge_lo[e]), int(self.edge_hi[e]))}->{self.edge_target[e]}")
                else:
                    parts.append(f"<{self.rule_names[self.edge_rule[e]]}>->{self.edge_target[e]}")
            mark = "*" if self.state_final[s] else " "
            start = "start " if self.rule_start[r] == s else ""
            out.append(f"{self.rule_names[r]}.{s}{mark} {start}{' '.join(parts)}")
        return "\n".join(out) + "\n"

    def rule_automaton_key(self, r: int) -> bytes:
        """A canonical byte string of rule r's automaton (local numbering), for cross-grammar caching.

        Rule references are included by id, so the key is only meaningful together with the keys
        of the referenced rules; the mask cache combines them.
        """
        start = int(self.rule_start[r])
        states = np.nonzero(self.state_rule == r)[0]
        parts = []
        for s in states:
            lo, hi = self.edge_ptr[s], self.edge_ptr[s + 1]
            parts.append(
                np.concatenate(
                    [
                        [s - start, self.state_final[s], hi - lo],
                        self.edge_lo[lo:hi],
                        self.edge_hi[lo:hi],
                        self.edge_rule[lo:hi],
                        self.edge_target[lo:hi] - start,
                    ]
                ).astype(np.int64).tobytes()
            )
        return b"".join(parts)


def _fmt_byte(b: int) -> str:
    if b > 255:
        return f"<special {b - 256}>"
    c = chr(b)
    if b < 0x80 and c.isprintable() and c not in '"\\[]-^':
        return c
    return f"\\x{b:02X}"


def _fmt_byte_range(lo: int, hi: int) -> str:
    return f"[{_fmt_byte(lo)}]" if lo == hi else f"[{_fmt_byte(lo)}-{_fmt_byte(hi)}]"


def _fmt_cp(c: int) -> str:
    ch = chr(c)
    if ch in '"\\[]-^':
        return "\\" + ch
    if ch.isprintable() and c != 0x20 or ch == " ":
        return ch
    return f"\\x{c:02X}" if c < 0x100 else (f"\\u{c:04X}" if c < 0x10000 else f"\\U{c:08X}")


_EMPTY_CLASS = "[^\\x00-\\U0010FFFF]"  # matches nothing


def format_expr(e: Expr, top: bool = True, aux: list[str] | None = None) -> str:
    """One expression in GBNF syntax.

    ``aux`` = [owner rule name, ...]: automata are printed as helper rules appended to it (one
    right-linear rule per state, named ``<owner>_a<k>_<state>``); without it, as a compact block.
    """
    if isinstance(e, Lit):
        try:
            s = e.data.decode("utf-8")
            body = "".join(
                "\\" + ch if ch in '"\\' else (ch if ch.isprintable() else _fmt_cp(ord(ch)))
                for ch in s
            )
        except UnicodeDecodeError:
            body = "".join(f"\\x{b:02X}" for b in e.data)
        return f'"{body}"'
    if isinstance(e, ByteClass):
        return "[" + "".join(_fmt_byte(lo) if lo == hi else f"{_fmt_byte(lo)}-{_fmt_byte(hi)}" for lo, hi in e.ranges) + "]"
    if isinstance(e, CharClass):
        rs = e.ranges
        if len(rs) > 3 and complement_ranges(rs, MAX_CODE_POINT):
            neg = complement_ranges(rs, MAX_CODE_POINT)
            if len(neg) < len(rs):
                return "[^" + "".join(_fmt_cp(lo) if lo == hi else f"{_fmt_cp(lo)}-{_fmt_cp(hi)}" for lo, hi in neg) + "]"
        return "[" + "".join(_fmt_cp(lo) if lo == hi else f"{_fmt_cp(lo)}-{_fmt_cp(hi)}" for lo, hi in rs) + "]"
    if isinstance(e, Ref):
        return e.name
    if isinstance(e, Special):
        return e.name if e.name.startswith("<") and e.name.endswith(">") else f"<{e.name}>"
    if isinstance(e, Seq):
        if not e.items:
            return '""'
        s = " ".join(format_expr(x, False, aux) for x in e.items)
        return s if top else f"({s})"
    if isinstance(e, Alt):
        if not e.options:
            return "[^\\x00-\\U0010FFFF]"  # matches nothing
        s = " | ".join(format_expr(x, True, aux) for x in e.options)
        return s if top else f"({s})"
    if isinstance(e, Repeat):
        inner = format_expr(e.body, False, aux)
        if isinstance(e.body, Repeat):
            inner = f"({inner})"
        if (e.lo, e.hi) == (0, None):
            return inner + "*"
        if (e.lo, e.hi) == (1, None):
            return inner + "+"
        if (e.lo, e.hi) == (0, 1):
            return inner + "?"
        if e.hi is None:
            return f"{inner}{{{e.lo},}}"
        if e.lo == e.hi:
            return f"{inner}{{{e.lo}}}"
        return f"{inner}{{{e.lo},{e.hi}}}"
    if isinstance(e, Automaton) and aux is not None:
        names = [f"{aux[0]}_a{len(aux)}_{q}" for q in range(e.n_states)]
        aux.append("")  # reserve the slot so nested automata get other names
        slot = len(aux) - 1
        rules = []
        for q in range(e.n_states):
            arms = [f"{format_expr(label, False, aux)} {names[t]}".lstrip() for p, label, t in e.edges if p == q]
            if q in e.finals:
                arms.append('""')
            rules.append(f"{names[q]} ::= " + (" | ".join(arms) or _EMPTY_CLASS))
        aux[slot] = "\n".join(rules)
        return names[0]
    if isinstance(e, Automaton):
        # Without a rule list to extend: a bracketed block "state: label -> target | ...", finals '*'.
        states = []
        for q in range(e.n_states):
            arms = [f"{format_expr(label, True)} -> {t}" for p, label, t in e.edges if p == q]
            mark = "*" if q in e.finals else ""
            states.append(f"{q}{mark}: {' | '.join(arms) or '()'}")
        return "automaton{ " + "; ".join(states) + " }"
    raise TypeError(f"not a grammar expression: {e!r}")


class GrammarBuilder:
    """Collects named rules and builds a :class:`Grammar`.

    >>> b = GrammarBuilder()
    >>> b.rule("root", seq(lit("a"), star(Ref("root"))))
    >>> g = b.build("root")
    """

    def __init__(self, limits: GrammarLimits | None = None) -> None:
        self.rules: dict[str, Expr] = {}
        self.limits = limits or GrammarLimits()
        self._fresh = 0

    def rule(self, name: str, body: Expr) -> str:
        """Define rule ``name`` (redefinition is an error); returns the name."""
        if name in self.rules:
            raise GrammarError(f"rule {name!r} is defined twice")
        self.rules[name] = body
        return name

    def fresh(self, prefix: str) -> str:
        """A rule name not used yet, derived from ``prefix``."""
        while True:
            self._fresh += 1
            name = f"{prefix}_{self._fresh}"
            if name not in self.rules:
                return name

    def build(self, root: str = "root") -> Grammar:
        if root not in self.rules:
            raise GrammarError(f"the start rule {root!r} is not defined")
        # Rules in BFS order from the root, following the references each automaton makes.
        names = [root]
        ids = {root: 0}
        bodies = []
        i = 0
        while i < len(names):
            body = _rule_automaton(self.rules[names[i]], self.limits)
            for r in body.refs:
                if r not in ids:
                    if r not in self.rules:
                        raise GrammarError(f"rule {names[i]!r} refers to undefined rule {r!r}")
                    ids[r] = len(names)
                    names.append(r)
            bodies.append(body)
            i += 1
        specials: list[str] = []
        autos = []
        for body in bodies:
            for name in body.specials:
                if name not in specials:
                    specials.append(name)
            autos.append(body.bind([ids[r] for r in body.refs], [specials.index(x) for x in body.specials]))
        g = _pack(names, [self.rules[n] for n in names], ids[root], autos)
        g.special_tokens = specials
        return g


@dataclass(frozen=True)
class _RuleBody:
    """A rule's minimal automaton with references and specials numbered locally (``refs``, ``specials``)."""

    auto: "_RuleAutomaton"
    refs: tuple[str, ...]
    specials: tuple[str, ...]

    def bind(self, rule_ids: list[int], special_ids: list[int]) -> "_RuleAutomaton":
        """The automaton with local reference/special numbers replaced by the grammar's."""
        a = self.auto
        if rule_ids == list(range(len(rule_ids))) and special_ids == list(range(len(special_ids))):
            return a
        rule, lo, hi = a.rule, a.lo, a.hi
        if rule_ids:
            rule = np.where(rule >= 0, np.array(rule_ids, np.int32)[np.maximum(rule, 0)], rule).astype(np.int32)
        if special_ids:
            sym = (a.rule < 0) & (lo >= 256)
            lo = np.where(sym, 256 + np.array(special_ids, np.int32)[np.maximum(lo - 256, 0)], lo).astype(np.int32)
            hi = np.where(sym, lo, hi).astype(np.int32)
        target = a.target
        if len(special_ids) > 1:  # keep each state's byte edges sorted by symbol
            rule, target = rule.copy(), target.copy()
            for s in range(a.n_states):
                e0, e1 = a.ptr[s], a.ptr[s + 1]
                nb = e0 + int((a.rule[e0:e1] < 0).sum())
                order = e0 + np.argsort(lo[e0:nb], kind="stable")
                lo[e0:nb], hi[e0:nb], rule[e0:nb], target[e0:nb] = lo[order], hi[order], rule[order], target[order]
        return _RuleAutomaton(a.final, a.ptr, lo, hi, rule, target)


# Rule bodies by expression, shared by every grammar built in this process: the JSON Schema
# frontend emits the same bodies (JSON values, whitespace, strings, escapes, counters) again and
# again, and their determinization and minimization dominate a compile.
_BODY_CACHE: "OrderedDict[_BodyKey, _RuleBody]" = OrderedDict()
_BODY_CACHE_LOCK = threading.Lock()
_BODY_CACHE_STATES = [0]
BODY_CACHE_MAX_STATES = 500_000  # about 25 MB of automata


class _BodyKey:
    """A rule body and the limits it was built under, hashed once (expression hashes recurse)."""

    __slots__ = ("expr", "limits", "_hash")

    def __init__(self, expr: Expr, limits: GrammarLimits) -> None:
        self.expr = expr
        self.limits = (limits.max_nfa_states, limits.max_dfa_states)
        self._hash = hash((expr, self.limits))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _BodyKey) and self._hash == other._hash and self.limits == other.limits
                and self.expr == other.expr)


def _rule_automaton(e: Expr, limits: GrammarLimits) -> _RuleBody:
    key = _BodyKey(e, limits)
    with _BODY_CACHE_LOCK:
        hit = _BODY_CACHE.get(key)
        if hit is not None:
            _BODY_CACHE.move_to_end(key)
            return hit
    low = _Lowering(limits)
    start = low.nfa.new()
    end = low.lower(e, start)
    auto = _determinize_minimize(low.nfa, start, end, limits.max_dfa_states)
    if auto is None:
        auto = _eps_free(low.nfa, start, end)
    body = _RuleBody(auto, tuple(low.refs), tuple(low.specials))
    with _BODY_CACHE_LOCK:
        if key not in _BODY_CACHE:
            _BODY_CACHE[key] = body
            _BODY_CACHE_STATES[0] += auto.n_states
            while _BODY_CACHE_STATES[0] > BODY_CACHE_MAX_STATES and len(_BODY_CACHE) > 1:
                _, old = _BODY_CACHE.popitem(last=False)
                _BODY_CACHE_STATES[0] -= old.auto.n_states
    return body


def _pack(names: list[str], exprs: list[Expr], root: int, autos: Sequence[_RuleAutomaton]) -> Grammar:
    sizes = np.array([a.n_states for a in autos], np.int64)
    base = np.concatenate([[0], np.cumsum(sizes)])
    n_edges = np.array([a.lo.shape[0] for a in autos], np.int64)
    edge_base = np.concatenate([[0], np.cumsum(n_edges)])
    cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)  # noqa: E731
    g = Grammar(
        rule_names=list(names),
        rule_exprs=list(exprs),
        root=root,
        rule_start=base[:-1].astype(np.int32),
        rule_nullable=np.zeros(len(names), np.uint8),
        state_rule=np.repeat(np.arange(len(autos), dtype=np.int32), sizes),
        state_final=np.concatenate([a.final for a in autos]).astype(np.uint8) if autos else np.zeros(0, np.uint8),
        edge_ptr=np.concatenate([[0]] + [a.ptr[1:] + edge_base[r] for r, a in enumerate(autos)]).astype(np.int32),
        edge_lo=cat([a.lo for a in autos]),
        edge_hi=cat([a.hi for a in autos]),
        edge_rule=cat([a.rule for a in autos]),
        edge_target=cat([a.target + base[r] for r, a in enumerate(autos)]),
    )
    g.rule_nullable[:] = _nullable(g)
    return g


def derivable_rules(g: Grammar, read_bytes: bool) -> np.ndarray:
    """Which rules derive a string, as uint8 flags: with ``read_bytes`` any string (productive
    rules), without it the empty string (nullable rules). A fixpoint over the automata."""
    return _derivable(g.rule_start, g.state_final, g.edge_ptr, g.edge_rule, g.edge_target, read_bytes)


def _nullable(g: Grammar) -> np.ndarray:
    return derivable_rules(g, False)


@njit(cache=True, nogil=True)
def _derivable(rule_start, state_final, edge_ptr, edge_rule, edge_target, read_bytes):
    n_rules = rule_start.shape[0]
    ok = np.zeros(n_rules, np.uint8)
    seen = np.zeros(state_final.shape[0], np.int64)
    stack = np.empty(state_final.shape[0], np.int64)
    gen = 0
    changed = True
    while changed:
        changed = False
        for r in range(n_rules):
            if ok[r]:
                continue
            gen += 1
            seen[rule_start[r]] = gen
            stack[0] = rule_start[r]
            sp = 1
            while sp > 0:
                sp -= 1
                s = stack[sp]
                if state_final[s]:
                    ok[r] = 1
                    changed = True
                    break
                for e in range(edge_ptr[s], edge_ptr[s + 1]):
                    ref = edge_rule[e]
                    if (ref < 0 and read_bytes) or (ref >= 0 and ok[ref]):
                        t = edge_target[e]
                        if seen[t] != gen:
                            seen[t] = gen
                            stack[sp] = t
                            sp += 1
    return ok
