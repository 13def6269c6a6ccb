"""Shared by the EBNF and Lark frontend tests: the four test languages, Lark's own Earley parser as
the oracle, and hypothesis strategies for random sentences of a Grammar and near-misses of them."""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import lark
from hypothesis import strategies as st

from stencil.grammar.ebnf import ebnf_to_grammar
from stencil.grammar.ir import (
    Alt,
    Automaton,
    ByteClass,
    CharClass,
    Expr,
    Grammar,
    Lit,
    Ref,
    Repeat,
    Seq,
)
from stencil.grammar.lark import lark_to_grammar

GRAMMAR_DIR = Path(__file__).parent / "grammars"
LANGUAGES = ("json", "arith", "sql", "clike")
INF = float("inf")


def grammar_text(name: str, ext: str) -> str:
    return (GRAMMAR_DIR / f"{name}.{ext}").read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def lark_parser(name: str, lexer: str = "dynamic") -> lark.Lark:
    return lark.Lark(grammar_text(name, "lark"), parser="earley", lexer=lexer)


@lru_cache(maxsize=None)
def from_lark(name: str) -> Grammar:
    return lark_to_grammar(grammar_text(name, "lark"))


@lru_cache(maxsize=None)
def from_gbnf(name: str) -> Grammar:
    return ebnf_to_grammar(grammar_text(name, "gbnf"))


def lark_accepts(parser: lark.Lark, s: str) -> bool:
    try:
        parser.parse(s)
    except lark.exceptions.UnexpectedInput:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Random sentences (bounded depth) over the IR's expression trees
# ----------------------------------------------------------------------------------------------


def _height(e: Expr, h: dict[str, float]) -> float:
    """Fewest nested rule expansions needed to derive some string from ``e``."""
    if isinstance(e, (Lit, CharClass, ByteClass)):
        return 0
    if isinstance(e, Ref):
        return 1 + h[e.name]
    if isinstance(e, Seq):
        return max((_height(x, h) for x in e.items), default=0)
    if isinstance(e, Alt):
        return min((_height(x, h) for x in e.options), default=INF)
    if isinstance(e, Repeat):
        return 0 if e.lo == 0 else _height(e.body, h)
    if isinstance(e, Automaton):
        return _automaton_costs(e, h)[0][0]
    raise TypeError(e)


def _automaton_costs(e: Automaton, h: dict[str, float]) -> list[tuple[float, float]]:
    """Per state, the cheapest way to a final state: (highest label height on the path, steps)."""
    cost = [(0, 0) if q in e.finals else (INF, INF) for q in range(e.n_states)]
    changed = True
    while changed:
        changed = False
        for p, label, q in e.edges:
            c = (max(_height(label, h), cost[q][0]), cost[q][1] + 1)
            if c < cost[p]:
                cost[p] = c
                changed = True
    return cost


def rule_heights(g: Grammar) -> dict[str, float]:
    h = {n: INF for n in g.rule_names}
    changed = True
    while changed:
        changed = False
        for n, e in zip(g.rule_names, g.rule_exprs):
            v = _height(e, h)
            if v < h[n]:
                h[n] = v
                changed = True
    return h


def _pick(rnd: random.Random, ranges: tuple[tuple[int, int], ...]) -> int:
    """A member of ``ranges`` (no surrogates), usually a printable ASCII one."""
    scalar = [(a, b) for lo, hi in ranges for a, b in ((lo, min(hi, 0xD7FF)), (max(lo, 0xE000), hi)) if a <= b]
    ascii_members = [c for lo, hi in scalar for c in range(max(lo, 0x09), min(hi, 0x7E) + 1)]
    if ascii_members and rnd.random() < 0.75:
        return rnd.choice(ascii_members)
    lo, hi = rnd.choice(scalar)
    return rnd.randint(lo, hi)


def generate(g: Grammar, rnd: random.Random, depth: int = 7, max_extra: int = 2, soft_max_len: int = 80) -> str:
    """A random sentence of ``g``: beyond ``depth`` nested rules, or once ``soft_max_len`` bytes are
    out (Lark's Earley parser is slow on long inputs), it takes the shallowest choices."""
    h = rule_heights(g)
    exprs = dict(zip(g.rule_names, g.rule_exprs))
    costs: dict[int, list[float]] = {}
    out = bytearray()

    def gen(e: Expr, budget: int) -> None:
        if len(out) >= soft_max_len:
            budget = 0
        if isinstance(e, Lit):
            out.extend(e.data)
        elif isinstance(e, CharClass):
            out.extend(chr(_pick(rnd, e.ranges)).encode())
        elif isinstance(e, ByteClass):
            lo, hi = rnd.choice(e.ranges)
            out.append(rnd.randint(lo, hi))
        elif isinstance(e, Ref):
            gen(exprs[e.name], budget - 1)
        elif isinstance(e, Seq):
            for x in e.items:
                gen(x, budget)
        elif isinstance(e, Alt):
            options = [o for o in e.options if _height(o, h) < INF]
            if budget <= 0:
                best = min(_height(o, h) for o in options)
                options = [o for o in options if _height(o, h) == best]
            gen(rnd.choice(options), budget)
        elif isinstance(e, Repeat):
            hi = e.lo if budget <= 0 else e.lo + max_extra if e.hi is None else min(e.hi, e.lo + max_extra)
            for _ in range(rnd.randint(e.lo, hi)):
                gen(e.body, budget)
        elif isinstance(e, Automaton):
            cost = costs.setdefault(id(e), _automaton_costs(e, h))
            q = 0
            for _ in range(24 if budget > 0 else 0):
                arcs = [(label, t) for p, label, t in e.edges if p == q and cost[t][0] < INF]
                if q in e.finals:
                    arcs.append((None, None))
                label, t = rnd.choice(arcs)
                if label is None:
                    return
                gen(label, budget)
                q = t
            while q not in e.finals:  # the cheapest way out
                label, q = min(((label, t) for p, label, t in e.edges if p == q), key=lambda a: cost[a[1]])
                gen(label, 0)
        else:
            raise TypeError(e)

    gen(exprs[g.rule_names[g.root]], depth)
    return out.decode("utf-8")


def sentences(g: Grammar) -> st.SearchStrategy[str]:
    """Random sentences of ``g`` (hypothesis picks the seed; the failing string is in the assertion)."""
    return st.integers(0, 2**32 - 1).map(lambda seed: generate(g, random.Random(seed)))


def alphabet(*grammars: Grammar) -> str:
    """Characters worth inserting: those of the grammars' literals, plus a few blanks and strangers."""
    chars = set(" \t\n\r\"\\/*'azAZ09_.,;()[]{}é€😀ſı\u212a\x00")

    def walk(e: Expr) -> None:
        if isinstance(e, Lit):
            chars.update(e.data.decode("utf-8", "ignore"))
        for child in getattr(e, "items", ()) + getattr(e, "options", ()):
            walk(child)
        if isinstance(e, Repeat):
            walk(e.body)

    for g in grammars:
        for e in g.rule_exprs:
            walk(e)
    return "".join(sorted(chars))


@st.composite
def near_misses(draw, g: Grammar, chars: str) -> str:
    """A sentence of ``g`` with one to three random edits (delete, insert, replace, swap, duplicate, cut)."""
    s = draw(sentences(g))
    char = st.sampled_from(chars)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(s)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "swap", "duplicate", "truncate"]))
        if op == "insert" or not s:
            s = s[:i] + draw(char) + s[i:]
        elif op == "delete":
            s = s[: max(i - 1, 0)] + s[i:]
        elif op == "replace":
            i = min(i, len(s) - 1)
            s = s[:i] + draw(char) + s[i + 1 :]
        elif op == "swap":
            i = min(i, len(s) - 2)
            s = s[:i] + s[i + 1 : i + 2] + s[i : i + 1] + s[i + 2 :] if i >= 0 else s
        elif op == "duplicate":
            j = draw(st.integers(i, min(len(s), i + 6)))
            s = s[:j] + s[i:j] + s[j:]
        else:
            s = s[:i]
    return s


def mixed_strings(g: Grammar, chars: str) -> st.SearchStrategy[str]:
    """Sentences, near-misses and junk, in that order of weight."""
    return st.one_of(sentences(g), near_misses(g, chars), near_misses(g, chars), st.text(chars, max_size=16))
