"""The Lark frontend against Lark's own Earley parser (``lexer="dynamic"``), Python's ``re``, and its errors."""

from __future__ import annotations

import re
from functools import lru_cache

import lark
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.parser import grammar_accepts
from stencil.errors import GrammarError
from stencil.grammar.ir import Grammar
from stencil.grammar.lark import lark_to_grammar
from tests.grammar.grammar_corpus import (
    LANGUAGES,
    alphabet,
    from_gbnf,
    from_lark,
    lark_accepts,
    lark_parser,
    mixed_strings,
    near_misses,
    sentences,
)

SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("name", LANGUAGES)
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_sentences_are_accepted_by_lark_and_by_us(name: str, data: st.DataObject) -> None:
    # Sentences of our lowering (sound: Lark must accept them) and of the GBNF version, which is
    # written independently (complete: we must accept them).
    source = data.draw(st.sampled_from([from_lark(name), from_gbnf(name)]))
    s = data.draw(sentences(source))
    assert lark_accepts(lark_parser(name), s), s
    assert grammar_accepts(from_lark(name), s.encode()), s


@pytest.mark.parametrize("name", LANGUAGES)
@settings(SETTINGS, max_examples=80)
@given(data=st.data())
def test_near_misses_and_junk_agree_with_lark(name: str, data: st.DataObject) -> None:
    ours = from_lark(name)
    s = data.draw(st.one_of(mixed_strings(from_gbnf(name), alphabet(ours)), near_misses(ours, alphabet(ours))))
    assert grammar_accepts(ours, s.encode()) == lark_accepts(lark_parser(name), s), s


def assert_agrees_with_lark(text: str, examples: int, lexer: str = "dynamic", extra: list[str] = ()) -> None:
    """Our lowering of ``text`` and Lark's Earley parser agree on random strings and on ``extra``."""
    ours = lark_to_grammar(text)
    parser = lark.Lark(text, parser="earley", lexer=lexer)
    for s in extra:
        assert grammar_accepts(ours, s.encode()) == lark_accepts(parser, s), s

    @settings(SETTINGS, max_examples=examples)
    @given(mixed_strings(ours, alphabet(ours)))
    def check(s: str) -> None:
        assert grammar_accepts(ours, s.encode()) == lark_accepts(parser, s), s

    check()


def test_operators_and_rule_forms() -> None:
    # Fixed-length terminals only, so Lark's dynamic lexer has no choices to commit to.
    assert_agrees_with_lark(
        """
        start: item~2..3 opt? rep* [br] plus+ _hidden? alias_rule kept ~ 2
        ?item: "a" | "b" | "(" item ")"
        opt: "c"
        rep: "ab" | "c" -> renamed
        br: "ba"
        plus: "c"
        _hidden: "bb"
        ?alias_rule: "a" -> named
                   | "cc"
        !kept: "b"
        """,
        examples=150,
        extra=["abcabbacacabb", "(a)bcccbbaccbb", "abca", ""],
    )


def test_terminals_imports_ignores_override_extend() -> None:
    assert_agrees_with_lark(
        r"""
        start: word ("," word)* NUMBER?
        word: WORD | ALT | W2
        WORD: LETTER~1..2 DIGIT? "!"
        ALT: "x".."z" ("-" | "+")
        LETTER: "a".."b"
        NUMBER: "#" SIGNED_INT
        %import common (DIGIT, SIGNED_INT)
        %import common.HEXDIGIT -> W2
        %override W2: "q" "q"?
        %extend ALT: "w"
        %ignore " "
        %ignore /;[^\n]*\n/
        """,
        examples=150,
        extra=["a1!, x- , qq #-3", " ;c\nab!;\n", "w,w", "ab1!#", "a!,", ";x"],
    )


def test_lazy_terminals_keep_their_shortest_match() -> None:
    # C_COMMENT is "/*" /(.|\n)*?/ "*/": Lark's regex stops at the first "*/".
    assert_agrees_with_lark(
        r"""
        start: (NAME | QUOTED)*
        NAME: /[a-z]+/
        QUOTED: /<.*?>/
        %import common.C_COMMENT
        %import common.WS
        %ignore C_COMMENT
        %ignore WS
        """,
        examples=150,
        extra=["a /* x */ b", "a /* x */ b */", "/* a */ b */", "<a> <b>", "<a>b>", "/*/", "/**/ /* * / */"],
    )


def test_escaped_string_idiom_is_exact() -> None:
    assert_agrees_with_lark(
        r"""
        start: (STR | SQ)*
        SQ: "'" _STRING_ESC_INNER "'"
        %import common.ESCAPED_STRING -> STR
        %import common._STRING_ESC_INNER
        %import common.WS
        %ignore WS
        """,
        examples=150,
        extra=[r'"a\"b"', r'"a\\" "b"', r'"a\\\"', r"'it\'s' 'x\\'", '"a"b"', "'\\\n'", '"\\é"'],
    )


# Python re semantics of terminal regexes: the language is re.fullmatch's.
REGEXES = [
    (r"[a-z]+\d*", ""),
    (r"[a-z]+\d*", "i"),
    (r"(?:ab|cd)+ k", "i"),
    (r"\w+", ""),
    (r"\s+", ""),
    (r"\D\W\S", ""),
    (r"[^\w\s]+", "i"),
    (r"a.b", ""),
    (r"a.b", "s"),
    (r"[]a]+", ""),
    (r"x{2,3} y?  # a comment", "x"),
    (r"[\d_]+ [ ] z", "xi"),
    (r"(?P<n>é|É)+", "iu"),
    (r"k|s|i", "im"),
]
SPECIALS = "aAbBcCdDkKsSiIxXyYzZ_ .#é\u00c9\u212a\u017f\u0131\u0130\u0663\u00a0\u2028\x1c\n\r\t]1\u00b5\u03bc"


@pytest.mark.parametrize("pattern,flags", REGEXES)
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_regex_terminals_follow_python_re(pattern: str, flags: str, data: st.DataObject) -> None:
    ours = _terminal_grammar(pattern, flags)
    python = re.compile(pattern, sum(getattr(re, f.upper()) for f in flags))
    s = data.draw(st.one_of(st.text(SPECIALS, max_size=6), near_misses(ours, SPECIALS)))
    assert grammar_accepts(ours, s.encode()) == (python.fullmatch(s) is not None), s


@lru_cache(maxsize=None)
def _terminal_grammar(pattern: str, flags: str) -> Grammar:
    return lark_to_grammar(f"start: T\nT: /{pattern}/{flags}\n")


CASED = "aAkKsSiI\u212a\u017f\u0131\u0130ß\u1e9e\u00b5\u03bc\u039c"


@settings(SETTINGS, max_examples=60)
@given(st.text(CASED, min_size=1, max_size=4), st.lists(st.text(CASED, max_size=4), max_size=4))
def test_case_insensitive_strings_follow_python_re(word: str, probes: list[str]) -> None:
    g = lark_to_grammar(f'start: "{word}"i\n')
    for s in probes + [word.swapcase(), word.upper(), word.lower()]:
        assert grammar_accepts(g, s.encode()) == (re.fullmatch(re.escape(word), s, re.IGNORECASE) is not None), s


NATURAL_SQL = r"""
start: "select"i columns "from"i NAME ("where"i cond)? ";"?
columns: "*" | NAME ("," NAME)*
?cond: NAME "=" (NAME | NUMBER) | cond "and"i cond
NAME: /[a-z_][a-z0-9_]*/i
NUMBER: /[0-9]+/
%ignore /[ \t\n]+/
"""


def test_greedy_terminals_equal_lark_dynamic_complete() -> None:
    # With %ignore, a NAME can abut a keyword. Lark's dynamic lexer commits NAME to its longest
    # match; we (and lexer="dynamic_complete") also allow the shorter ones.
    assert_agrees_with_lark(
        NATURAL_SQL, examples=100, lexer="dynamic_complete", extra=["select afrom t", "select a from twhere x=1"]
    )
    ours = lark_to_grammar(NATURAL_SQL)
    dynamic = lark.Lark(NATURAL_SQL, parser="earley", lexer="dynamic")
    assert grammar_accepts(ours, b"select afrom t") and not lark_accepts(dynamic, "select afrom t")
    assert lark_accepts(dynamic, "select a from t") and grammar_accepts(ours, b"select a from t")


def test_ignore_brackets_every_terminal() -> None:
    g = lark_to_grammar('start: "a" B\nB: "b"\n%ignore " "\n')
    assert g.rule_names[g.root] == "__root"
    for s in ["ab", " a b ", "  a  b", "a b  "]:
        assert grammar_accepts(g, s.encode())
    for s in ["a", " b", "a  "]:
        assert not grammar_accepts(g, s.encode())


def test_start_and_import_paths(tmp_path) -> None:
    (tmp_path / "mylib.lark").write_text('GREETING: "hi" | "yo"\n')
    g = lark_to_grammar("top: GREETING\n%import mylib.GREETING\n", start="top", import_paths=[str(tmp_path)])
    assert grammar_accepts(g, b"yo") and not grammar_accepts(g, b"hey")


ERRORS = [
    ("start: a\n", 1, 8, "undefined rule 'a'"),
    ('start: "a"\nstart: "b"\n', 2, 1, "defined twice"),
    ('start.2: "a"\n', 1, 7, "priority"),
    ('start: A\nA.2: "a"\n', 2, 3, "priority"),
    ("start: x{a}\nx{p}: p\n", 1, 8, "templates"),
    ("start: A\n%declare A\n", 2, 10, "%declare"),
    ("start: /(?<=a)b/\n", 1, 8, "lookbehind"),
    ("start: /a$/\n", 1, 8, "anchor"),
    ("start: /[a-/\n", 1, 8, "bad regex"),
    ("start: /a/l\n", 1, 8, "flag 'l'"),
    ('start: "a" ~ 3..2\n', 1, 14, "bad repetition"),
    ("start: A\n%import nosuch.A\n", 2, 9, "cannot %import"),
    ('start: "a"\n  | )\n', 2, 5, "syntax"),
    ('start: "a" @\n', 1, 12, "syntax"),
    ('start: ""\n', 1, 8, "Empty terminals"),
    ('start: "a"\n%ignore B\n', 2, 9, "undefined terminal 'B'"),
    ('start: "a"\n\nstart2: b\n', 3, 9, "undefined rule 'b'"),
]


@pytest.mark.parametrize("text,line,column,words", ERRORS)
def test_errors_say_what_and_where(text: str, line: int, column: int, words: str) -> None:
    with pytest.raises(GrammarError) as e:
        lark_to_grammar(text)
    assert words in str(e.value)
    assert (e.value.line, e.value.column) == (line, column)


def test_missing_start_rule() -> None:
    with pytest.raises(GrammarError, match="start rule 'start' is not defined"):
        lark_to_grammar('x: "a"\n')
    g = lark_to_grammar('x: "a"\n', start="x")
    assert grammar_accepts(g, b"a")
