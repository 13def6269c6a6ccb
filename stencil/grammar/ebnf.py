"""The EBNF frontend: llama.cpp's GBNF grammar syntax, lowered to the Grammar IR.

A grammar is a list of rules ``name ::= alternatives``. Rule names use letters, digits, ``-`` and
``_``. An item is a string literal ``"..."``, a character class ``[a-z]`` / ``[^"\\]``, ``.`` (any
code point), a rule name, or a parenthesized group; items may be followed by ``*``, ``+``, ``?``,
``{m}``, ``{m,}`` or ``{m,n}``; ``|`` separates alternatives and ``#`` starts a comment that runs to
the end of the line. Literals and classes read escapes ``\\n \\t \\r \\" \\\\ \\[ \\] \\xHH \\uHHHH
\\UHHHHHHHH`` (code points, written as UTF-8), plus ``\\-`` and ``\\^`` so that the IR's printer
(:meth:`~stencil.grammar.ir.Grammar.to_ebnf`) reads back. ``<|im_end|>`` names a special token by its
spelling (llama.cpp's token syntax; brackets included): only that token id matches it, never text.
Token ids (``<[123]>``) and negated tokens (``!<...>``) are not supported.

Line structure follows llama.cpp: a rule ends at a newline, but newlines may appear right after
``::=`` and ``|`` and anywhere inside parentheses. As an extension, a continuation line may also
*start* with ``|`` (llama.cpp rejects such a line, so no valid GBNF grammar changes meaning).

Every error is a :class:`~stencil.errors.GrammarError` with the 1-based line and column it is about.
"""

from __future__ import annotations

from bisect import bisect_right

from stencil.errors import GrammarError
from stencil.grammar.ir import (
    MAX_CODE_POINT,
    CharClass,
    Expr,
    Grammar,
    GrammarBuilder,
    Ref,
    Repeat,
    Special,
    alt,
    lit,
    normalize_ranges,
    seq,
)

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "[": "[", "]": "]", "-": "-", "^": "^"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_ANY = CharClass(((0, MAX_CODE_POINT),))


def ebnf_to_grammar(text: str, *, root: str = "root") -> Grammar:
    """Parse GBNF ``text`` and build its grammar, starting at the rule named ``root``.

    Raises :class:`GrammarError` (with ``line`` and ``column``) for a syntax error, an unknown
    escape, an unterminated literal or class, bad repetition bounds, a rule defined twice, a
    reference to an undefined rule, or a missing start rule.
    """
    parser = _Parser(text)
    rules = parser.parse()
    if root not in rules:
        raise GrammarError(f"the start rule {root!r} is not defined", line=1, column=1)
    builder = GrammarBuilder()
    for name, body in rules.items():
        builder.rule(name, body)
    return builder.build(root)


class _Parser:
    """Recursive descent over the text; ``pos`` indexes code points."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self.pos = 0
        self.line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        self.refs: list[tuple[str, int]] = []

    # -- positions and errors -----------------------------------------------------------------

    def line_col(self, pos: int) -> tuple[int, int]:
        line = bisect_right(self.line_starts, pos) - 1
        return line + 1, pos - self.line_starts[line] + 1

    def error(self, message: str, pos: int) -> GrammarError:
        line, column = self.line_col(pos)
        return GrammarError(message, line=line, column=column)

    def where(self, pos: int) -> str:
        return "line {}, column {}".format(*self.line_col(pos))

    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.text[i] if i < self.n else ""

    def found(self) -> str:
        return repr(self.text[self.pos]) if self.pos < self.n else "the end of the grammar"

    def skip_space(self, newline_ok: bool) -> None:
        """Skip blanks and comments, and line breaks where the grammar allows them (llama.cpp's rule)."""
        text, n = self.text, self.n
        while self.pos < n:
            c = text[self.pos]
            if c == " " or c == "\t" or (newline_ok and (c == "\n" or c == "\r")):
                self.pos += 1
            elif c == "#":
                while self.pos < n and text[self.pos] not in "\r\n":
                    self.pos += 1
            else:
                break

    # -- grammar structure --------------------------------------------------------------------

    def parse(self) -> dict[str, Expr]:
        rules: dict[str, Expr] = {}
        self.skip_space(True)
        while self.pos < self.n:
            start = self.pos
            name = self.name()
            self.skip_space(False)
            if not self.text.startswith("::=", self.pos):
                raise self.error(f"expected '::=' after the rule name {name!r}, found {self.found()}", self.pos)
            self.pos += 3
            self.skip_space(True)
            body = self.alternatives(nested=False)
            if self.peek() == "\r":
                self.pos += 2 if self.peek(1) == "\n" else 1
            elif self.peek() == "\n":
                self.pos += 1
            elif self.pos < self.n:
                raise self.error(f"unexpected {self.found()}: expected the end of the rule (a newline)", self.pos)
            if name in rules:
                raise self.error(f"rule {name!r} is defined twice", start)
            rules[name] = body
            self.skip_space(True)
        for name, pos in self.refs:
            if name not in rules:
                raise self.error(f"reference to undefined rule {name!r}", pos)
        return rules

    def name(self) -> str:
        start = self.pos
        while self.pos < self.n and self.text[self.pos] in _NAME_CHARS:
            self.pos += 1
        if self.pos == start:
            raise self.error(f"expected a rule name, found {self.found()}", start)
        return self.text[start : self.pos]

    def alternatives(self, nested: bool) -> Expr:
        options = [self.sequence(nested)]
        while True:
            if self.peek() == "|":
                self.pos += 1
                self.skip_space(True)
                options.append(self.sequence(nested))
                continue
            if not nested and self.peek() in ("\n", "\r"):
                # Extension: a continuation line that starts with '|'.
                save = self.pos
                self.skip_space(True)
                if self.peek() == "|":
                    continue
                self.pos = save
            return alt(*options)

    def sequence(self, nested: bool) -> Expr:
        items: list[Expr] = []
        while self.pos < self.n:
            c = self.text[self.pos]
            if c == '"':
                items.append(self.literal())
            elif c == "[":
                items.append(self.char_class())
            elif c in _NAME_CHARS:
                pos = self.pos
                name = self.name()
                self.refs.append((name, pos))
                items.append(Ref(name))
            elif c == "(":
                open_pos = self.pos
                self.pos += 1
                self.skip_space(True)
                body = self.alternatives(nested=True)
                if self.peek() != ")":
                    raise self.error(
                        f"expected ')' to close the '(' at {self.where(open_pos)}, found {self.found()}", self.pos
                    )
                self.pos += 1
                items.append(body)
            elif c == ".":
                self.pos += 1
                items.append(_ANY)
            elif c == "<":
                items.append(self.special_token())
            elif c in "*+?":
                if not items:
                    raise self.error(f"{c!r} must follow an item", self.pos)
                self.pos += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                items[-1] = Repeat(items[-1], lo, hi)
            elif c == "{":
                if not items:
                    raise self.error("'{' must follow an item", self.pos)
                lo, hi = self.bounds(nested)
                items[-1] = Repeat(items[-1], lo, hi)
            else:
                break
            self.skip_space(nested)
        return seq(*items)

    def bounds(self, nested: bool) -> tuple[int, int | None]:
        """``{m}``, ``{m,}`` or ``{m,n}``; the cursor is on the '{'."""
        brace = self.pos
        self.pos += 1
        self.skip_space(nested)
        lo = self.integer()
        self.skip_space(nested)
        if self.peek() == "}":
            hi: int | None = lo
        elif self.peek() == ",":
            self.pos += 1
            self.skip_space(nested)
            hi = self.integer() if self.peek().isdigit() else None
            self.skip_space(nested)
            if self.peek() != "}":
                raise self.error(f"expected '}}' to close the repetition, found {self.found()}", self.pos)
        else:
            raise self.error(f"expected ',' or '}}' in the repetition, found {self.found()}", self.pos)
        self.pos += 1
        if hi is not None and hi < lo:
            raise self.error(f"bad repetition bounds {{{lo},{hi}}}: the maximum is below the minimum", brace)
        return lo, hi

    def integer(self) -> int:
        start = self.pos
        while self.pos < self.n and "0" <= self.text[self.pos] <= "9":
            self.pos += 1
        if self.pos == start:
            raise self.error(f"expected a number in the repetition, found {self.found()}", start)
        return int(self.text[start : self.pos])

    # -- terminals ----------------------------------------------------------------------------

    def literal(self) -> Expr:
        start = self.pos
        self.pos += 1
        chars = []
        while True:
            if self.pos >= self.n:
                raise self.error("unterminated string literal", start)
            if self.text[self.pos] == '"':
                self.pos += 1
                break
            esc = self.pos
            cp = self.char()
            if 0xD800 <= cp <= 0xDFFF:
                raise self.error(f"surrogate U+{cp:04X} cannot appear in a literal: it has no UTF-8 encoding", esc)
            chars.append(chr(cp))
        return lit("".join(chars))

    def special_token(self) -> Expr:
        """``<|im_end|>``: the special token spelled so (brackets included), never text."""
        start = self.pos
        end = start + 1
        while end < self.n and self.text[end] not in ">\r\n":
            end += 1
        if end >= self.n or self.text[end] != ">" or end == start + 1:
            raise self.error("unterminated special token: expected '<name>' on one line", start)
        name = self.text[start : end + 1]
        if name.startswith("<[") and name.endswith("]>"):
            raise self.error(f"token ids like {name} are not supported: name the special token by its text", start)
        self.pos = end + 1
        return Special(name)

    def char_class(self) -> Expr:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges = []
        while True:
            if self.pos >= self.n:
                raise self.error("unterminated character class", start)
            if self.text[self.pos] == "]":
                break
            lo_pos = self.pos
            lo = hi = self.char()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                hi = self.char()
                if hi < lo:
                    raise self.error(f"bad character range: U+{lo:04X} comes after U+{hi:04X}", lo_pos)
            ranges.append((lo, hi))
        self.pos += 1
        if not ranges:
            raise self.error("empty character class", start)
        cls = CharClass(normalize_ranges(ranges))
        return cls.negate() if negated else cls

    def char(self) -> int:
        """One code point of a literal or class, escapes decoded."""
        c = self.text[self.pos]
        if c != "\\":
            self.pos += 1
            return ord(c)
        start = self.pos
        e = self.peek(1)
        if e in _HEX_ESCAPES:
            k = _HEX_ESCAPES[e]
            digits = self.text[start + 2 : start + 2 + k]
            if len(digits) < k or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad escape: '\\{e}' needs exactly {k} hex digits", start)
            cp = int(digits, 16)
            if cp > MAX_CODE_POINT:
                raise self.error(f"bad escape: U+{cp:X} is beyond U+10FFFF", start)
            self.pos = start + 2 + k
            return cp
        if e in _SIMPLE_ESCAPES:
            self.pos = start + 2
            return ord(_SIMPLE_ESCAPES[e])
        raise self.error(f"bad escape '\\{e}'" if e else "bad escape: '\\' at the end of the grammar", start)
