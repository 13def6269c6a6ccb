"""Regex frontend against Python's ``re`` as the oracle.

The frontend implements ECMA-262 character semantics (see ``stencil/grammar/regex.py``). Python's
``re`` agrees once (a) ``re.ASCII`` is set (``\\d``, ``\\w`` become ASCII) and (b) the few constructs
whose meaning differs are rewritten textually into explicit Python classes: ``\\s``/``\\S`` become
ECMA-262's whitespace set, built here from ``unicodedata`` (category Zs) plus the characters ECMA-262
names; ``.`` excludes ECMA-262's four line terminators; ``$`` becomes ``\\Z`` (Python's ``$`` also
matches before a final newline). Syntax only ECMA-262 has (``(?<n>``, ``\\u{..}``, escaped surrogate
pairs) is rewritten to its Python spelling. The rewrite is a lexer, not a parser, so it shares no
logic with the frontend.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import unicodedata
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stencil.decode.parser import grammar_accepts
from stencil.errors import GrammarError, RegexError
from stencil.grammar.ir import CharClass, Lit
from stencil.grammar.regex import MAX_GROUP_DEPTH, regex_grammar, regex_to_expr
from tests.conftest import jsonschemabench_records, shared_path

# Python (and hypothesis, parsing the same patterns) warns about "[[" and "--" inside classes.
pytestmark = pytest.mark.filterwarnings("ignore:Possible (nested set|set difference):FutureWarning")

# ----------------------------------------------------------------------------------------------
# The oracle: ECMA-262 pattern -> equivalent Python pattern (used with re.ASCII)
# ----------------------------------------------------------------------------------------------

ECMA_SPACE_CHARS = frozenset(
    {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Zs"}
    | set("\t\n\v\f\r\ufeff\u2028\u2029")  # ECMA-262 WhiteSpace and LineTerminator code points
)
_SPACE_BODY = "".join(f"\\U{ord(c):08x}" for c in sorted(ECMA_SPACE_CHARS))
_DOT = r"[^\n\r\u2028\u2029]"
_HEX = "0123456789abcdefABCDEF"


class NoOracle(Exception):
    """Python cannot express this pattern's ECMA-262 meaning; the reason is the message."""


def to_python(p: str) -> str:
    """Rewrite an ECMA-262 pattern into a Python pattern with the same language under re.ASCII."""
    out: list[str] = []
    i = 0
    in_class = False
    while i < len(p):
        c = p[i]
        if c == "\\":
            nxt = p[i + 1 : i + 2]
            if nxt == "s":
                out.append(_SPACE_BODY if in_class else f"[{_SPACE_BODY}]")
                i += 2
            elif nxt == "S":
                if in_class:
                    raise NoOracle("\\S inside a class: Python cannot complement an explicit set there")
                out.append(f"[^{_SPACE_BODY}]")
                i += 2
            elif nxt in ("p", "P"):
                raise NoOracle("Python re has no \\p{..} property escapes")
            elif nxt == "c" and p[i + 2 : i + 3].isalpha():
                out.append(f"\\x{ord(p[i + 2]) % 32:02x}")
                i += 3
            elif nxt == "u" and p[i + 2 : i + 3] == "{":
                end = p.index("}", i)
                out.append(f"\\U{int(p[i + 3 : end], 16):08x}")
                i = end + 1
            elif nxt == "u" and re.fullmatch(r"\\u[dD][89abAB]\w\w\\u[dD][c-fC-F]\w\w", p[i : i + 12]):
                hi, lo = int(p[i + 2 : i + 6], 16), int(p[i + 8 : i + 12], 16)
                out.append(f"\\U{0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00):08x}")
                i += 12
            else:
                out.append(p[i : i + 2])
                i += 2
            continue
        if in_class:
            in_class = c != "]"
            out.append(c)
        elif c == "[":
            in_class = True
            out.append(c)
            # A leading "^" and a "]" right after the opening bracket are part of the class.
            j = i + 1 + (p[i + 1 : i + 2] == "^")
            if p[j : j + 1] == "]":
                j += 1
            out.append(p[i + 1 : j])
            i = j
            continue
        elif c == ".":
            out.append(_DOT)
        elif c == "$":
            out.append(r"\Z")
        elif p.startswith("(?<", i) and not p.startswith(("(?<=", "(?<!"), i):
            out.append("(?P<")
            i += 3
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def compile_oracle(p: str) -> re.Pattern:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Python warns about "[[" and "--" inside classes
        return re.compile(to_python(p), re.ASCII)


def no_surrogates(s: str) -> bool:
    return not any("\ud800" <= ch <= "\udfff" for ch in s)


# Characters on which the dialects or UTF-8 widths differ, mixed into random and mutated strings.
TRICKY = list("aZ09_-.{}[]()/\\@: \t\n\r\v\f\x00\x1c\x85\xa0\u2028\u2029\ufeff\u3000\u00e9\u0663\u4e2d") + [
    "\U0001f600"
]


SHORT = 16


def nested_quantifiers(p: str) -> bool:
    """Whether a quantified group contains a quantifier (lexical scan; escapes and classes skipped)."""
    inner: list[bool] = []  # per open group: has it a quantifier inside?
    i = 0
    while i < len(p):
        c = p[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            j = i + 1 + (p[i + 1 : i + 2] == "^")
            j += p[j : j + 1] == "]"
            while j < len(p) and p[j] != "]":
                j += 2 if p[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            inner.append(False)
        elif c == ")" and inner:
            had = inner.pop()
            if had and p[i + 1 : i + 2] in ("*", "+", "{"):
                return True
            if inner:
                inner[-1] = inner[-1] or had
        elif c in "*+{" and inner:
            inner[-1] = True
        i += 1
    return False


@st.composite
def mutated(draw, base: st.SearchStrategy[str], alphabet: list[str]) -> str:
    """A near miss: a string from ``base`` with one insertion, deletion, replacement, truncation or append."""
    s = draw(base)
    op = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "append"]))
    i = draw(st.integers(0, len(s)))
    c = draw(st.sampled_from(alphabet))
    if op == "insert":
        return s[:i] + c + s[i:]
    if op == "delete":
        return s[:i] + s[i + 1 :]
    if op == "replace":
        return s[:i] + c + s[i + 1 :]
    if op == "truncate":
        return s[:i]
    return s + c


def candidates(pattern: str, *, fullmatch: bool) -> st.SearchStrategy[str]:
    """Strings matching the pattern, near misses of them, and random text over relevant characters.

    Generation uses the rewritten pattern without re.ASCII (hypothesis cannot generate from some
    re.ASCII patterns), so it also yields non-ASCII digits and letters: near misses for free.
    """
    alphabet = sorted(set(pattern) | set(TRICKY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = re.compile(to_python(pattern))
    generated = st.from_regex(source, fullmatch=fullmatch).filter(no_surrogates)
    if nested_quantifiers(pattern):
        # Python's backtracking takes exponential time on near misses of such patterns; short
        # strings keep the oracle fast (truncation just makes more near misses).
        generated = generated.map(lambda s: s[:SHORT])
    return st.one_of(
        generated,
        mutated(generated, alphabet),
        st.text(st.sampled_from(alphabet), max_size=12),
    )


OUTCOMES: dict[str, int] = {"accept": 0, "reject": 0}

FAST = settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def check_agreement(pattern: str, *, anchored: bool, max_examples: int = 15) -> None:
    """Hypothesis: the grammar for ``pattern`` and the oracle agree on generated strings."""
    oracle = compile_oracle(pattern)
    grammar = regex_grammar(pattern, anchored=anchored)
    match = oracle.fullmatch if anchored else oracle.search

    @settings(FAST, max_examples=max_examples)
    @given(candidates(pattern, fullmatch=anchored))
    def agree(s: str) -> None:
        assume(no_surrogates(s))
        expected = match(s) is not None
        got = grammar_accepts(grammar, s.encode("utf-8"))
        OUTCOMES["accept" if expected else "reject"] += 1
        assert got == expected, f"pattern {pattern!r} anchored={anchored} on {s!r}: oracle {expected}, grammar {got}"

    agree()


# ----------------------------------------------------------------------------------------------
# Patterns from JSON Schema Bench
# ----------------------------------------------------------------------------------------------

_DATA_KEYWORDS = {"enum", "const", "default", "examples", "example"}


def _collect_patterns(node: object, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _DATA_KEYWORDS:
                continue
            if k == "pattern" and isinstance(v, str):
                out.add(v)
            if k == "patternProperties" and isinstance(v, dict):
                out.update(v)
            _collect_patterns(v, out)
    elif isinstance(node, list):
        for v in node:
            _collect_patterns(v, out)


@functools.lru_cache(maxsize=None)
def bench_patterns() -> tuple[str, ...]:
    """Every distinct ``pattern`` and ``patternProperties`` key in jsonschemabench/dev, sorted."""
    pats: set[str] = set()
    for rec in jsonschemabench_records():
        _collect_patterns(rec["schema"], pats)
    return tuple(sorted(pats))


def _frontend_verdict(p: str) -> RegexError | None:
    """None if the frontend supports ``p``; its RegexError otherwise (any other exception propagates)."""
    try:
        regex_to_expr(p)
    except RegexError as e:
        return e
    return None


_BIG_COUNT = re.compile(r"\{\d*,?(\d{3,}|[2-9]\d{2})\}")
SAMPLE_SIZE = 240
SHARDS = 8


@functools.lru_cache(maxsize=None)
def oracle_sample() -> tuple[tuple[str, ...], dict[str, int]]:
    """A fixed sample of supported bench patterns (ordered by hash) with the exclusion counts."""
    excluded: dict[str, int] = {}
    sample = []
    for p in sorted(bench_patterns(), key=lambda p: hashlib.sha256(p.encode()).hexdigest()):
        if _frontend_verdict(p) is not None:
            continue
        try:
            to_python(p)
        except NoOracle as e:
            excluded[str(e)] = excluded.get(str(e), 0) + 1
            continue
        if _BIG_COUNT.search(p):
            # The IR unrolls bounded repetition; counts over 200 make the build alone take seconds.
            reason = "repetition count over 200 (build time)"
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        if len(sample) < SAMPLE_SIZE:
            sample.append(p)
    return tuple(sample), excluded


def test_bench_patterns_are_mostly_supported_and_fail_cleanly() -> None:
    pats = bench_patterns()
    assert len(pats) >= 500
    unsupported = {p: e for p in pats if (e := _frontend_verdict(p)) is not None}
    for p, e in unsupported.items():
        assert 0 <= e.position <= len(p), (p, e.position)
        assert e.pattern == p
    supported = len(pats) - len(unsupported)
    assert supported / len(pats) >= 0.95, sorted(unsupported.items(), key=str)[:20]


def test_every_supported_bench_pattern_has_a_python_counterpart() -> None:
    """What we accept, Python accepts too once rewritten (a syntax we over-accept would show here)."""
    excluded = 0
    for p in bench_patterns():
        if _frontend_verdict(p) is not None:
            continue
        try:
            compile_oracle(p)
        except NoOracle:
            excluded += 1
    sample, reasons = oracle_sample()
    assert len(sample) == SAMPLE_SIZE
    assert excluded <= 0.05 * len(bench_patterns()), reasons


@pytest.mark.parametrize("shard", range(SHARDS))
def test_bench_patterns_fullmatch_agree_with_re(shard: int) -> None:
    sample, _ = oracle_sample()
    for p in sample[shard::SHARDS]:
        check_agreement(p, anchored=True, max_examples=12)


def test_bench_patterns_search_agree_with_re() -> None:
    """JSON Schema ``pattern`` semantics (unanchored search) against ``re.search``."""
    sample, _ = oracle_sample()
    for p in sample[:60]:
        check_agreement(p, anchored=False, max_examples=10)


# ----------------------------------------------------------------------------------------------
# Hand-written hard cases
# ----------------------------------------------------------------------------------------------

HARD = [
    # nested and stacked quantifiers
    r"(a|b*)*c",
    r"((ab)?c+){2,3}",
    r"(a*)*",
    r"(a?){5}b",
    r"(?:x{2}y?){0,3}z",
    r"a+?b??c*?d{1,2}?e{2,}?",
    # classes with escapes and odd members
    r"[\]\-\\^]+",
    r"[\d\s.]+",
    r"[^\W_]+",
    r"[\D]\W\S",
    r"[-a][a-][a-c-e][--/]",
    r"[\x41-\x5a\u00e0-\u00ff]+",
    r"[\b\t\n\v\f\r\0]",
    r"[.*+?()|{}$^]+",
    r"[[]x]",
    # Unicode
    r"[α-ω]+",
    r"[\u4e00-\u9fff]{2}",
    r"[\u{1F600}-\u{1F64F}]+",
    r"😀+é?",
    r"\uD83D\uDE00\u00e9",
    r"[^a-z\u0080-\uffff]+",
    r"[^\s]+",
    r"\s\S\s*",
    # empty alternatives and groups
    r"a|",
    r"|b",
    r"(|a)+",
    r"()",
    r"a()b(?:)c",
    # literal braces
    r"a{",
    r"a{1",
    r"a{1,",
    r"a{x}",
    r"{}",
    r"x{2}{",
    r"a{1,2}b{",
    r"}",
    r"]",
    r"\{\d+\}",
    # dot, escapes, groups, anchors
    r".+",
    r"a.b",
    r"\v\f\t\r\n\0",
    r"\x41\u0042\u{43}",
    r"\cA\cz[\cJ\cm]+",
    r"\.\*\+\?\(\)\[\]\{\}\|\^\$\/\-",
    r"(?P<year>\d{4})-(?<month>\d\d)",
    r"^a|b$",
    r"(^a|b)c",
    r"(a|^b)(c|d$)",
    r"^^a$$",
    r"^$",
    r"",
    r"^",
    r"$",
    r"^(?:ab|cd)+$",
]


@pytest.mark.parametrize("pattern", HARD)
def test_hard_cases_agree_with_re(pattern: str) -> None:
    check_agreement(pattern, anchored=True, max_examples=25)
    check_agreement(pattern, anchored=False, max_examples=25)


def test_both_outcomes_were_exercised() -> None:
    """The generated strings above reached both the accepting and the rejecting path."""
    for p in (r"[a-c]+x", r"(ab|c){2}", r"\s\d"):
        check_agreement(p, anchored=True, max_examples=30)
    assert OUTCOMES["accept"] > 10 and OUTCOMES["reject"] > 10, OUTCOMES


def _class_members(pattern: str) -> set[int]:
    e = regex_to_expr(pattern)
    ranges = e.ranges if isinstance(e, CharClass) else ()
    if isinstance(e, Lit):
        cp = ord(e.data.decode())
        ranges = ((cp, cp),)
    return {c for lo, hi in ranges for c in range(lo, hi + 1) if not 0xD800 <= c <= 0xDFFF}


@functools.lru_cache(maxsize=None)
def all_text() -> str:
    """Every Unicode scalar value, in order."""
    return "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)


def all_code_points() -> set[int]:
    return set(map(ord, all_text()))


@pytest.mark.parametrize("escape", [r"\d", r"\D", r"\w", r"\W", r"\s", r"\S", r".", r"[^\s\d]", r"[\w\s-]"])
def test_character_sets_over_every_code_point(escape: str) -> None:
    """Each class escape denotes exactly the oracle's set, checked over all of Unicode."""
    expected = {ord(m.group()) for m in compile_oracle(escape).finditer(all_text())}
    assert _class_members(escape) == expected


def test_classes_with_non_space_inside() -> None:
    """``\\S`` inside a class has no Python spelling; set algebra over ECMA_SPACE_CHARS is the oracle."""
    space = set(map(ord, ECMA_SPACE_CHARS))
    assert _class_members(r"[\s\S]") == all_code_points()
    assert _class_members(r"[^\s\S]") == set()
    assert _class_members(r"[\S\d]") == all_code_points() - space
    assert _class_members(r"[^\Sa]") == space
    g = regex_grammar(r"[\s\S]+")
    assert grammar_accepts(g, "a\n\u2028\U0001f600".encode()) and not grammar_accepts(g, b"")


def test_space_and_dot_sets_are_ecma_not_python() -> None:
    """The documented choices: U+FEFF is a space, U+001C/U+0085 are not; '.' stops at \\r and U+2028."""
    g = regex_grammar(r"\s")
    assert grammar_accepts(g, "\ufeff".encode())
    assert not grammar_accepts(g, "\x1c".encode()) and not grammar_accepts(g, "\x85".encode())
    dot = regex_grammar(r".")
    for ch in "\n\r\u2028\u2029":
        assert not grammar_accepts(dot, ch.encode())
    assert grammar_accepts(dot, "\x85".encode()) and grammar_accepts(dot, "\U0001f600".encode())


@functools.lru_cache(maxsize=None)
def _categories() -> list[str]:
    return [unicodedata.category(ch) for ch in map(chr, range(sys.maxunicode + 1))]


def _by_category(pred) -> set[int]:
    return {c for c, k in enumerate(_categories()) if pred(k) and not 0xD800 <= c <= 0xDFFF}


@pytest.mark.parametrize(
    "pattern,members",
    [
        (r"\p{L}", lambda: _by_category(lambda k: k[0] == "L")),
        (r"\p{Letter}", lambda: _by_category(lambda k: k[0] == "L")),
        (r"\p{Lu}", lambda: _by_category(lambda k: k == "Lu")),
        (r"\p{gc=Uppercase_Letter}", lambda: _by_category(lambda k: k == "Lu")),
        (r"\p{LC}", lambda: _by_category(lambda k: k in ("Lu", "Ll", "Lt"))),
        (r"\p{digit}", lambda: _by_category(lambda k: k == "Nd")),
        (r"\P{N}", lambda: _by_category(lambda k: k[0] != "N")),
        (r"[\p{Zs}\d]", lambda: _by_category(lambda k: k == "Zs") | set(range(0x30, 0x3A))),
        (r"[^\p{P}\p{S}]", lambda: _by_category(lambda k: k[0] not in "PS")),
        (r"\p{Assigned}", lambda: _by_category(lambda k: k != "Cn")),
        (r"\p{ASCII}", lambda: set(range(0x80))),
        (r"\p{Any}", all_code_points),
    ],
)
def test_unicode_property_escapes_match_unicodedata(pattern: str, members) -> None:
    """``\\p{..}`` against ``unicodedata.category`` of every code point (Python has no ``\\p``)."""
    assert _class_members(pattern) == members()


def test_json_schema_suite_pattern_cases() -> None:
    """The official suite's ``pattern`` cases on strings (unanchored search, ``\\p{Letter}``)."""
    cases = 0
    for group in json.loads(shared_path("json-schema-test-suite", "draft2020-12", "pattern.json").read_text()):
        grammar = regex_grammar(group["schema"]["pattern"], anchored=False)
        for t in group["tests"]:
            if isinstance(t["data"], str):
                assert grammar_accepts(grammar, t["data"].encode()) == t["valid"], (group["description"], t)
                cases += 1
    assert cases >= 5


def test_laziness_and_groups_do_not_change_the_language() -> None:
    for greedy, other in [(r"a*b", r"a*?b"), (r"(a|b){2,3}", r"(?:a|b){2,3}?"), (r"(?P<n>x)+", r"(x)+?")]:
        assert regex_to_expr(greedy) == regex_to_expr(other)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

UNSUPPORTED = [
    (r"(a)\1", 3, "backreference"),
    (r"(?<n>a)\k<n>", 7, "backreference"),
    (r"(?P<n>a)(?P=n)", 8, "backreference"),
    (r"a(?=b)", 1, "lookahead"),
    (r"a(?!b)", 1, "negative lookahead"),
    (r"(?<=a)b", 0, "lookbehind"),
    (r"(?<!a)b", 0, "negative lookbehind"),
    (r"ab\b", 2, "word boundary"),
    (r"\Bx", 0, "word boundary"),
    (r"(?i)abc", 0, "inline flags"),
    (r"x(?s:.)", 1, "inline flags"),
    (r"(?>a+)", 0, "atomic"),
    (r"a++", 2, "possessive"),
    (r"(?(1)a|b)", 0, "conditional"),
    (r"(?#c)a", 0, "comment"),
    (r"x\p{sc=Grek}", 1, "property"),
    (r"[\p{Alphabetic}]", 1, "property"),
    (r"\Aa\Z", 0, "anchor"),
    (r"a\a", 1, "\\a"),
    (r"\U0001F600", 0, "\\U"),
    (r"\N{DASH}", 0, "\\N"),
    (r"\012", 0, "octal"),
    (r"[\1]", 1, "octal"),
    (r"a{,3}", 1, "{,n}"),
    (r"[]a]", 0, "'[]'"),
    (r"[^]", 0, "'[]'"),
    (r"[\w-.]", 1, "range"),
    (r"[a-\d]", 1, "range"),
    (r"\ud800", 0, "surrogate"),
    (r"a^b", 1, "'^'"),
    (r"a$b", 1, "'$'"),
    (r"(^a)*", 1, "'^'"),
    (r"(a|b$)c", 4, "'$'"),
    (r"^*", 1, "quantifier on the anchor"),
]


@pytest.mark.parametrize("pattern,position,words", UNSUPPORTED)
def test_unsupported_constructs_raise_with_position(pattern: str, position: int, words: str) -> None:
    with pytest.raises(RegexError) as info:
        regex_to_expr(pattern)
    assert info.value.position == position, info.value
    assert words in info.value.message, info.value
    assert info.value.pattern == pattern and repr(pattern) in str(info.value)


MALFORMED = [
    ("(ab", 0, "unterminated group"),
    ("a(b(c)", 1, "unterminated group"),
    ("ab)", 2, "unbalanced"),
    ("[z-a]", 1, "range"),
    ("[abc", 0, "unterminated character class"),
    ("*a", 0, "nothing to repeat"),
    ("a|+", 2, "nothing to repeat"),
    ("(?:{2})", 3, "nothing to repeat"),
    ("a**", 2, "multiple repeat"),
    ("a{2}{3}", 4, "multiple repeat"),
    ("a??*", 3, "multiple repeat"),
    ("a{3,2}", 1, "min > max"),
    ("ab\\", 2, "trailing backslash"),
    (r"\x4", 0, "\\x"),
    (r"\u12G4", 0, "\\u"),
    (r"\u{110000}", 0, "\\u{"),
    (r"\q", 0, "unknown escape"),
    (r"(?P<1a>x)", 4, "group name"),
    (r"(?<n>a)(?<n>b)", 10, "duplicate"),
    (r"(?<n", 0, "group name"),
    (r"(?~a)", 0, "unknown group extension"),
    (r"a\c1", 1, "control escape"),
    (r"\p{Foo}", 0, "property"),
    (r"[a\pL]", 2, "property"),
]


@pytest.mark.parametrize("pattern,position,words", MALFORMED)
def test_malformed_patterns_raise_with_position(pattern: str, position: int, words: str) -> None:
    with pytest.raises(RegexError) as info:
        regex_to_expr(pattern)
    assert info.value.position == position, info.value
    assert words in info.value.message, info.value


def test_python_rejects_the_malformed_patterns_too() -> None:
    """Our malformed list is malformed for Python as well (except ECMA-only syntax we reject by choice)."""
    for pattern, _, _ in MALFORMED:
        if pattern.startswith(("(?<n", r"\u{", r"\p")):
            continue  # ECMA-262 group names, \u{..} and \p are not Python syntax at all
        with pytest.raises(re.error):
            re.compile(pattern)


@pytest.mark.parametrize(
    "pattern,position",
    [("(a{1000}){1000}", 9), ("a{100000000000000000000}", 1), ("((a{100}){100}){100}", 15), (".{99999}x", 1)],
)
def test_huge_repetition_is_a_clear_error(pattern: str, position: int) -> None:
    with pytest.raises(RegexError, match="too large") as info:
        regex_grammar(pattern)
    assert info.value.position == position
    assert isinstance(info.value, GrammarError)


def test_nesting_depth_is_bounded() -> None:
    deep = "(" * MAX_GROUP_DEPTH + "a|b" + ")" * MAX_GROUP_DEPTH + "+"
    g = regex_grammar(deep)
    assert grammar_accepts(g, b"abba") and not grammar_accepts(g, b"")
    too_deep = "(?:" * (MAX_GROUP_DEPTH + 1) + "a" + ")" * (MAX_GROUP_DEPTH + 1)
    with pytest.raises(RegexError, match="nested") as info:
        regex_to_expr(too_deep)
    assert info.value.position == 3 * MAX_GROUP_DEPTH


def test_non_string_pattern_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        regex_to_expr(b"abc")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Fuzzing the syntax
# ----------------------------------------------------------------------------------------------

_SYNTAX = list("ab()[]{}|*+?.^$\\-,023dswSW:<>=!P^") + ["(?:", "(?P<g>", "\\u0041", "{2}", "{1,}", "\\x"]


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(_SYNTAX), max_size=10).map("".join), st.data())
def test_random_patterns_either_agree_with_re_or_fail_cleanly(pattern: str, data: st.DataObject) -> None:
    """Any string is a clean RegexError or a pattern Python also accepts and matches the same way."""
    try:
        grammar = regex_grammar(pattern)
    except RegexError as e:
        assert 0 <= e.position <= len(pattern)
        return
    try:
        oracle = compile_oracle(pattern)  # must compile: we accepted it
    except NoOracle:
        return
    strings = data.draw(st.lists(candidates(pattern, fullmatch=True), min_size=3, max_size=3))
    for s in filter(no_surrogates, strings):
        assert grammar_accepts(grammar, s.encode()) == (oracle.fullmatch(s) is not None), (pattern, s)
