"""The GBNF frontend: against Lark's Earley parser on four languages written in both syntaxes, against
Python's own escape decoding and ``re`` for the syntax's features, and its errors."""

from __future__ import annotations

import ast
import re
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.parser import Recognizer, grammar_accepts
from stencil.errors import GrammarError
from stencil.grammar.ebnf import ebnf_to_grammar
from stencil.grammar.ir import Grammar
from tests.grammar.grammar_corpus import (
    LANGUAGES,
    alphabet,
    from_gbnf,
    lark_accepts,
    lark_parser,
    mixed_strings,
    sentences,
)

SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("name", LANGUAGES)
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_sentences_are_sentences_of_the_lark_grammar(name: str, data: st.DataObject) -> None:
    s = data.draw(sentences(from_gbnf(name)))
    assert lark_accepts(lark_parser(name), s), s


@pytest.mark.parametrize("name", LANGUAGES)
@settings(SETTINGS, max_examples=80)
@given(data=st.data())
def test_agrees_with_the_lark_grammar(name: str, data: st.DataObject) -> None:
    ours = from_gbnf(name)
    s = data.draw(mixed_strings(ours, alphabet(ours)))
    assert grammar_accepts(ours, s.encode()) == lark_accepts(lark_parser(name), s), s


@pytest.mark.parametrize("name", LANGUAGES)
@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_printed_grammar_reads_back(name: str, data: st.DataObject) -> None:
    g = from_gbnf(name)
    again = ebnf_to_grammar(g.to_ebnf())
    s = data.draw(mixed_strings(g, alphabet(g)))
    assert grammar_accepts(again, s.encode()) == grammar_accepts(g, s.encode()), s


# -- escapes: Python string literals read \n \t \r \" \\ \xHH \uHHHH \UHHHHHHHH the same way --------

scalars = st.integers(0, 0x10FFFF).filter(lambda c: not 0xD800 <= c <= 0xDFFF)


@st.composite
def escapes(draw) -> str:
    cp = draw(scalars)
    forms = [f"\\U{cp:08X}", f"\\U{cp:08x}"]
    if cp < 0x10000:
        forms.append(f"\\u{cp:04X}")
    if cp < 0x100:
        forms.append(f"\\x{cp:02x}")
    named = {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}
    if cp in named:
        forms.append(named[cp])
    elif cp >= 0x20 and chr(cp) not in "[]-^":
        forms.append(chr(cp))
    return draw(st.sampled_from(forms))


@settings(SETTINGS, max_examples=150)
@given(escapes(), escapes())
def test_escapes_mean_what_python_says(a: str, b: str) -> None:
    text = ast.literal_eval(f'"{a}{b}"')
    g = ebnf_to_grammar(f'root ::= "{a}{b}" | [{a}{b}]+ "!"')
    assert grammar_accepts(g, text.encode())
    assert grammar_accepts(g, (text[::-1] * 2 + "!").encode())
    other = chr((ord(text[0]) + 1) % 0xD800)
    assert grammar_accepts(g, (other + "!").encode()) == (other in text)


def test_class_escapes_for_brackets_dash_and_caret() -> None:
    g = ebnf_to_grammar(r"root ::= [\[\]\-\^]+")
    for c in "[]-^":
        assert grammar_accepts(g, c.encode())
    for c in "\\az":
        assert not grammar_accepts(g, c.encode())


# -- classes and negated classes, against a membership predicate ---------------------------------


@settings(SETTINGS, max_examples=100)
@given(
    st.lists(st.tuples(scalars, scalars).map(sorted), min_size=1, max_size=4),
    st.booleans(),
    st.lists(scalars, max_size=8),
)
def test_classes_and_negated_classes(ranges: list[list[int]], negated: bool, probes: list[int]) -> None:
    body = "".join(f"\\U{lo:08X}-\\U{hi:08X}" if lo != hi else f"\\U{lo:08X}" for lo, hi in ranges)
    g = ebnf_to_grammar(f"root ::= [{'^' if negated else ''}{body}]")
    edges = [c for lo, hi in ranges for c in (lo - 1, lo, hi, hi + 1) if 0 <= c <= 0x10FFFF]
    for c in probes + edges:
        if 0xD800 <= c <= 0xDFFF:
            continue
        inside = any(lo <= c <= hi for lo, hi in ranges)
        assert grammar_accepts(g, chr(c).encode()) == (inside != negated), hex(c)


def test_dot_is_any_code_point() -> None:
    g = ebnf_to_grammar("root ::= . .")
    for s in ["ab", "\n\x00", "é😀", "\U0010ffff\u0080"]:
        assert grammar_accepts(g, s.encode())
    for s in ["a", "abc", "😀"]:
        assert not grammar_accepts(g, s.encode())


# -- bounded repetition, against re -------------------------------------------------------------


@settings(SETTINGS, max_examples=150)
@given(
    st.integers(0, 4),
    st.one_of(st.none(), st.integers(0, 4)),
    st.sampled_from(["{m}", "{m,}", "{m,n}", "{ m , n }"]),
    st.lists(st.sampled_from(["ab", "c", "a", "b"]), max_size=8),
)
def test_bounded_repetition(m: int, n: int | None, form: str, pieces: list[str]) -> None:
    if form in ("{m,n}", "{ m , n }"):
        n = m if n is None else max(m, n)
    bounds = form.replace("m", str(m)).replace("n", str(n))
    g = ebnf_to_grammar(f'root ::= ("ab" | "c"){bounds} "."')
    regex = re.compile(f"(?:ab|c){bounds.replace(' ', '')}\\.")
    s = "".join(pieces) + "."
    assert grammar_accepts(g, s.encode()) == (regex.fullmatch(s) is not None), (bounds, s)


# -- layout: comments, line breaks where GBNF allows them, CRLF -----------------------------------

LAYOUT = (
    "# a leading comment\r\n"
    "\n"
    "root ::= # a comment right after ::=\n"
    "  greeting ( \",\" ws   # newlines are fine inside parentheses\n"
    "     name )*\n"
    "greeting ::= \"hi\" |  # and after '|'\n"
    "  \"hello\"\n"
    "  | \"hey\"   # a continuation line may start with '|' (extension)\n"
    "name ::= [a-c]+\r\n"
    "ws ::= \" \"?\n"
    "# a trailing comment"
)


@settings(SETTINGS, max_examples=150)
@given(st.lists(st.sampled_from(["hi", "hello", "hey", ",", " ", "a", "bc", "#"]), max_size=6))
def test_layout_comments_and_newlines(pieces: list[str]) -> None:
    g = _layout_grammar()
    s = "".join(pieces)
    assert grammar_accepts(g, s.encode()) == (re.fullmatch(r"(?:hi|hello|hey)(?:, ?[a-c]+)*", s) is not None), s


@lru_cache(maxsize=None)
def _layout_grammar() -> Grammar:
    return ebnf_to_grammar(LAYOUT)


def test_special_tokens_match_their_symbol_never_text() -> None:
    g = ebnf_to_grammar('root ::= "a" ( <|im_end|> | <think> "b" )')
    assert set(g.special_tokens) == {"<|im_end|>", "<think>"}
    assert not grammar_accepts(g, b"a<|im_end|>")
    for name, tail in (("<|im_end|>", b""), ("<think>", b"b")):
        r = Recognizer(g)
        assert r.accept_bytes(b"a") and r.accept_symbol(256 + g.special_tokens.index(name))
        assert r.is_accepting() == (tail == b"")
        assert r.accept_bytes(tail) and r.is_accepting()


def test_start_rule_can_be_named() -> None:
    g = ebnf_to_grammar('top ::= "a" rest\nrest ::= "b"*\n', root="top")
    assert grammar_accepts(g, b"abb") and not grammar_accepts(g, b"b")


# -- errors: typed, with line and column -------------------------------------------------------

ERRORS = [
    ('root ::= "a" foo\n', 1, 14, "undefined rule 'foo'"),
    ('root ::= "a"\nroot ::= "b"\n', 2, 1, "defined twice"),
    ('root ::= "abc\n', 1, 10, "unterminated string"),
    ("root ::= [a-z\n", 1, 10, "unterminated character class"),
    ('root ::= "a\\qb"\n', 1, 12, "bad escape"),
    ('root ::= "\\x4"\n', 1, 11, "2 hex digits"),
    ('root ::= "\\U00110000"\n', 1, 11, "beyond U+10FFFF"),
    ('root ::= [\\uD800]\nx ::= "\\uDFFF"\n', 2, 8, "surrogate"),
    ('root ::=\n  "a"{3,2}\n', 2, 6, "bad repetition bounds"),
    ('root ::= "a"{,2}\n', 1, 14, "expected a number"),
    ('root ::= "a"{2 3}\n', 1, 16, "expected ',' or '}'"),
    ('root ::= "a"{2,3\n', 1, 17, "expected '}'"),
    ('start ::= "a"\n', 1, 1, "start rule 'root' is not defined"),
    ('root ::= "a" )\n', 1, 14, "expected the end of the rule"),
    ('root ::= ("a"\n  "b"\n', 3, 1, "expected ')'"),
    ('root = "a"\n', 1, 6, "expected '::='"),
    ('root ::= *"a"\n', 1, 10, "must follow an item"),
    ('root ::= "a"\n"b"\n', 2, 1, "expected a rule name"),
    ("root ::= []\n", 1, 10, "empty character class"),
    ("root ::= [z-a]\n", 1, 11, "bad character range"),
    ('root ::= "a" <|im_end|\n', 1, 14, "unterminated special token"),
    ("root ::= <[42]>\n", 1, 10, "token ids"),
    ('root ::= "a"\n# ok\n  other ::= "b" "c\n', 3, 17, "unterminated string"),
]


@pytest.mark.parametrize("text,line,column,words", ERRORS)
def test_errors_say_what_and_where(text: str, line: int, column: int, words: str) -> None:
    with pytest.raises(GrammarError) as e:
        ebnf_to_grammar(text)
    assert words in str(e.value)
    assert (e.value.line, e.value.column) == (line, column)
