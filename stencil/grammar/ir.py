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

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

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


class _NFA:
    def __init__(self) -> None:
        self.edges: list[list[tuple[int, int, int, int]]] = []

    def new(self) -> int:
        self.edges.append([])
        return len(self.edges) - 1

    def add(self, s: int, lo: int, hi: int, rule: int, t: int) -> None:
        self.edges[s].append((lo, hi, rule, t))


@dataclass
class GrammarLimits:
    """Bounds on grammar construction, so a pathological grammar fails clearly instead of stalling."""

    max_nfa_states: int = 2_000_000
    max_dfa_states: int = 20_000


class _Lowering:
    def __init__(self, rule_ids: dict[str, int], limits: GrammarLimits) -> None:
        self.rule_ids = rule_ids
        self.specials: list[str] = []
        self.limits = limits
        self.nfa = _NFA()

    def lower(self, e: Expr, s: int) -> int:
        """Add ``e`` starting at state s; return its end state."""
        nfa = self.nfa
        if len(nfa.edges) > self.limits.max_nfa_states:
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
        if isinstance(e, ByteClass):
            t = nfa.new()
            for lo, hi in normalize_ranges(e.ranges):
                nfa.add(s, lo, hi, -1, t)
            return t
        if isinstance(e, CharClass):
            t = nfa.new()
            for path in utf8_ranges(e.ranges):
                cur = s
                for i, (lo, hi) in enumerate(path):
                    nxt = t if i == len(path) - 1 else nfa.new()
                    nfa.add(cur, lo, hi, -1, nxt)
                    cur = nxt
            return t
        if isinstance(e, Seq):
            for it in e.items:
                s = self.lower(it, s)
            return s
        if isinstance(e, Alt):
            t = nfa.new()
            for o in e.options:
                a = nfa.new()
                nfa.add(s, 0, 0, _EPS, a)
                nfa.add(self.lower(o, a), 0, 0, _EPS, t)
            return t
        if isinstance(e, Repeat):
            if e.lo < 0 or (e.hi is not None and e.hi < e.lo):
                raise GrammarError(f"bad repetition bounds {{{e.lo},{e.hi}}}")
            for _ in range(e.lo):
                s = self.lower(e.body, s)
            if e.hi is None:
                # s --eps--> a --body--> b --eps--> a ; a is the exit.
                a = nfa.new()
                nfa.add(s, 0, 0, _EPS, a)
                b = self.lower(e.body, a)
                nfa.add(b, 0, 0, _EPS, a)
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
                nfa.add(self.lower(label, nodes[p]), 0, 0, _EPS, nodes[q])
            for f in e.finals:
                nfa.add(nodes[f], 0, 0, _EPS, end)
            return end
        if isinstance(e, Special):
            if e.name not in self.specials:
                self.specials.append(e.name)
            sym = 256 + self.specials.index(e.name)
            t = nfa.new()
            nfa.add(s, sym, sym, -1, t)
            return t
        if isinstance(e, Ref):
            if e.name not in self.rule_ids:
                raise GrammarError(f"reference to undefined rule {e.name!r}")
            t = nfa.new()
            nfa.add(s, 0, 0, self.rule_ids[e.name], t)
            return t
        raise TypeError(f"not a grammar expression: {e!r}")


def _eps_closure(nfa: _NFA, states: Iterable[int]) -> frozenset[int]:
    seen = set(states)
    stack = list(seen)
    while stack:
        s = stack.pop()
        for lo, hi, rule, t in nfa.edges[s]:
            if rule == _EPS and t not in seen:
                seen.add(t)
                stack.append(t)
    return frozenset(seen)


@dataclass
class _RuleAutomaton:
    """One rule's epsilon-free automaton with local state numbers; state 0 is the start."""

    final: list[bool]
    edges: list[list[tuple[int, int, int, int]]]  # (lo, hi, rule, target); rule -1 = byte edge


def _determinize(nfa: _NFA, start: int, end: int, max_states: int) -> _RuleAutomaton | None:
    """Subset construction over bytes and rule references; None if it grows past max_states."""
    init = _eps_closure(nfa, [start])
    index = {init: 0}
    order = [init]
    final: list[bool] = []
    edges: list[list[tuple[int, int, int, int]]] = []
    i = 0
    while i < len(order):
        cur = order[i]
        i += 1
        final.append(end in cur)
        # Byte transitions: split the byte axis at every range boundary.
        bounds = set()
        by_rule: dict[int, set[int]] = {}
        byte_edges = []
        for s in cur:
            for lo, hi, rule, t in nfa.edges[s]:
                if rule == -1:
                    byte_edges.append((lo, hi, t))
                    bounds.add(lo)
                    bounds.add(hi + 1)
                elif rule >= 0:
                    by_rule.setdefault(rule, set()).add(t)
        out: list[tuple[int, int, int, int]] = []
        cuts = sorted(bounds)
        for a, b in zip(cuts, cuts[1:]):
            targets = [t for lo, hi, t in byte_edges if lo <= a and b - 1 <= hi]
            if not targets:
                continue
            tgt = _eps_closure(nfa, targets)
            if tgt not in index:
                if len(order) >= max_states:
                    return None
                index[tgt] = len(order)
                order.append(tgt)
            out.append((a, b - 1, -1, index[tgt]))
        for rule in sorted(by_rule):
            tgt = _eps_closure(nfa, by_rule[rule])
            if tgt not in index:
                if len(order) >= max_states:
                    return None
                index[tgt] = len(order)
                order.append(tgt)
            out.append((0, 0, rule, index[tgt]))
        edges.append(_merge_byte_edges(out))
    return _RuleAutomaton(final, edges)


def _merge_byte_edges(edges: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Sort edges (byte edges by lo, then rule edges) and merge adjacent byte ranges to the same target."""
    byte = sorted(e for e in edges if e[2] == -1)
    rest = sorted(e for e in edges if e[2] != -1)
    merged: list[tuple[int, int, int, int]] = []
    for lo, hi, rule, t in byte:
        if merged and merged[-1][3] == t and merged[-1][1] + 1 == lo:
            merged[-1] = (merged[-1][0], hi, -1, t)
        else:
            merged.append((lo, hi, rule, t))
    return merged + rest


def _eps_free(nfa: _NFA, start: int, end: int) -> _RuleAutomaton:
    """Epsilon removal without determinization (the fallback when subsets blow up)."""
    reach: dict[int, int] = {}
    order: list[int] = []

    def visit(s: int) -> int:
        if s not in reach:
            reach[s] = len(order)
            order.append(s)
        return reach[s]

    visit(start)
    final: list[bool] = []
    edges: list[list[tuple[int, int, int, int]]] = []
    i = 0
    while i < len(order):
        s = order[i]
        i += 1
        clo = _eps_closure(nfa, [s])
        final.append(end in clo)
        out = []
        for c in clo:
            for lo, hi, rule, t in nfa.edges[c]:
                if rule != _EPS:
                    out.append((lo, hi, rule, visit(t)))
        edges.append(_merge_byte_edges(sorted(set(out))))
    return _RuleAutomaton(final, edges)


def _equivalence_blocks(a: _RuleAutomaton) -> list[int]:
    """Hopcroft's partition refinement: the block (equivalence class) of every state.

    The symbol axis is cut at every byte-edge boundary, so each interval between cuts is one
    symbol for all states, and each referenced rule is one more symbol. Missing transitions go to
    an explicit dead state. O(n k log n) for n states and k symbols, where Moore's refinement
    would be quadratic on the long counter chains that bounded repetitions produce.
    """
    n = len(a.final)
    dead = n
    cuts = sorted({x for es in a.edges for lo, hi, r, t in es if r == -1 for x in (lo, hi + 1)})
    rules = sorted({r for es in a.edges for lo, hi, r, t in es if r >= 0})
    n_syms = max(len(cuts) - 1, 0) + len(rules)
    rule_sym = {r: max(len(cuts) - 1, 0) + i for i, r in enumerate(rules)}
    inv: list[dict[int, list[int]]] = [{} for _ in range(n_syms)]
    for src, es in enumerate(a.edges):
        for lo, hi, r, t in es:
            if r >= 0:
                inv[rule_sym[r]].setdefault(t, []).append(src)
            else:
                for c in range(bisect.bisect_left(cuts, lo), bisect.bisect_left(cuts, hi + 1)):
                    inv[c].setdefault(t, []).append(src)
    for c in range(n_syms):
        has = {src for srcs in inv[c].values() for src in srcs}
        inv[c][dead] = [src for src in range(n + 1) if src not in has]

    finals = {q for q in range(n) if a.final[q]}
    blocks = [b for b in (finals, set(range(n + 1)) - finals) if b]
    block = [0] * (n + 1)
    for i, b in enumerate(blocks):
        for q in b:
            block[q] = i
    work = set(range(len(blocks)))
    while work:
        splitter = list(blocks[work.pop()])
        for c in range(n_syms):
            touched: dict[int, list[int]] = {}
            for t in splitter:
                for src in inv[c].get(t, ()):
                    touched.setdefault(block[src], []).append(src)
            for y, members in touched.items():
                if len(members) == len(blocks[y]):
                    continue
                moved = set(members)
                blocks[y] -= moved
                blocks.append(moved)
                new = len(blocks) - 1
                for q in moved:
                    block[q] = new
                if y in work:
                    work.add(new)
                else:
                    work.add(y if len(blocks[y]) <= len(moved) else new)
    return block[:n]


def _minimize(a: _RuleAutomaton) -> _RuleAutomaton:
    """The minimal automaton of a deterministic one, states numbered canonically (BFS from the start)."""
    block = _equivalence_blocks(a)
    n = len(a.final)
    # Renumber so the start's block is 0 and blocks appear in BFS order.
    rep: dict[int, int] = {}
    for s in range(n):
        rep.setdefault(block[s], s)
    order = [block[0]]
    number = {block[0]: 0}
    i = 0
    final: list[bool] = []
    edges: list[list[tuple[int, int, int, int]]] = []
    while i < len(order):
        b = order[i]
        i += 1
        s = rep[b]
        final.append(a.final[s])
        out = []
        for lo, hi, r, t in a.edges[s]:
            tb = block[t]
            if tb not in number:
                number[tb] = len(order)
                order.append(tb)
            out.append((lo, hi, r, number[tb]))
        edges.append(_merge_byte_edges(out))
    return _prune_dead(_RuleAutomaton(final, edges))


def _prune_dead(a: _RuleAutomaton) -> _RuleAutomaton:
    """Drop states from which no final state is reachable (keeping the start)."""
    n = len(a.final)
    rev: list[list[int]] = [[] for _ in range(n)]
    for s in range(n):
        for *_, t in a.edges[s]:
            rev[t].append(s)
    live = {s for s in range(n) if a.final[s]}
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
    return _RuleAutomaton(
        [a.final[s] for s in keep],
        [[(lo, hi, r, new[t]) for lo, hi, r, t in a.edges[s] if t in live] for s in keep],
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
        names = _reachable(self.rules, root)
        ids = {n: i for i, n in enumerate(names)}
        low = _Lowering(ids, self.limits)
        autos = []
        for n in names:
            start = low.nfa.new()
            end = low.lower(self.rules[n], start)
            det = _determinize(low.nfa, start, end, self.limits.max_dfa_states)
            autos.append(_minimize(det) if det is not None else _prune_dead(_eps_free(low.nfa, start, end)))
        g = _pack(names, [self.rules[n] for n in names], ids[root], autos)
        g.special_tokens = low.specials
        return g


def _refs(e: Expr) -> Iterable[str]:
    if isinstance(e, Ref):
        yield e.name
    elif isinstance(e, Seq):
        for x in e.items:
            yield from _refs(x)
    elif isinstance(e, Alt):
        for x in e.options:
            yield from _refs(x)
    elif isinstance(e, Repeat):
        yield from _refs(e.body)
    elif isinstance(e, Automaton):
        for _, label, _ in e.edges:
            yield from _refs(label)


def _reachable(rules: dict[str, Expr], root: str) -> list[str]:
    order = [root]
    seen = {root}
    i = 0
    while i < len(order):
        for r in _refs(rules[order[i]]):
            if r not in rules:
                raise GrammarError(f"rule {order[i]!r} refers to undefined rule {r!r}")
            if r not in seen:
                seen.add(r)
                order.append(r)
        i += 1
    return order


def _pack(names: list[str], exprs: list[Expr], root: int, autos: Sequence[_RuleAutomaton]) -> Grammar:
    rule_start = np.zeros(len(names), np.int32)
    state_rule, state_final = [], []
    ptr, lo_, hi_, rule_, tgt = [0], [], [], [], []
    base = 0
    for r, a in enumerate(autos):
        rule_start[r] = base
        for s in range(len(a.final)):
            state_rule.append(r)
            state_final.append(1 if a.final[s] else 0)
            for lo, hi, ref, t in a.edges[s]:
                lo_.append(lo)
                hi_.append(hi)
                rule_.append(ref)
                tgt.append(base + t)
            ptr.append(len(tgt))
        base += len(a.final)
    g = Grammar(
        rule_names=list(names),
        rule_exprs=list(exprs),
        root=root,
        rule_start=rule_start,
        rule_nullable=np.zeros(len(names), np.uint8),
        state_rule=np.array(state_rule, np.int32),
        state_final=np.array(state_final, np.uint8),
        edge_ptr=np.array(ptr, np.int32),
        edge_lo=np.array(lo_, np.int32),
        edge_hi=np.array(hi_, np.int32),
        edge_rule=np.array(rule_, np.int32),
        edge_target=np.array(tgt, np.int32),
    )
    g.rule_nullable[:] = _nullable(g)
    return g


def _nullable(g: Grammar) -> np.ndarray:
    """Fixpoint: a rule is nullable if a path of nullable rule edges leads from its start to a final state."""
    nullable = np.zeros(g.n_rules, np.uint8)
    changed = True
    while changed:
        changed = False
        for r in range(g.n_rules):
            if nullable[r]:
                continue
            start = int(g.rule_start[r])
            seen = {start}
            stack = [start]
            while stack:
                s = stack.pop()
                if g.state_final[s]:
                    nullable[r] = 1
                    changed = True
                    break
                for e in range(g.edge_ptr[s], g.edge_ptr[s + 1]):
                    ref = g.edge_rule[e]
                    if ref >= 0 and nullable[ref] and g.edge_target[e] not in seen:
                        seen.add(int(g.edge_target[e]))
                        stack.append(int(g.edge_target[e]))
    return nullable
