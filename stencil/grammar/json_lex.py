"""Lexical automata for the JSON frontends: code-point DFAs, JSON string spellings, number languages.

The JSON Schema frontend needs a few regular-language operations that an expression tree cannot
express directly: intersecting a ``pattern`` with a ``format`` and with ``minLength``/``maxLength``,
complementing a language (``not``), and comparing decimal numerals with bounds. They run here on
small deterministic automata over *code points* (:class:`CharDFA`), and the result is handed back
to the IR as an :class:`~stencil.grammar.ir.Automaton` whose edges read the JSON spellings of
character classes.

JSON spelling. A decoded string value ``w`` is written in a JSON text as the concatenation of one
spelling per character: the raw UTF-8 character (not for ``"``, ``\\`` or controls below U+0020),
a short escape (``\\" \\\\ \\/ \\b \\f \\n \\r \\t``), ``\\uXXXX`` (hex digits in either case) for BMP
characters, or a surrogate pair ``\\uD8xx\\uDCxx`` for astral ones. Spellings of different
characters never share a prefix that ends one of them, so substituting each class by its spellings
maps a language of decoded strings exactly onto the language of their JSON bodies.

Numbers. Comparisons with bounds and ``multipleOf`` are exact on positional numerals
(``-?(0|[1-9][0-9]*)(\\.[0-9]+)?``). Exponent notation cannot be compared with a bound by a finite
automaton in general (``1`` followed by k zeros then ``e-k``), so under constraints we accept only
exponent spellings that are provably inside the bounds: a normalized mantissa ``[1-9](\\.[0-9]+)?``
whose whole decade ``[10^E, 10^(E+1))`` lies within them (this covers what ``json.dumps`` writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Callable, Iterable

import numpy as np

from stencil.grammar.ir import (
    minimal_dfa,
    EMPTY,
    MAX_CODE_POINT,
    NOTHING,
    Alt,
    Automaton,
    ByteClass,
    CharClass,
    Expr,
    Lit,
    Ref,
    Repeat,
    Seq,
    Special,
    alt,
    complement_ranges,
    lit,
    normalize_ranges,
    opt,
    seq,
    star,
)

Ranges = tuple[tuple[int, int], ...]

ALL: Ranges = ((0, MAX_CODE_POINT),)
SURROGATES: Ranges = ((0xD800, 0xDFFF),)


class LexLimit(Exception):
    """An automaton operation would exceed its size budget (the caller turns this into a SchemaError)."""


# ----------------------------------------------------------------------------------------------
# Range helpers
# ----------------------------------------------------------------------------------------------


def intersect_ranges(a: Ranges, b: Ranges) -> Ranges:
    """Inclusive ranges covered by both ``a`` and ``b``."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def subtract_ranges(a: Ranges, b: Ranges) -> Ranges:
    return intersect_ranges(a, complement_ranges(b, MAX_CODE_POINT))


def scalar_ranges(r: Iterable[tuple[int, int]]) -> Ranges:
    """Normalized ranges without surrogates (which no UTF-8 text contains)."""
    return subtract_ranges(normalize_ranges(r), SURROGATES)


# ----------------------------------------------------------------------------------------------
# Deterministic automata over code points
# ----------------------------------------------------------------------------------------------


@dataclass
class CharDFA:
    """A deterministic automaton over code points; state 0 is the start.

    ``trans[s]`` is a tuple of disjoint ``(lo, hi, target)`` ranges sorted by ``lo``; a missing
    symbol goes to an implicit dead state. ``final[s]`` marks accepting states.
    """

    trans: list[tuple[tuple[int, int, int], ...]]
    final: list[bool]

    @property
    def n_states(self) -> int:
        return len(self.final)

    def accepts(self, text: str) -> bool:
        s = 0
        for ch in text:
            c = ord(ch)
            for lo, hi, t in self.trans[s]:
                if lo <= c <= hi:
                    s = t
                    break
            else:
                return False
        return self.final[s]


class _NFA:
    """Scratch NFA: ``edges[s]`` are (lo, hi, t) code-point edges, ``eps[s]`` epsilon targets."""

    def __init__(self, max_states: int) -> None:
        self.edges: list[list[tuple[int, int, int]]] = []
        self.eps: list[list[int]] = []
        self.max_states = max_states

    def new(self) -> int:
        if len(self.edges) >= self.max_states:
            raise LexLimit(f"more than {self.max_states} automaton states")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, e: Expr, s: int) -> int:
        """Add ``e`` from state s; return its end state (never adds edges into s)."""
        if isinstance(e, Lit):
            try:
                text = e.data.decode("utf-8")
            except UnicodeDecodeError:
                raise LexLimit("a literal that is not UTF-8 text") from None
            for ch in text:
                t = self.new()
                self.edges[s].append((ord(ch), ord(ch), t))
                s = t
            return s
        if isinstance(e, (CharClass, ByteClass)):
            ranges = normalize_ranges(e.ranges)
            if isinstance(e, ByteClass) and ranges and ranges[-1][1] > 0x7F:
                raise LexLimit("a byte class outside ASCII")
            t = self.new()
            for lo, hi in ranges:
                self.edges[s].append((lo, hi, t))
            return t
        if isinstance(e, Seq):
            for it in e.items:
                s = self.build(it, s)
            return s
        if isinstance(e, Alt):
            t = self.new()
            for o in e.options:
                a = self.new()
                self.eps[s].append(a)
                self.eps[self.build(o, a)].append(t)
            return t
        if isinstance(e, Repeat):
            for _ in range(e.lo):
                s = self.build(e.body, s)
            if e.hi is None:
                a = self.new()
                self.eps[s].append(a)
                self.eps[self.build(e.body, a)].append(a)
                return a
            end = self.new()
            for _ in range(e.hi - e.lo):
                self.eps[s].append(end)
                s = self.build(e.body, s)
            self.eps[s].append(end)
            return end
        if isinstance(e, Automaton):
            nodes = [self.new() for _ in range(e.n_states)]
            self.eps[s].append(nodes[0])
            end = self.new()
            for p, label, q in e.edges:
                self.eps[self.build(label, nodes[p])].append(nodes[q])
            for f in e.finals:
                self.eps[nodes[f]].append(end)
            return end
        if isinstance(e, (Ref, Special)):
            raise LexLimit("a rule reference inside a lexical expression")
        raise TypeError(f"not a grammar expression: {e!r}")

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        seen = set(states)
        stack = list(seen)
        while stack:
            s = stack.pop()
            for t in self.eps[s]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)


def _split_targets(edges: Iterable[tuple[int, int, object]]) -> list[tuple[int, int, frozenset]]:
    """Sweep overlapping (lo, hi, target) ranges into disjoint ranges with their target sets."""
    events: dict[int, list] = {}
    for lo, hi, t in edges:
        events.setdefault(lo, []).append((1, t))
        events.setdefault(hi + 1, []).append((-1, t))
    active: dict[object, int] = {}
    out: list[tuple[int, int, frozenset]] = []
    points = sorted(events)
    for i, p in enumerate(points):
        for d, t in events[p]:
            n = active.get(t, 0) + d
            if n:
                active[t] = n
            else:
                active.pop(t, None)
        if active and i + 1 < len(points):
            key = frozenset(active)
            hi = points[i + 1] - 1
            if out and out[-1][2] == key and out[-1][1] + 1 == p:
                out[-1] = (out[-1][0], hi, key)
            else:
                out.append((p, hi, key))
    return out


def dfa_from_expr(e: Expr, max_states: int = 20_000) -> CharDFA:
    """Subset construction of a lexical expression (no rule references) over code points."""
    nfa = _NFA(max_states * 8)
    start = nfa.new()
    end = nfa.build(e, start)
    # A state that accepts every continuation (the trailing ".*" of a search pattern) makes its whole
    # subset universal; collapsing such subsets keeps unanchored alternations (".*a.*|.*b.*") small.
    universal: dict[int, bool] = {}

    def is_universal(u: int) -> bool:
        hit = universal.get(u)
        if hit is None:
            clo = nfa.closure([u])
            hit = end in clo and any(
                lo == 0 and hi == MAX_CODE_POINT and nfa.closure([t]) >= clo for x in clo for lo, hi, t in nfa.edges[x]
            )
            universal[u] = hit
        return hit

    top: frozenset | None = None

    def canonical(subset: frozenset) -> frozenset:
        nonlocal top
        if any(is_universal(u) for u in subset):
            if top is None:
                top = subset
            return top
        return subset

    init = canonical(nfa.closure([start]))
    index = {init: 0}
    order = [init]
    trans: list[tuple[tuple[int, int, int], ...]] = []
    final: list[bool] = []
    closures: dict[frozenset, frozenset] = {}
    i = 0
    while i < len(order):
        cur = order[i]
        i += 1
        final.append(end in cur)
        out = []
        for lo, hi, targets in _split_targets((lo, hi, t) for s in cur for lo, hi, t in nfa.edges[s]):
            tgt = closures.get(targets)
            if tgt is None:
                tgt = closures[targets] = canonical(nfa.closure(targets))
            if tgt not in index:
                if len(order) >= max_states:
                    raise LexLimit(f"more than {max_states} automaton states")
                index[tgt] = len(order)
                order.append(tgt)
            out.append((lo, hi, index[tgt]))
        trans.append(_merge(out))
    return trim(CharDFA(trans, final))


def _merge(edges: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    edges.sort()
    out: list[tuple[int, int, int]] = []
    for lo, hi, t in edges:
        if out and out[-1][2] == t and out[-1][1] + 1 == lo:
            out[-1] = (out[-1][0], hi, t)
        else:
            out.append((lo, hi, t))
    return tuple(out)


def trim(a: CharDFA) -> CharDFA:
    """Keep the states that are reachable from the start and can reach a final state."""
    n = a.n_states
    reach = {0}
    stack = [0]
    while stack:
        s = stack.pop()
        for _, _, t in a.trans[s]:
            if t not in reach:
                reach.add(t)
                stack.append(t)
    rev: list[list[int]] = [[] for _ in range(n)]
    for s in reach:
        for _, _, t in a.trans[s]:
            rev[t].append(s)
    live = {s for s in reach if a.final[s]}
    stack = list(live)
    while stack:
        t = stack.pop()
        for s in rev[t]:
            if s not in live:
                live.add(s)
                stack.append(s)
    if 0 not in live:
        return CharDFA([()], [False])
    if len(live) == n:
        return a
    keep = sorted(live)
    new = {s: i for i, s in enumerate(keep)}
    return CharDFA(
        [tuple((lo, hi, new[t]) for lo, hi, t in a.trans[s] if t in live) for s in keep],
        [a.final[s] for s in keep],
    )


def is_empty(a: CharDFA) -> bool:
    return not any(trim(a).final)


def minimize(a: CharDFA, max_work: int = 3_000_000) -> CharDFA:
    """The minimal DFA, states in BFS order (:func:`stencil.grammar.ir.minimal_dfa`, O(m log n)).

    Returned trimmed but otherwise unchanged if it has more than ``max_work`` (state, elementary
    range) transitions.
    """
    a = trim(a)
    n = a.n_states
    counts = [len(t) for t in a.trans]
    flat = [e for t in a.trans for e in t]
    if not flat:
        return CharDFA([()], [a.final[0]])
    lo, hi, tgt = (np.array(c, np.int64) for c in zip(*flat))
    if len(np.unique(np.concatenate([lo, hi + 1]))) * n > max_work:
        return a
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    final, ptr, lo, hi, _, tgt = minimal_dfa(np.array(a.final, np.uint8), ptr, lo, hi, np.full(len(flat), -1, np.int64), tgt)
    lo, hi, tgt, ptr = lo.tolist(), hi.tolist(), tgt.tolist(), ptr.tolist()
    return CharDFA([tuple(zip(lo[ptr[s]:ptr[s + 1]], hi[ptr[s]:ptr[s + 1]], tgt[ptr[s]:ptr[s + 1]]))
                    for s in range(len(final))], [bool(f) for f in final])


def _pair_ranges(x: tuple, y: tuple) -> list[tuple[int, int, int, int]]:
    """Overlaps of two sorted disjoint range lists: (lo, hi, target_x, target_y)."""
    out = []
    i = j = 0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if lo <= hi:
            out.append((lo, hi, x[i][2], y[j][2]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def intersect(a: CharDFA, b: CharDFA, max_states: int = 20_000) -> CharDFA:
    """The product automaton of ``a`` and ``b`` (strings in both languages)."""
    index = {(0, 0): 0}
    order = [(0, 0)]
    trans: list[tuple[tuple[int, int, int], ...]] = []
    final: list[bool] = []
    i = 0
    while i < len(order):
        p, q = order[i]
        i += 1
        final.append(a.final[p] and b.final[q])
        out = []
        for lo, hi, tp, tq in _pair_ranges(a.trans[p], b.trans[q]):
            key = (tp, tq)
            if key not in index:
                if len(order) >= max_states:
                    raise LexLimit(f"more than {max_states} automaton states")
                index[key] = len(order)
                order.append(key)
            out.append((lo, hi, index[key]))
        trans.append(_merge(out))
    return trim(CharDFA(trans, final))


def complement(a: CharDFA) -> CharDFA:
    """Every code-point string not in ``a``'s language."""
    n = a.n_states
    dead = n
    trans = []
    for s in range(n):
        out = list(a.trans[s])
        for lo, hi in complement_ranges(((lo, hi) for lo, hi, _ in a.trans[s]), MAX_CODE_POINT):
            out.append((lo, hi, dead))
        trans.append(_merge(out))
    trans.append(((0, MAX_CODE_POINT, dead),))
    return trim(CharDFA(trans, [not f for f in a.final] + [True]))


def union(a: CharDFA, b: CharDFA, max_states: int = 20_000) -> CharDFA:
    return complement(intersect(complement(a), complement(b), max_states))


def with_length(a: CharDFA, lo: int, hi: int | None, max_states: int = 20_000) -> CharDFA:
    """Strings of ``a`` whose length in code points is within ``lo..hi``."""
    cap = lo if hi is None else hi
    index = {(0, 0): 0}
    order = [(0, 0)]
    trans: list[tuple[tuple[int, int, int], ...]] = []
    final: list[bool] = []
    i = 0
    while i < len(order):
        s, k = order[i]
        i += 1
        final.append(a.final[s] and k >= lo)
        out = []
        if hi is None or k < hi:
            k2 = min(k + 1, cap)
            for rlo, rhi, t in a.trans[s]:
                key = (t, k2)
                if key not in index:
                    if len(order) >= max_states:
                        raise LexLimit(f"more than {max_states} automaton states")
                    index[key] = len(order)
                    order.append(key)
                out.append((rlo, rhi, index[key]))
        trans.append(tuple(out))
    return trim(CharDFA(trans, final))


def length_bounds(a: CharDFA) -> tuple[int, int | None] | None:
    """(shortest, longest or None if unbounded) string lengths; None if the language is empty."""
    a = trim(a)
    if not any(a.final):
        return None
    dist = {0: 0}
    frontier = [0]
    shortest = None
    while frontier and shortest is None:
        nxt = []
        for s in frontier:
            if a.final[s]:
                shortest = dist[s]
                break
            for _, _, t in a.trans[s]:
                if t not in dist:
                    dist[t] = dist[s] + 1
                    nxt.append(t)
        frontier = nxt
    # Longest path in the trimmed automaton; a cycle means unbounded.
    color = [0] * a.n_states
    longest = [0] * a.n_states
    stack: list[tuple[int, int]] = [(0, 0)]
    while stack:
        s, i = stack.pop()
        if i == 0:
            if color[s] == 2:
                continue
            color[s] = 1
        edges = a.trans[s]
        if i < len(edges):
            stack.append((s, i + 1))
            t = edges[i][2]
            if color[t] == 1:
                return shortest or 0, None
            if color[t] == 0:
                stack.append((t, 0))
            continue
        color[s] = 2
        longest[s] = max((1 + longest[t] for _, _, t in edges), default=0)
    return shortest or 0, longest[0]


def dfa_to_expr(a: CharDFA, label: Callable[[Ranges], Expr]) -> Expr:
    """The DFA as an IR :class:`Automaton`, each edge reading ``label(ranges)``."""
    a = trim(a)
    if not any(a.final):
        return NOTHING
    grouped: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for s in range(a.n_states):
        for lo, hi, t in a.trans[s]:
            grouped.setdefault((s, t), []).append((lo, hi))
    edges = tuple((s, label(normalize_ranges(r)), t) for (s, t), r in sorted(grouped.items()))
    finals = tuple(s for s in range(a.n_states) if a.final[s])
    if not edges:
        return EMPTY
    return Automaton(a.n_states, edges, finals)


def strings_except_expr(values: Iterable[str], label: Callable[[Ranges], Expr]) -> Expr:
    """Every code-point string but ``values``, as an IR :class:`Automaton` whose edges read ``label(ranges)``.

    The language of ``dfa_to_expr(minimize(complement(strings_dfa(values))), label)``, built
    directly from the values' trie: an object's "any name but the declared ones" is in almost every
    schema, and those three steps were a quarter of its compile. Each trie node reads its children's
    characters down the trie and every other character into a state that takes any rest. The part
    of "every other character" outside printable ASCII is the same at almost every node (the names
    are ASCII), so those nodes reach it through one shared state by an empty edge, and its
    spellings (multi-byte UTF-8, escapes) are lowered once instead of once per node. The IR
    minimizes the automaton, so it need not be minimal here.
    """
    children: list[dict[int, int]] = [{}]
    excluded = [False]
    for v in values:
        s = 0
        for ch in v:
            t = children[s].get(ord(ch))
            if t is None:
                t = children[s][ord(ch)] = len(excluded)
                children.append({})
                excluded.append(False)
            s = t
        excluded[s] = True
    n = len(children)
    rest, hub = n, n + 1  # rest: after a character off the trie, any string; hub: one character outside printable ASCII
    outside = complement_ranges(PRINTABLE_ASCII, MAX_CODE_POINT)
    edges: list[tuple[int, Expr, int]] = []
    for s, kids in enumerate(children):
        for c, t in sorted(kids.items()):
            edges.append((s, label(((c, c),)), t))
        taken = tuple((c, c) for c in sorted(kids))
        if _PRINTABLE.issuperset(kids):
            printable = _printable_except(taken)
            if printable:
                edges.append((s, label(printable), rest))
            edges.append((s, EMPTY, hub))
        else:
            edges.append((s, label(complement_ranges(taken, MAX_CODE_POINT)), rest))
    edges.append((hub, label(outside), rest))
    edges.append((rest, label(ALL), rest))
    finals = tuple(s for s in range(n) if not excluded[s]) + (rest,)
    return Automaton(n + 2, tuple(edges), finals)


@lru_cache(maxsize=4096)
def _printable_except(taken: Ranges) -> Ranges:
    """Printable ASCII but the characters ``taken`` (most trie nodes of property names have one child)."""
    return subtract_ranges(PRINTABLE_ASCII, taken)


def strings_dfa(values: Iterable[str]) -> CharDFA:
    """The finite language ``values``, as their trie (a DFA; every state is live)."""
    children: list[dict[int, int]] = [{}]
    final = [False]
    for v in values:
        s = 0
        for ch in v:
            c = ord(ch)
            t = children[s].get(c)
            if t is None:
                t = children[s][c] = len(final)
                children.append({})
                final.append(False)
            s = t
        final[s] = True
    if not any(final):
        return CharDFA([()], [False])
    return CharDFA([tuple((c, c, t) for c, t in sorted(ch.items())) for ch in children], final)


UNIVERSE = CharDFA([((0, MAX_CODE_POINT, 0),)], [True])


# ----------------------------------------------------------------------------------------------
# JSON string spellings
# ----------------------------------------------------------------------------------------------

_SHORT_ESCAPES = {0x22: '"', 0x5C: "\\", 0x2F: "/", 0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t"}
_RAW: Ranges = subtract_ranges(((0x20, MAX_CODE_POINT),), ((0x22, 0x22), (0x5C, 0x5C)) + SURROGATES)


def _hex_digit_class(lo: int, hi: int) -> Expr:
    ranges = []
    for v in range(lo, hi + 1):
        ranges.append(ord("0123456789abcdef"[v]))
        if v >= 10:
            ranges.append(ord("0123456789ABCDEF"[v]))
    return ByteClass(normalize_ranges((c, c) for c in ranges))


def digit_split(lo: int, hi: int, width: int, base: int) -> list[tuple[tuple[int, int], ...]]:
    """Digit-range tuples of exactly ``width`` digits whose numerals cover lo..hi exactly, disjointly."""
    if width == 0:
        return [()]
    p = base ** (width - 1)
    ld, hd = lo // p, hi // p
    if ld == hd:
        return [((ld, ld),) + t for t in digit_split(lo % p, hi % p, width - 1, base)]
    out = []
    if lo % p:
        out += [((ld, ld),) + t for t in digit_split(lo % p, p - 1, width - 1, base)]
        ld += 1
    full_tail = hi % p == p - 1
    last = hd if full_tail else hd - 1
    if ld <= last:
        out.append(((ld, last),) + ((0, base - 1),) * (width - 1))
    if not full_tail:
        out += [((hd, hd),) + t for t in digit_split(0, hi % p, width - 1, base)]
    return out


def _hex4(ranges: Ranges) -> Expr:
    return alt(
        *(seq(*(_hex_digit_class(a, b) for a, b in digits)) for lo, hi in ranges for digits in digit_split(lo, hi, 4, 16))
    )


PRINTABLE_ASCII: Ranges = ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E))
_PRINTABLE = frozenset(c for lo, hi in PRINTABLE_ASCII for c in range(lo, hi + 1))
"""Printable ASCII other than the quote and the backslash: with ``raw_ascii`` only ever written raw."""


@lru_cache(maxsize=8192)
def json_char(ranges: Ranges, raw_ascii: bool = False) -> Expr:
    """Every JSON string-body spelling of one character from code-point ``ranges``.

    ``raw_ascii=True`` drops the escaped spellings (``\\u0041``, ``\\/``) of printable ASCII, which no
    JSON serializer writes (``json.dumps`` never does); other characters keep all their spellings.
    """
    ranges = scalar_ranges(ranges)
    raw = intersect_ranges(ranges, _RAW)
    return alt(*([CharClass(raw)] if raw else []),
               json_escapes(subtract_ranges(ranges, PRINTABLE_ASCII) if raw_ascii else ranges))


@lru_cache(maxsize=8192)
def json_escapes(ranges: Ranges) -> Expr:
    """The escaped spellings (short escapes, ``\\uXXXX``, surrogate pairs) of characters in ``ranges``."""
    ranges = scalar_ranges(ranges)
    opts: list[Expr] = []
    short = [c for c in _SHORT_ESCAPES if intersect_ranges(ranges, ((c, c),))]
    if short:
        opts.append(seq(lit("\\"), ByteClass(normalize_ranges((ord(_SHORT_ESCAPES[c]),) * 2 for c in short))))
    bmp = intersect_ranges(ranges, ((0, 0xFFFF),))
    u: list[Expr] = []
    if bmp:
        u.append(_hex4(bmp))
    pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for lo, hi in intersect_ranges(ranges, ((0x10000, MAX_CODE_POINT),)):
        hl, hh = 0xD800 + ((lo - 0x10000) >> 10), 0xD800 + ((hi - 0x10000) >> 10)
        ll, lh = 0xDC00 + (lo & 0x3FF), 0xDC00 + (hi & 0x3FF)
        if hl == hh:
            pairs.setdefault((ll, lh), []).append((hl, hl))
            continue
        pairs.setdefault((ll, 0xDFFF), []).append((hl, hl))
        if hl + 1 <= hh - 1:
            pairs.setdefault((0xDC00, 0xDFFF), []).append((hl + 1, hh - 1))
        pairs.setdefault((0xDC00, lh), []).append((hh, hh))
    for (ll, lh), highs in sorted(pairs.items()):
        u.append(seq(_hex4(normalize_ranges(highs)), lit("\\u"), _hex4(((ll, lh),))))
    if u:
        opts.append(seq(lit("\\u"), alt(*u)))
    return alt(*opts) if opts else NOTHING


def json_text(text: str, raw_ascii: bool = False) -> Expr:
    """Every JSON string-body spelling of the decoded string ``text`` (see :func:`json_char`)."""
    if raw_ascii and all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in text):
        return lit(text)
    return seq(*(json_char(((ord(c), ord(c)),), raw_ascii) for c in text))


def json_expr(e: Expr, label: Callable[[Ranges], Expr] = json_char) -> Expr:
    """Substitute each character of a code-point expression by its JSON spellings (``label``)."""
    if isinstance(e, Lit):
        return seq(*(label(((ord(c), ord(c)),)) for c in e.data.decode("utf-8")))
    if isinstance(e, (CharClass, ByteClass)):
        return label(normalize_ranges(e.ranges))
    if isinstance(e, Seq):
        return seq(*(json_expr(x, label) for x in e.items))
    if isinstance(e, Alt):
        return Alt(tuple(json_expr(x, label) for x in e.options))
    if isinstance(e, Repeat):
        return Repeat(json_expr(e.body, label), e.lo, e.hi)
    if isinstance(e, Automaton):
        return Automaton(e.n_states, tuple((p, json_expr(x, label), q) for p, x, q in e.edges), e.finals)
    raise LexLimit(f"cannot spell {type(e).__name__} inside a JSON string")


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------

DIGIT = ByteClass(((0x30, 0x39),))
NONZERO = ByteClass(((0x31, 0x39),))
_DIGITS = star(DIGIT)
_INT = alt(lit("0"), seq(NONZERO, _DIGITS))
_FRAC = seq(lit("."), DIGIT, _DIGITS)
_EXP = seq(ByteClass(((0x45, 0x45), (0x65, 0x65))), opt(ByteClass(((0x2B, 0x2B), (0x2D, 0x2D)))), DIGIT, _DIGITS)
NUMBER = seq(opt(lit("-")), _INT, opt(_FRAC), opt(_EXP))
"""RFC 8259 ``number``."""
PLAIN = seq(opt(lit("-")), _INT, opt(_FRAC))
"""Positional numerals: ``number`` without an exponent."""
INTEGER = seq(opt(lit("-")), _INT, opt(seq(lit("."), Repeat(lit("0"), 1, None))))
"""Positional numerals with an integral value (``5``, ``-0``, ``5.0``)."""


def _dclass(lo: int, hi: int) -> Expr:
    return ByteClass(((0x30 + lo, 0x30 + hi),)) if lo <= hi else NOTHING


def _uint_range(lo: int, hi: int | None) -> Expr:
    """Canonical decimal numerals (no leading zeros) of the integers lo..hi (hi None: unbounded)."""
    if hi is not None and hi < lo:
        return NOTHING
    width_lo = len(str(lo))
    top = 10**width_lo - 1 if hi is None else hi
    opts: list[Expr] = []
    for w in range(width_lo, len(str(top)) + 1):
        a = max(lo, 10 ** (w - 1) if w > 1 else 0)
        b = min(top, 10**w - 1)
        if a <= b:
            opts += [seq(*(_dclass(x, y) for x, y in d)) for d in digit_split(a, b, w, 10)]
    if hi is None:
        opts.append(seq(NONZERO, Repeat(DIGIT, width_lo, width_lo), _DIGITS))
    return alt(*opts) if opts else NOTHING


def _lex(b: str, op: str) -> Expr:
    """Digit strings D (possibly empty) with ``0.D op 0.b`` (both read as fractions, zero-padded).

    ``b`` has no trailing zeros; ``op`` is one of ``ge gt le lt``.
    """
    if not b:
        if op == "ge":
            return _DIGITS
        if op == "gt":
            return seq(_DIGITS, NONZERO, _DIGITS)
        if op == "le":
            return star(lit("0"))
        return NOTHING
    d = int(b[0])
    opts: list[Expr] = []
    if op in ("ge", "gt"):
        opts.append(seq(_dclass(d + 1, 9), _DIGITS))
    else:
        opts.append(EMPTY)  # D exhausted: zero padding is below b (b has a non-zero digit)
        opts.append(seq(_dclass(0, d - 1), _DIGITS))
    opts.append(seq(lit(b[0]), _lex(b[1:], op)))
    return alt(*opts)


def _parts(x: Decimal) -> tuple[int, str]:
    """Integer part and fraction digits (no trailing zeros) of a non-negative decimal."""
    x = abs(x)
    i = int(x)
    f = x - i
    frac = "" if f == 0 else format(f, "f").split(".")[1].rstrip("0")
    return i, frac


def _mag(x: Decimal, op: str) -> Expr:
    """Unsigned positional numerals whose value ``op`` x (x >= 0)."""
    i, f = _parts(x)
    any_frac = opt(seq(lit("."), DIGIT, _DIGITS))
    si = lit(str(i))
    if op in ("ge", "gt"):
        greater = seq(_uint_range(i + 1, None), any_frac)
        if op == "ge" and not f:
            equal: Expr = seq(si, any_frac)
        else:
            equal = seq(si, lit("."), _lex(f, op))
        return alt(greater, equal)
    smaller = seq(_uint_range(0, i - 1), any_frac) if i > 0 else NOTHING
    tail = alt(EMPTY, seq(lit("."), _lex(f, op))) if (op == "le" or f) else NOTHING
    return alt(smaller, seq(si, tail))


_ZERO = seq(lit("0"), opt(seq(lit("."), Repeat(lit("0"), 1, None))))
_ANY_MAG = seq(_INT, opt(_FRAC))


def bound_expr(op: str, x: Decimal) -> Expr:
    """Positional numerals (possibly with leading junk that the caller intersects away) with value ``op`` x."""
    neg = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}[op]
    if op in ("ge", "gt"):
        if x > 0:
            return _mag(x, op)
        if x == 0:
            return _mag(x, op) if op == "gt" else alt(_ANY_MAG, seq(lit("-"), _ZERO))
        return alt(_ANY_MAG, seq(lit("-"), _mag(-x, neg)))
    if x > 0:
        return alt(_mag(x, op), seq(lit("-"), _ANY_MAG))
    if x == 0:
        return seq(lit("-"), _mag(x, "gt")) if op == "lt" else alt(_ZERO, seq(lit("-"), _ANY_MAG))
    return seq(lit("-"), _mag(-x, neg))


def value_spellings(x: Decimal) -> Expr:
    """Positional spellings of the number ``x`` (trailing fraction zeros and ``-0`` allowed)."""
    i, f = _parts(x)
    zeros = star(lit("0"))
    body = seq(lit(str(i)), opt(seq(lit("."), Repeat(lit("0"), 1, None)))) if not f else seq(lit(f"{i}.{f}"), zeros)
    if x == 0:
        return seq(opt(lit("-")), body)
    return seq(lit("-"), body) if x < 0 else body


def exponent_spellings(x: Decimal) -> Expr:
    """Exponent spellings of the non-zero ``x`` with a normalized mantissa (``1.5e+300``, ``1E-07``)."""
    sign, digits, exp = x.normalize().as_tuple()
    ds = "".join(map(str, digits))
    e10 = exp + len(ds) - 1
    mant = lit(ds[0]) if len(ds) == 1 else seq(lit(ds[0] + "." + ds[1:]))
    mant = seq(mant, star(lit("0"))) if len(ds) > 1 else seq(mant, opt(seq(lit("."), Repeat(lit("0"), 1, None))))
    e_abs = lit(str(abs(e10)))
    exp_part = seq(ByteClass(((0x45, 0x45), (0x65, 0x65))),
                   (lit("-") if e10 < 0 else (opt(ByteClass(((0x2B, 0x2B), (0x2D, 0x2D)))) if e10 == 0 else opt(lit("+")))),
                   star(lit("0")), e_abs)
    return seq(lit("-") if sign else EMPTY, mant, exp_part)


def multiple_dfa(m: Decimal, max_states: int = 60_000) -> CharDFA:
    """Signed positional numerals that are integer multiples of ``m`` > 0 (leading zeros not policed)."""
    sign, digits, exp = m.normalize().as_tuple()
    big = int("".join(map(str, digits)))
    d = max(0, -exp)
    if exp > 0:
        big *= 10**exp
    if big * (d + 2) > max_states:
        raise LexLimit(f"multipleOf {m} needs about {big * (d + 2)} automaton states")
    # States: 0 start, 1 after '-', then ("int", r), ("frac", k, r) for k < d digits read, ("zeros", r).
    index: dict[tuple, int] = {("start",): 0, ("minus",): 1}
    order: list[tuple] = [("start",), ("minus",)]

    def sid(key: tuple) -> int:
        if key not in index:
            index[key] = len(order)
            order.append(key)
        return index[key]

    trans: list[tuple[tuple[int, int, int], ...]] = []
    final: list[bool] = []
    i = 0
    while i < len(order):
        key = order[i]
        i += 1
        out = []
        if key[0] in ("start", "minus"):
            if key[0] == "start":
                out.append((0x2D, 0x2D, sid(("minus",))))
            for c in range(10):
                out.append((0x30 + c, 0x30 + c, sid(("int", c % big))))
            final.append(False)
        elif key[0] == "int":
            r = key[1]
            for c in range(10):
                out.append((0x30 + c, 0x30 + c, sid(("int", (r * 10 + c) % big))))
            out.append((0x2E, 0x2E, sid(("frac", 0, r) if d else ("zeros", r))))
            final.append(r * 10**d % big == 0)
        elif key[0] == "frac":
            _, k, r = key
            for c in range(10):
                r2 = (r * 10 + c) % big
                out.append((0x30 + c, 0x30 + c, sid(("frac", k + 1, r2) if k + 1 < d else ("zeros", r2))))
            final.append(k > 0 and r * 10 ** (d - k) % big == 0)
        else:
            out.append((0x30, 0x30, sid(key)))
            final.append(key[1] == 0)
        trans.append(_merge(out))
    return trim(CharDFA(trans, final))


def exponent_range_expr(lo: int | None, hi: int | None) -> Expr:
    """Exponent suffixes ``[eE][+-]?digits`` (leading zeros allowed) whose value is within lo..hi."""
    opts: list[Expr] = []
    zeros = star(lit("0"))
    a = 0 if lo is None else max(lo, 0)
    if hi is None or hi >= a:
        opts.append(seq(opt(lit("+")), zeros, _uint_range(a, hi)))
    if lo is None or lo < 0:
        b = 1 if hi is None else max(-hi, 1)  # magnitudes of negative exponents
        if lo is None or -lo >= b:
            opts.append(seq(lit("-"), zeros, _uint_range(b, None if lo is None else -lo)))
    if (lo is None or lo <= 0) and (hi is None or hi >= 0):
        opts.append(seq(lit("-"), Repeat(lit("0"), 1, None)))
    if not opts:
        return NOTHING
    return seq(ByteClass(((0x45, 0x45), (0x65, 0x65))), alt(*opts))


def _floor_log10(x: Decimal) -> int:
    return x.adjusted()


def _is_pow10(x: Decimal) -> bool:
    _, digits, _ = x.normalize().as_tuple()
    return digits == (1,)


def decade_exponent_expr(lo: Decimal | None, lo_strict: bool, hi: Decimal | None, hi_strict: bool) -> Expr:
    """Exponent-notation numerals whose whole decade lies within the bounds (see the module doc)."""
    mant = seq(NONZERO, opt(seq(lit("."), DIGIT, _DIGITS)))
    opts: list[Expr] = []
    # Positive decades [10^E, 10^(E+1)): need 10^E >= lo (> if strict) and 10^(E+1) <= hi.
    if hi is None or hi > 0:
        if lo is None or lo <= 0:
            emin = None
        else:
            emin = _floor_log10(lo) + (0 if _is_pow10(lo) and not lo_strict else 1)
        emax = None if hi is None else _floor_log10(hi) - 1
        if emin is None or emax is None or emin <= emax:
            opts.append(seq(mant, exponent_range_expr(emin, emax)))
    # Negative decades (-10^(E+1), -10^E]: need 10^(E+1) <= -lo and -10^E <= hi (< if strict).
    if lo is None or lo < 0:
        emax = None if lo is None else _floor_log10(-lo) - 1
        if hi is None or hi >= 0:
            emin = None
        else:
            emin = _floor_log10(-hi) + (0 if _is_pow10(-hi) and not hi_strict else 1)
        if emin is None or emax is None or emin <= emax:
            opts.append(seq(lit("-"), mant, exponent_range_expr(emin, emax)))
    zero_ok = (lo is None or lo < 0 or (lo == 0 and not lo_strict)) and (hi is None or hi > 0 or (hi == 0 and not hi_strict))
    if zero_ok:
        opts.append(seq(opt(lit("-")), _ZERO, _EXP))
    return alt(*opts) if opts else NOTHING


PLAIN_DFA = dfa_from_expr(PLAIN)
