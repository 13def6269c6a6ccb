"""Regex frontend: a hand-written parser for the dialect JSON Schema ``pattern`` and Python ``re`` share.

:func:`regex_to_expr` lowers a pattern to a pure grammar expression (no rule references) over code
points, and :func:`regex_grammar` wraps it as a one-rule grammar named ``root``.

Character semantics (ECMA-262, which JSON Schema prescribes, with code-point matching as under the
``u`` flag):

* ``\\d`` is ``[0-9]`` and ``\\w`` is ``[A-Za-z0-9_]`` (ASCII only, as in ECMA-262 and in Python with
  ``re.ASCII``); ``\\D`` and ``\\W`` are their complements.
* ``\\s`` is ECMA-262's WhiteSpace plus LineTerminator: ``\\t \\n \\v \\f \\r``, space, U+00A0,
  U+1680, U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000 and U+FEFF. (Python's ``\\s`` differs:
  it adds U+001C..U+001F and U+0085 and lacks U+FEFF.) ``\\S`` is the complement.
* ``.`` is any code point except the ECMA-262 line terminators ``\\n``, ``\\r``, U+2028 and U+2029.
* A pattern is a sequence of code points: an astral character is one atom (``😀+`` repeats the
  emoji), and an escaped surrogate pair ``\\uD83D\\uDE00`` denotes U+1F600. A lone surrogate can never
  occur in UTF-8 text, so it is an error rather than a silently unmatchable atom.

Matching: ``anchored=True`` means the whole string must match (``re.fullmatch``). ``anchored=False``
gives JSON Schema's ``pattern`` semantics: a *search*, where each top-level alternative may match
anywhere unless ``^`` (start of string) or ``$`` (end of string, never "before a final newline") pins
it. Anchors are honoured at the start/end of a top-level alternative, including inside groups that sit
at those ends (``(^a|b)c``); anywhere else they raise :class:`~stencil.errors.RegexError`.

Supported syntax: literals; escapes ``\\n \\t \\r \\f \\v \\0 \\xHH \\uHHHH \\u{H...} \\cX`` and escaped
punctuation (``\\/``, ``\\.``, ...); inside and outside classes, ``\\d \\w \\s \\D \\W \\S`` and the
``u``-flag property escapes ``\\p{..}``/``\\P{..}`` for General_Category values (``L``, ``Letter``,
``gc=Lu``, ...) and ``Any``, ``ASCII``, ``Assigned`` (from Python's ``unicodedata``, whose Unicode
version may trail a JavaScript engine's); classes with ranges and negation (``\\b`` inside a class is
backspace); ``.``; ``|``; groups ``(...)``, ``(?:...)``, ``(?P<n>...)``, ``(?<n>...)``; quantifiers
``* + ? {m} {m,} {m,n}`` and their lazy forms (laziness does not change the language). A ``{`` that
does not start a valid quantifier is a literal, as in Python.

Rejected with the construct and its position (the dialects disagree, or no regular language honours
it): backreferences ``\\1 \\k<n> (?P=n)``, lookarounds, ``\\b``/``\\B``, inline flags, atomic groups,
possessive quantifiers, conditionals, comments, Unicode scripts and other properties, octal escapes,
Python-only escapes (``\\A \\Z \\a \\U \\N`` ...), ``{,n}`` (a quantifier in Python, literal text in
ECMA-262), ``[]`` and ``[^]`` (empty/any in ECMA-262, the start of a class containing ``]`` in Python),
and ranges with a class escape at either end (``[\\w-.]``). Bounded repetition is unrolled by the IR,
so a pattern whose automaton would exceed :data:`MAX_REGEX_SIZE` states is rejected up front.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from typing import Union

from stencil.errors import RegexError
from stencil.grammar.ir import (
    EMPTY,
    MAX_CODE_POINT,
    CharClass,
    Expr,
    Grammar,
    GrammarBuilder,
    Lit,
    Repeat,
    Seq,
    alt,
    complement_ranges,
    normalize_ranges,
    seq,
    star,
    utf8_ranges,
)

__all__ = [
    "regex_to_expr",
    "regex_grammar",
    "MAX_REGEX_SIZE",
    "MAX_GROUP_DEPTH",
    "ECMA_SPACE",
    "ECMA_LINE_TERMINATORS",
]

# Upper bound on the automaton a regex may expand to (bounded repetitions are unrolled by the IR),
# estimated in NFA states; past it we fail at once instead of letting the IR builder grind.
MAX_REGEX_SIZE = 400_000
# Parsing, lowering and the IR recurse once per nesting level; this keeps them far from Python's stack limit.
MAX_GROUP_DEPTH = 100

Ranges = tuple[tuple[int, int], ...]

ECMA_LINE_TERMINATORS: Ranges = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
ECMA_SPACE: Ranges = normalize_ranges(
    [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
     (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
)
_DIGIT: Ranges = ((0x30, 0x39),)
_WORD: Ranges = normalize_ranges([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
_CLASS_ESCAPES: dict[str, Ranges] = {
    "d": _DIGIT,
    "D": complement_ranges(_DIGIT, MAX_CODE_POINT),
    "w": _WORD,
    "W": complement_ranges(_WORD, MAX_CODE_POINT),
    "s": ECMA_SPACE,
    "S": complement_ranges(ECMA_SPACE, MAX_CODE_POINT),
}
_DOT: Ranges = complement_ranges(ECMA_LINE_TERMINATORS, MAX_CODE_POINT)
_ANY = CharClass(((0, MAX_CODE_POINT),))
_CONTROL_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B}
# Letter escapes we reject, with the reason given to the user.
_REJECTED_ESCAPES = {
    "b": "word boundary \\b",
    "B": "word boundary \\B",
    "k": "named backreference \\k",
    "A": "Python-only anchor \\A",
    "Z": "Python-only anchor \\Z",
    "z": "anchor \\z",
    "G": "anchor \\G",
    "a": "escape \\a (bell in Python, the letter a in ECMA-262)",
    "U": "escape \\U (a code point in Python, the letter U in ECMA-262; write \\u{...})",
    "N": "named character escape \\N",
}
_HEX = "0123456789abcdefABCDEF"


# General_Category long names and ECMA-262 aliases -> short names.
_GC_ALIASES = {
    "Letter": "L", "Cased_Letter": "LC", "Uppercase_Letter": "Lu", "Lowercase_Letter": "Ll",
    "Titlecase_Letter": "Lt", "Modifier_Letter": "Lm", "Other_Letter": "Lo", "Mark": "M",
    "Combining_Mark": "M", "Nonspacing_Mark": "Mn", "Spacing_Mark": "Mc", "Enclosing_Mark": "Me",
    "Number": "N", "Decimal_Number": "Nd", "digit": "Nd", "Letter_Number": "Nl", "Other_Number": "No",
    "Punctuation": "P", "punct": "P", "Connector_Punctuation": "Pc", "Dash_Punctuation": "Pd",
    "Open_Punctuation": "Ps", "Close_Punctuation": "Pe", "Initial_Punctuation": "Pi",
    "Final_Punctuation": "Pf", "Other_Punctuation": "Po", "Symbol": "S", "Math_Symbol": "Sm",
    "Currency_Symbol": "Sc", "Modifier_Symbol": "Sk", "Other_Symbol": "So", "Separator": "Z",
    "Space_Separator": "Zs", "Line_Separator": "Zl", "Paragraph_Separator": "Zp", "Other": "C",
    "Control": "Cc", "cntrl": "Cc", "Format": "Cf", "Surrogate": "Cs", "Private_Use": "Co",
    "Unassigned": "Cn",
}


@functools.lru_cache(maxsize=1)
def _general_categories() -> dict[str, Ranges]:
    """Two-letter General_Category -> code-point ranges, from Python's ``unicodedata`` (one pass)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    cat = unicodedata.category
    lo, cur = 0, cat("\0")
    for c in range(1, MAX_CODE_POINT + 2):
        k = cat(chr(c)) if c <= MAX_CODE_POINT else ""
        if k != cur:
            spans.setdefault(cur, []).append((lo, c - 1))
            lo, cur = c, k
    return {k: tuple(v) for k, v in spans.items()}


def _unicode_property(name: str, *, allow_binary: bool) -> Ranges | None:
    """Ranges of a General_Category value (short or long name) or, if allowed, Any/ASCII/Assigned."""
    if allow_binary and name in ("Any", "ASCII", "Assigned"):
        if name == "Assigned":
            return complement_ranges(_general_categories()["Cn"], MAX_CODE_POINT)
        return ((0, MAX_CODE_POINT if name == "Any" else 0x7F),)
    short = _GC_ALIASES.get(name, name)
    cats = _general_categories()
    if short == "LC":
        members = ["Lu", "Ll", "Lt"]
    elif len(short) == 1:
        members = [k for k in cats if k[0] == short]
    else:
        members = [short] if short in cats else []
    if not members:
        return None
    return normalize_ranges(r for k in members for r in cats[k])


# ----------------------------------------------------------------------------------------------
# Syntax tree
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chars:
    """One code point from ``ranges`` (a single literal is a one-point range)."""

    ranges: Ranges


@dataclass(frozen=True)
class _Anchor:
    kind: str  # "^" or "$"
    pos: int


@dataclass(frozen=True)
class _Seq:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Alt:
    options: tuple[_Node, ...]


@dataclass(frozen=True)
class _Repeat:
    body: _Node
    lo: int
    hi: int | None
    pos: int  # of the quantifier


_Node = Union[_Chars, _Anchor, _Seq, _Alt, _Repeat]


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0
        self.group_names: set[str] = set()
        self.depth = 0

    def error(self, msg: str, pos: int) -> RegexError:
        return RegexError(msg, pattern=self.p, position=pos)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.p[j] if j < len(self.p) else ""

    def parse(self) -> _Node:
        node = self.alternation()
        if self.i < len(self.p):  # only a stray ")" stops alternation() early
            raise self.error("unbalanced parenthesis ')'", self.i)
        return node

    def alternation(self) -> _Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else _Alt(tuple(options))

    def sequence(self) -> _Node:
        items = []
        while self.i < len(self.p) and self.peek() not in "|)":
            items.append(self.quantified())
        return items[0] if len(items) == 1 else _Seq(tuple(items))

    def quantified(self) -> _Node:
        node = self.atom()
        qpos = self.i
        q = self.quantifier()
        if q is None:
            return node
        lo, hi = q
        if isinstance(node, _Anchor):
            raise self.error(f"quantifier on the anchor {node.kind!r}", qpos)
        lazy = self.peek() == "?"  # laziness does not change the language
        if lazy:
            self.i += 1
        if self.peek() == "+" and not lazy:
            raise self.error("possessive quantifier (not in ECMA-262)", self.i)
        if self.peek() in ("*", "+", "?") or self.quantifier_at(self.i) is not None:
            raise self.error("multiple repeat (a quantifier cannot follow a quantifier)", self.i)
        return _Repeat(node, lo, hi, qpos)

    def quantifier(self) -> tuple[int, int | None] | None:
        """Consume a quantifier at the cursor, if there is one."""
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c == "{":
            q = self.quantifier_at(self.i)
            if q is not None:
                bounds, end = q
                self.i = end
                return bounds
        return None

    def quantifier_at(self, i: int) -> tuple[tuple[int, int | None], int] | None:
        """Parse ``{m}``, ``{m,}`` or ``{m,n}`` at i; None if the ``{`` there is a literal."""
        p = self.p
        if i >= len(p) or p[i] != "{":
            return None
        j = i + 1
        k = j
        while k < len(p) and p[k].isdigit() and p[k].isascii():
            k += 1
        lo_txt = p[j:k]
        hi_txt = lo_txt
        if k < len(p) and p[k] == ",":
            m = k + 1
            while m < len(p) and p[m].isdigit() and p[m].isascii():
                m += 1
            hi_txt = p[k + 1 : m]
            k = m
        if k >= len(p) or p[k] != "}":
            return None
        if not lo_txt:
            if k == j:  # "{}" is a literal in both dialects
                return None
            raise self.error("quantifier {,n} (a quantifier in Python, literal text in ECMA-262)", i)
        lo = int(lo_txt)
        hi = int(hi_txt) if hi_txt else None
        if hi is not None and hi < lo:
            raise self.error(f"bad quantifier range {{{lo},{hi}}} (min > max)", i)
        return (lo, hi), k + 1

    def atom(self) -> _Node:
        start = self.i
        c = self.peek()
        if c == "(":
            return self.group()
        if c == "[":
            return _Chars(self.char_class())
        if c == ".":
            self.i += 1
            return _Chars(_DOT)
        if c in ("^", "$"):
            self.i += 1
            return _Anchor(c, start)
        if c == "\\":
            r = self.escape(in_class=False)
            return _Chars(r if isinstance(r, tuple) else ((r, r),))
        if c in ("*", "+", "?") or (c == "{" and self.quantifier_at(start) is not None):
            raise self.error(f"nothing to repeat before quantifier {c!r}", start)
        self.i += 1
        return _Chars(((ord(c), ord(c)),))

    def group(self) -> _Node:
        start = self.i
        p = self.p
        self.i += 1
        if self.peek() == "?":
            j = self.i + 1
            if p.startswith(":", j):
                self.i += 2
            elif p.startswith("P<", j) or (p.startswith("<", j) and not p.startswith(("<=", "<!"), j)):
                self.i += 2 if p.startswith("<", j) else 3
                self.group_name(start)
            else:
                raise self.error(self.group_construct(p[j : j + 3]), start)
        self.depth += 1
        if self.depth > MAX_GROUP_DEPTH:
            raise self.error(f"groups nested more than {MAX_GROUP_DEPTH} deep", start)
        body = self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            raise self.error("missing ')': unterminated group", start)
        self.i += 1
        return body

    @staticmethod
    def group_construct(rest: str) -> str:
        """Name the unsupported ``(?...`` construct that ``rest`` (the text after ``(?``) starts with."""
        for prefix, name in (
            ("=", "lookahead (?=...)"),
            ("!", "negative lookahead (?!...)"),
            ("<=", "lookbehind (?<=...)"),
            ("<!", "negative lookbehind (?<!...)"),
            ("P=", "named backreference (?P=...)"),
            ("P>", "recursion (?P>...)"),
            ("#", "comment group (?#...)"),
            (">", "atomic group (?>...)"),
            ("(", "conditional group (?(...)...)"),
            ("R", "recursion (?R)"),
            ("&", "recursion (?&...)"),
        ):
            if rest.startswith(prefix):
                return name
        flags = len(rest) - len(rest.lstrip("aiLmsux-"))
        if flags:
            return f"inline flags (?{rest[:flags]}...)"
        return "unknown group extension (?" + rest[:1]

    def group_name(self, start: int) -> None:
        end = self.p.find(">", self.i)
        if end < 0:
            raise self.error("unterminated group name", start)
        name = self.p[self.i : end]
        if not name.isidentifier():
            raise self.error(f"bad group name {name!r}", self.i)
        if name in self.group_names:
            raise self.error(f"duplicate group name {name!r}", self.i)
        self.group_names.add(name)
        self.i = end + 1

    def escape(self, *, in_class: bool) -> int | Ranges:
        """Parse a backslash escape; a code point, or the ranges of a class escape like ``\\d``."""
        start = self.i
        self.i += 1
        c = self.peek()
        if not c:
            raise self.error("trailing backslash", start)
        self.i += 1
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c]
        if c in _CONTROL_ESCAPES:
            return _CONTROL_ESCAPES[c]
        if c == "b" and in_class:
            return 0x08
        if c == "0":
            if self.peek().isdigit():
                raise self.error("octal escape", start)
            return 0
        if c.isdigit() and c.isascii():
            raise self.error("octal escape" if in_class else f"backreference \\{c}", start)
        if c == "x":
            h = self.p[self.i : self.i + 2]
            if len(h) < 2 or any(ch not in _HEX for ch in h):
                raise self.error("bad escape \\x (expected two hex digits)", start)
            self.i += 2
            return int(h, 16)
        if c == "u":
            return self.unicode_escape(start)
        if c == "c":
            letter = self.peek()
            if not (letter.isascii() and letter.isalpha()):
                raise self.error("bad control escape \\c (expected an ASCII letter)", start)
            self.i += 1
            return ord(letter) % 32
        if c in ("p", "P"):
            ranges = self.property_escape(start)
            return ranges if c == "p" else complement_ranges(ranges, MAX_CODE_POINT)
        if c in _REJECTED_ESCAPES:
            raise self.error(_REJECTED_ESCAPES[c], start)
        if c.isascii() and c.isalpha():
            raise self.error(f"unknown escape \\{c}", start)
        return ord(c)  # identity escape of punctuation, space or a non-ASCII character

    def unicode_escape(self, start: int) -> int:
        p = self.p
        if self.peek() == "{":
            end = p.find("}", self.i)
            h = p[self.i + 1 : end] if end >= 0 else ""
            if not h or any(ch not in _HEX for ch in h) or int(h, 16) > MAX_CODE_POINT:
                raise self.error("bad escape \\u{...} (expected hex digits up to 10FFFF)", start)
            self.i = end + 1
            cp = int(h, 16)
        else:
            cp = self.hex4(start)
            if 0xD800 <= cp <= 0xDBFF and p.startswith("\\u", self.i):
                save = self.i
                self.i += 2
                low = self.hex4(save)
                if 0xDC00 <= low <= 0xDFFF:
                    return 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                self.i = save
        if 0xD800 <= cp <= 0xDFFF:
            raise self.error(f"lone surrogate \\u{cp:04X} (cannot occur in UTF-8 text)", start)
        return cp

    def property_escape(self, start: int) -> Ranges:
        """The code points of ``\\p{...}`` (the cursor is after the ``p``)."""
        end = self.p.find("}", self.i)
        if self.peek() != "{" or end < 0:
            raise self.error("bad Unicode property escape (expected \\p{...})", start)
        body = self.p[self.i + 1 : end]
        self.i = end + 1
        name, eq, value = body.partition("=")
        if eq and name not in ("General_Category", "gc"):
            raise self.error(f"Unicode property {name!r} (only General_Category is supported)", start)
        ranges = _unicode_property(value if eq else body, allow_binary=not eq)
        if ranges is None:
            raise self.error(
                f"Unicode property {body!r} (supported: General_Category values, Any, ASCII, Assigned)", start
            )
        return ranges

    def hex4(self, start: int) -> int:
        h = self.p[self.i : self.i + 4]
        if len(h) < 4 or any(ch not in _HEX for ch in h):
            raise self.error("bad escape \\u (expected four hex digits)", start)
        self.i += 4
        return int(h, 16)

    def char_class(self) -> Ranges:
        start = self.i
        self.i += 1
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        if self.peek() == "]":
            raise self.error(
                "'[]' / '[^]' (empty or any class in ECMA-262, the start of a class containing ']' in Python; "
                "write [^\\s\\S] / [\\s\\S], or escape the ']')",
                start,
            )
        ranges: list[tuple[int, int]] = []
        while True:
            c = self.peek()
            if not c:
                raise self.error("unterminated character class", start)
            if c == "]":
                self.i += 1
                break
            atom_pos = self.i
            lo = self.class_atom()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self.class_atom()
                if isinstance(lo, tuple) or isinstance(hi, tuple):
                    raise self.error("bad character range: a class escape cannot bound a range", atom_pos)
                if hi < lo:
                    raise self.error(f"bad character range {chr(lo)!r}-{chr(hi)!r} (out of order)", atom_pos)
                ranges.append((lo, hi))
            elif isinstance(lo, tuple):
                ranges.extend(lo)
            else:
                ranges.append((lo, lo))
        out = normalize_ranges(ranges)
        return complement_ranges(out, MAX_CODE_POINT) if negate else out

    def class_atom(self) -> int | Ranges:
        if self.peek() == "\\":
            return self.escape(in_class=True)
        c = self.peek()
        self.i += 1
        return ord(c)


# ----------------------------------------------------------------------------------------------
# Lowering
# ----------------------------------------------------------------------------------------------


class _Lowering:
    """Turns the syntax tree into an :class:`Expr`, checking anchors and the expanded size.

    ``at_start``/``at_end``: only ``^`` anchors precede / only ``$`` anchors follow this node in its
    top-level alternative, so an anchor here can be honoured. ``head``/``tail``: in search mode, the
    match may still start after / end before this node's text unless an anchor inside pins it, so an
    any-string prefix / suffix is owed.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def lower(self, n: _Node, at_start: bool, at_end: bool, head: bool, tail: bool) -> tuple[Expr, int]:
        """Return (expression, estimated automaton size)."""
        if isinstance(n, _Anchor):
            if n.kind == "^" and not at_start:
                raise RegexError(
                    "'^' is only supported at the start of a top-level alternative", pattern=self.pattern, position=n.pos
                )
            if n.kind == "$" and not at_end:
                raise RegexError(
                    "'$' is only supported at the end of a top-level alternative", pattern=self.pattern, position=n.pos
                )
            owed = tail if n.kind == "^" else head
            return (star(_ANY) if owed else EMPTY), 1
        if isinstance(n, _Alt):
            parts = [self.lower(o, at_start, at_end, head, tail) for o in n.options]
            return alt(*(e for e, _ in parts)), sum(s for _, s in parts) + 2 * len(parts)
        if isinstance(n, _Seq):
            return self.lower_seq(n.items, at_start, at_end, head, tail)
        if isinstance(n, _Chars):
            e, size = _chars_expr(n.ranges)
        else:
            assert isinstance(n, _Repeat)
            body, bsize = self.lower(n.body, False, False, False, False)
            copies = n.hi if n.hi is not None else n.lo + 1
            size = bsize * copies + copies + 1
            _check_size(size, self.pattern, n.pos)
            e = Repeat(body, n.lo, n.hi)
        return seq(star(_ANY) if head else EMPTY, e, star(_ANY) if tail else EMPTY), size + 2

    def lower_seq(
        self, items: tuple[_Node, ...], at_start: bool, at_end: bool, head: bool, tail: bool
    ) -> tuple[Expr, int]:
        if not items:
            return (star(_ANY) if head or tail else EMPTY), 1
        last = len(items) - 1
        first_non_caret = next((k for k, it in enumerate(items) if not _is_anchor(it, "^")), len(items))
        last_non_dollar = next((k for k in range(last, -1, -1) if not _is_anchor(items[k], "$")), -1)
        out: list[Expr] = []
        total = 0
        for k, it in enumerate(items):
            e, s = self.lower(
                it,
                at_start and k <= first_non_caret,
                at_end and k >= last_non_dollar,
                head and k == 0,
                tail and k == last,
            )
            out.append(e)
            total += s
        return _merge_literals(out), total


def _check_size(size: int, pattern: str, pos: int) -> None:
    if size > MAX_REGEX_SIZE:
        raise RegexError(
            f"regex too large: expands to about {size} automaton states (limit {MAX_REGEX_SIZE}); "
            "a very large bounded repetition?",
            pattern=pattern,
            position=pos,
        )


def _is_anchor(n: _Node, kind: str) -> bool:
    return isinstance(n, _Anchor) and n.kind == kind


def _chars_expr(ranges: Ranges) -> tuple[Expr, int]:
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        cp = ranges[0][0]
        return Lit(chr(cp).encode("utf-8")), 1 + (cp > 0x7F) + (cp > 0x7FF) + (cp > 0xFFFF)
    return CharClass(ranges), 1 + sum(len(path) - 1 for path in utf8_ranges(ranges))


def _merge_literals(items: list[Expr]) -> Expr:
    """Concatenate, fusing adjacent literals so the tree (and its EBNF) stays readable."""
    out: list[Expr] = []
    for e in (x for it in items for x in (it.items if isinstance(it, Seq) else (it,))):
        if isinstance(e, Lit) and out and isinstance(out[-1], Lit):
            out[-1] = Lit(out[-1].data + e.data)
        else:
            out.append(e)
    return seq(*out)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def regex_to_expr(pattern: str, *, anchored: bool = True) -> Expr:
    """Lower ``pattern`` to a pure expression (no rule references) over UTF-8 encoded code points.

    ``anchored=True``: the expression's language is the set of strings the pattern fully matches.
    ``anchored=False``: JSON Schema ``pattern`` semantics, the strings containing a match (``^``/``$``
    pin a top-level alternative to the start/end). Raises :class:`~stencil.errors.RegexError` with the
    position of a malformed or unsupported construct, or of a repetition too large to expand.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"regex pattern must be a str, not {type(pattern).__name__}")
    tree = _Parser(pattern).parse()
    search = not anchored
    expr, size = _Lowering(pattern).lower(tree, True, True, search, search)
    _check_size(size, pattern, 0)
    return expr


def regex_grammar(pattern: str, *, anchored: bool = True) -> Grammar:
    """A grammar with the single rule ``root`` whose language is :func:`regex_to_expr`'s."""
    b = GrammarBuilder()
    b.rule("root", regex_to_expr(pattern, anchored=anchored))
    return b.build("root")
