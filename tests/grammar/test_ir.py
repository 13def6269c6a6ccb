"""The IR: UTF-8 lowering is exact, and determinizing/minimizing never changes a rule's language."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stencil.decode.parser import grammar_accepts
from stencil.errors import GrammarError
from stencil.grammar.ir import (
    Alt,
    CharClass,
    GrammarBuilder,
    GrammarLimits,
    Ref,
    Repeat,
    alt,
    chars,
    complement_ranges,
    lit,
    normalize_ranges,
    opt,
    plus,
    seq,
    star,
    utf8_ranges,
)


def one_rule(expr, **kw):
    b = GrammarBuilder(**kw)
    b.rule("root", expr)
    return b.build("root")


def test_utf8_ranges_cover_exactly_the_encodings_of_every_code_point():
    """Exhaustive over all 1.1M code points: a byte path matches iff it is the code point's UTF-8."""
    paths = utf8_ranges([(0, 0x10FFFF)])

    def matches(data: bytes) -> bool:
        return any(len(p) == len(data) and all(lo <= b <= hi for b, (lo, hi) in zip(data, p)) for p in paths)

    for cp in list(range(0, 0x800, 7)) + list(range(0x800, 0x10FFFF, 331)) + [0x7F, 0x80, 0x7FF, 0xFFFF, 0x10000, 0x10FFFF]:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        assert matches(chr(cp).encode()), hex(cp)
    # Surrogates and overlong / out-of-range forms never match.
    for bad in [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xf0\x80\x80\x80",
                b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\x80", b"\xff"]:
        assert not matches(bad), bad


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x10FFFF), st.integers(0, 0x3000)), min_size=1, max_size=4),
       st.lists(st.integers(0, 0x10FFFF), min_size=1, max_size=40))
def test_char_class_accepts_exactly_its_code_points(spans, probes):
    ranges = normalize_ranges((lo, min(lo + w, 0x10FFFF)) for lo, w in spans)
    g = one_rule(CharClass(ranges))
    for lo, hi in ranges:
        probes += [lo, hi, max(lo - 1, 0), min(hi + 1, 0x10FFFF)]
    for cp in probes:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        inside = any(lo <= cp <= hi for lo, hi in ranges)
        assert grammar_accepts(g, chr(cp).encode()) == inside, hex(cp)


def test_negated_class_is_the_complement():
    cc = chars(("a", "z"), "_")
    neg = cc.negate()
    assert complement_ranges(neg.ranges, 0x10FFFF) == cc.ranges
    g = one_rule(neg)
    assert grammar_accepts(g, "é".encode()) and grammar_accepts(g, b"A")
    assert not grammar_accepts(g, b"q") and not grammar_accepts(g, b"_")


# Random expression trees over a tiny alphabet, checked against Python's re on all short strings.
_atoms = st.sampled_from(["a", "b", "ab", ""])


def _exprs():
    leaf = _atoms.map(lambda s: (lit(s), re.escape(s)))
    cls = st.just((chars("a", "c"), "[ac]"))

    def extend(children):
        pair = st.tuples(children, children)
        return st.one_of(
            pair.map(lambda p: (seq(p[0][0], p[1][0]), f"(?:{p[0][1]})(?:{p[1][1]})")),
            pair.map(lambda p: (alt(p[0][0], p[1][0]), f"(?:{p[0][1]})|(?:{p[1][1]})")),
            children.map(lambda c: (star(c[0]), f"(?:{c[1]})*")),
            children.map(lambda c: (plus(c[0]), f"(?:{c[1]})+")),
            children.map(lambda c: (opt(c[0]), f"(?:{c[1]})?")),
            st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
                lambda t: (Repeat(t[0][0], t[1], t[1] + t[2]), f"(?:{t[0][1]}){{{t[1]},{t[1] + t[2]}}}")
            ),
        )

    return st.recursive(st.one_of(leaf, cls), extend, max_leaves=6)


def _strings(max_len=5):
    out = [""]
    frontier = [""]
    for _ in range(max_len):
        frontier = [s + c for s in frontier for c in "abc"]
        out += frontier
    return out


ALL_SHORT = _strings()


@settings(max_examples=80, deadline=None)
@given(_exprs())
def test_minimized_automaton_language_equals_regex(pair):
    expr, pattern = pair
    g = one_rule(expr)
    for s in ALL_SHORT:
        assert grammar_accepts(g, s.encode()) == bool(re.fullmatch(pattern, s)), (pattern, s)


def test_rules_nullable_and_recursive():
    b = GrammarBuilder()
    b.rule("root", seq(Ref("A"), lit("x"), Ref("B")))
    b.rule("A", alt(lit(""), seq(lit("("), Ref("A"), lit(")"))))
    b.rule("B", opt(Ref("B2")))
    b.rule("B2", lit("y"))
    g = b.build()
    assert list(g.rule_nullable[[g.rule_id("A"), g.rule_id("B"), g.rule_id("B2")]]) == [1, 1, 0]
    for s, ok in [("x", True), ("(())xy", True), ("(()x", False), ("xyy", False)]:
        assert grammar_accepts(g, s.encode()) == ok, s


def test_builder_errors_are_typed():
    b = GrammarBuilder()
    b.rule("root", Ref("missing"))
    with pytest.raises(GrammarError, match="undefined rule 'missing'"):
        b.build()
    with pytest.raises(GrammarError, match="defined twice"):
        b.rule("root", lit("x"))
    with pytest.raises(GrammarError, match="start rule"):
        GrammarBuilder().build("root")
    with pytest.raises(GrammarError, match="repetition"):
        one_rule(Repeat(lit("a"), 3, 2))
    with pytest.raises(GrammarError, match="too large"):
        one_rule(Repeat(Repeat(lit("ab"), 100, 100), 100, 100), limits=GrammarLimits(max_nfa_states=5000))


def test_empty_language_and_empty_string():
    assert not grammar_accepts(one_rule(Alt(())), b"")
    assert grammar_accepts(one_rule(lit("")), b"")
    assert not grammar_accepts(one_rule(lit("")), b"a")


def test_ebnf_printout_reparses_to_the_same_language():
    from stencil.grammar.ebnf import ebnf_to_grammar

    b = GrammarBuilder()
    b.rule("root", seq(lit('say "hi"\n'), Ref("item"), star(seq(lit(","), Ref("item")))))
    b.rule("item", alt(plus(chars(("0", "9"))), seq(chars(("a", "f"), "é").negate(), Repeat(lit("z"), 1, 3))))
    g = b.build()
    g2 = ebnf_to_grammar(g.to_ebnf())
    for s in ['say "hi"\n1,2', 'say "hi"\nxz,12,Qzzz', 'say "hi"\nézz', 'say "hi"\n1,', 'say "hi"\nqzzzz']:
        assert grammar_accepts(g, s.encode()) == grammar_accepts(g2, s.encode()), s


def test_rule_bodies_shared_across_grammars_keep_their_own_references():
    """Identical rule bodies share one cached automaton; each grammar binds its own rule ids and specials."""
    import numpy as np

    from stencil.decode.parser import Recognizer
    from stencil.grammar.ir import Special

    body = seq(Ref("x"), lit(","), Ref("y"), opt(Special("<|end|>")))
    b1 = GrammarBuilder()
    b1.rule("root", body)
    b1.rule("x", lit("a"))
    b1.rule("y", lit("b"))
    g1 = b1.build()
    b2 = GrammarBuilder()  # the same body two rules deep, other rules first, another special first
    b2.rule("root", seq(Ref("y"), Ref("w")))
    b2.rule("w", body)
    b2.rule("y", alt(lit("2"), Special("<|tool|>")))
    b2.rule("x", lit("1"))
    g2 = b2.build()
    assert g2.special_tokens == ["<|tool|>", "<|end|>"]

    def accepts(g, syms):
        r = Recognizer(g)
        return r.accept_symbols(np.array(syms, np.int32)) and r.is_accepting()

    end1, tool2, end2 = 256 + g1.special_tokens.index("<|end|>"), 256, 257
    for syms, ok in [(b"a,b", True), (b"a,b" + bytes([0]), False), (b"1,2", False)]:
        assert accepts(g1, list(syms)) == ok
    assert accepts(g1, [*b"a,b", end1])
    assert accepts(g2, [*b"21,2", end2]) and accepts(g2, [tool2, *b"1,", tool2])
    assert not accepts(g2, [*b"21,2", tool2]) and not accepts(g2, list(b"2a,b"))
