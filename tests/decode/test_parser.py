"""The recognizer against an independent oracle: CYK-free exhaustive derivation on small grammars."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stencil.decode.parser import Recognizer, grammar_accepts
from stencil.errors import ParserLimitError
from stencil.grammar.ir import GrammarBuilder, Ref, alt, lit, seq


def random_cfg(data, n_rules: int):
    """A random CFG over {a, b}: each rule is a list of alternatives, each a list of symbols."""
    names = [f"R{i}" for i in range(n_rules)]
    sym = st.one_of(st.sampled_from(["a", "b"]), st.sampled_from(names))
    rules = {}
    for n in names:
        rules[n] = data.draw(st.lists(st.lists(sym, max_size=3), min_size=1, max_size=3))
    return rules


def cfg_language(rules, start: str, max_len: int) -> set[str]:
    """All strings of length <= max_len derivable from ``start`` (fixpoint over bounded-length sets)."""
    lang = {n: set() for n in rules}
    changed = True
    while changed:
        changed = False
        for n, alts in rules.items():
            for alt_ in alts:
                partial = {""}
                for s in alt_:
                    nxt = set()
                    options = lang[s] if s in rules else {s}
                    for p in partial:
                        for o in options:
                            if len(p) + len(o) <= max_len:
                                nxt.add(p + o)
                    partial = nxt
                new = partial - lang[n]
                if new:
                    lang[n] |= new
                    changed = True
    return lang[start]


def build(rules, start):
    b = GrammarBuilder()
    for n, alts in rules.items():
        b.rule(n, alt(*(seq(*(Ref(s) if s in rules else lit(s) for s in a)) if a else lit("") for a in alts)))
    b.rule("__root", Ref(start))
    return b.build("__root")


ALL = [""] + [format(i, f"0{n}b").replace("0", "a").replace("1", "b") for n in range(1, 6) for i in range(2**n)]


@settings(max_examples=120, deadline=None)
@given(st.data(), st.integers(1, 4))
def test_earley_matches_exhaustive_derivation(data, n_rules):
    """Left recursion, nullable rules, ambiguity and cycles all appear in random CFGs."""
    rules = random_cfg(data, n_rules)
    lang = cfg_language(rules, "R0", 5)
    g = build(rules, "R0")
    for s in ALL:
        assert grammar_accepts(g, s.encode()) == (s in lang), (rules, s)


def test_incremental_equals_whole_and_rollback_restores():
    b = GrammarBuilder()
    b.rule("root", Ref("e"))
    b.rule("e", alt(seq(Ref("e"), lit("+"), Ref("e")), seq(lit("("), Ref("e"), lit(")")), lit("1")))
    g = b.build()
    r = Recognizer(g)
    text = b"(1+1)+((1))+1"
    states = []
    for i, c in enumerate(text):
        states.append((r.is_accepting(), r.can_continue(), r.row_size()))
        assert r.accept_bytes(bytes([c]))
        assert r.is_accepting() == grammar_accepts(g, text[: i + 1])
    assert r.is_accepting()
    # A rejected byte changes nothing.
    before = (r.num_bytes, r.is_accepting(), r.row_size())
    assert not r.accept_bytes(b")")
    assert not r.accept_bytes(b"+1)")  # all or nothing: the "+1" prefix is undone too
    assert (r.num_bytes, r.is_accepting(), r.row_size()) == before
    for i in range(len(text), 0, -1):
        r.rollback_bytes(1)
        assert (r.is_accepting(), r.can_continue(), r.row_size()) == states[i - 1]
    with pytest.raises(ValueError):
        r.rollback_bytes(1)


def test_fork_is_independent():
    b = GrammarBuilder()
    b.rule("root", alt(lit("abc"), lit("abd")))
    r = Recognizer(b.build())
    assert r.accept_bytes(b"ab")
    f = r.fork()
    assert f.accept_bytes(b"c") and f.is_accepting()
    assert not r.is_accepting() and r.accept_bytes(b"d") and r.is_accepting()
    assert f.num_bytes == 3 and not f.accept_bytes(b"d")


def test_long_inputs_grow_storage():
    b = GrammarBuilder()
    b.rule("root", seq(lit("["), Ref("list"), lit("]")))
    b.rule("list", alt(lit(""), seq(Ref("list"), lit("x"))))  # left recursive
    data = b"[" + b"x" * 20000 + b"]"
    assert grammar_accepts(b.build(), data)


def test_pathological_ambiguity_hits_the_limit_with_a_clear_error():
    b = GrammarBuilder()
    b.rule("root", Ref("e"))
    # Every split of a^n is a parse, and with nested origins the rows grow quadratically.
    b.rule("e", alt(lit("a"), seq(Ref("e"), Ref("e")), seq(Ref("e"), Ref("e"), Ref("e"))))
    r = Recognizer(b.build(), max_items_per_row=300)
    with pytest.raises(ParserLimitError, match="more than 300 items"):
        r.accept_bytes(b"a" * 500)
    # The failed call left the state usable and unchanged.
    assert r.num_bytes == 0 and r.accept_bytes(b"aa") and r.is_accepting()


def test_grow_when_the_row_array_is_exactly_full():
    """A kernel may report GROW with the row count at the very end of row_ptr; growing must cope."""
    b = GrammarBuilder()
    b.rule("root", lit("x" * 2000))
    r = Recognizer(b.build())
    assert r.accept_bytes(b"x" * (r._row_ptr.shape[0] - 1))
    r._meta[0] = r._row_ptr.shape[0]  # as a walk that pushed one row past the end leaves it
    r._grow()
    assert r._row_ptr.shape[0] > int(r._meta[0]) + 1
