"""The Lark frontend: grammars in Lark's syntax, read by the ``lark`` package's own loader.

Lark parses the grammar text, resolves ``%import`` (``common.X`` and friends), ``%override`` and
``%extend``, and inlines terminal references inside terminals; we lower the resulting rule and
terminal trees to the Grammar IR. Rule modifiers (``?rule``, ``_rule``, ``!rule``) and aliases
(``-> name``) only shape Lark's parse trees, so they are ignored; ``[x]``, ``x?``, ``x*``, ``x+``,
``x ~ n`` and ``x ~ m..n`` become repetitions.

**Which language.** The reference is Lark's Earley parser with ``lexer="dynamic"``, which is
scannerless: at each position it tries every terminal the grammar expects there. Our reading:

* A terminal's language is the set of strings its pattern matches in full (strings, ``"..."i``,
  ``"a".."z"``, ``/regex/flags`` with Python ``re`` semantics for ``.``, ``\\d``, ``\\w``, ``\\s``,
  and flags ``i``, ``s``, ``x``, ``m``, ``u``).
* A terminal whose pattern uses a lazy quantifier (``*?``, ``+?``, ...) keeps only its *shortest*
  matches (no proper prefix of the match is a match), which is what Python's ``re`` returns for the
  usual ``open .*? close`` forms such as ``C_COMMENT``.
* Lark's escaped-string idiom (``common._STRING_ESC_INNER``, a lazy ``.*?`` plus a lookbehind, as
  in ``ESCAPED_STRING``) is rewritten exactly: between the delimiters, any character but the
  delimiter, ``\\`` and newline, or ``\\`` followed by any character but newline.
* ``%ignore``: every terminal is followed by ``(I1 | I2 | ...)*`` (the ignored terminals), and the
  start rule is preceded by it, so ignored text may appear before, between and after terminals and
  never inside one. The start symbol is then the rule ``__root``; the repetition is the rule
  ``__ignore``.

Where Lark differs: its dynamic lexer commits each terminal, and each ignored run, to the single
match Python's ``re`` prefers at that position (for greedy patterns the longest), while we allow
any match. So Lark rejects, and we accept, strings in which a variable-length terminal is directly
followed by text that would extend it (``NAME NAME`` read from ``"ab"``, or ``"select afrom t"``
under ``%ignore WS``), or in which a terminal starts with text an ignored terminal would swallow (a
terminal beginning with a space under ``%ignore WS``). Grammars that keep such terminals apart agree
exactly (the tests check four languages). ``lexer="dynamic_complete"`` also tries the shorter
matches of each terminal (not of ignored runs), and agrees with us on the first kind of string as
well (tested on a SQL grammar whose names abut keywords). Lark refuses terminals that can match
the empty string under its dynamic lexer; we accept them.

Rejected with a :class:`~stencil.errors.GrammarError` giving the line and column: Lark syntax
errors, undefined or duplicate symbols, rule and terminal priorities (they rank parse trees or
change tokenization, not the language we enforce), templates, ``%declare``, regex constructs with no
regular equivalent (lookarounds, backreferences, anchors ``^``/``$``, the ``l`` flag), and every
other error of Lark's loader.

Lark internals used (stable through lark 1.2-1.3, and exercised by the tests): the grammar-text
parser ``load_grammar._get_parser`` (positions for errors), ``load_grammar.GrammarBuilder``
(imports and definition trees) and ``load_grammar._literal_to_pattern`` (Lark's own escaping rules).
"""

from __future__ import annotations

import _sre
import re
from bisect import bisect_right
from functools import lru_cache
from typing import Iterator, Sequence

from lark import load_grammar as _lark_load
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.grammar import TOKEN_DEFAULT_PRIORITY, NonTerminal, Terminal
from lark.lexer import PatternStr, Token
from lark.tree import Tree

from stencil.errors import GrammarError, RegexError
from stencil.grammar.ir import (
    MAX_CODE_POINT,
    Alt,
    Automaton,
    ByteClass,
    CharClass,
    Expr,
    Grammar,
    GrammarBuilder,
    Lit,
    Ref,
    Repeat,
    Seq,
    alt,
    complement_ranges,
    lit,
    normalize_ranges,
    opt,
    seq,
    star,
)
from stencil.grammar.regex import regex_to_expr

try:  # Python's own regex parser, to validate patterns and find lazy quantifiers.
    from re import _parser as _sre_parse  # type: ignore[attr-defined]  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["lark_to_grammar"]

ROOT = "__root"
IGNORE = "__ignore"

# The two regexes of Lark's common._STRING_ESC_INNER, as they appear in the grammar text.
_ESC_INNER = ("/.*?/", r"/(?<!\\)(\\\\)*?/")
_RE_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "u": re.UNICODE}


def lark_to_grammar(text: str, *, start: str = "start", import_paths: Sequence[str] = ()) -> Grammar:
    """Lower a grammar written in Lark's syntax; ``start`` names the start rule.

    ``import_paths`` are extra directories searched by ``%import`` (Lark's ``import_paths``); the
    grammars bundled with Lark (``common``, ``unicode``, ...) are always found. See the module
    docstring for the language this denotes. Raises :class:`GrammarError` with line and column.
    """
    raw = _parse_raw(text)
    source = _Source(raw)
    builder = _lark_load.GrammarBuilder(False, list(import_paths))
    try:
        builder.load_grammar(text, "<string>")
        loaded = builder.build()
    except (LarkError, OSError) as e:
        raise source.lark_error(e) from None
    return _Lowering(loaded, source).build(start)


# ----------------------------------------------------------------------------------------------
# The user's grammar text: positions, and the checks that need them
# ----------------------------------------------------------------------------------------------


def _parse_raw(text: str) -> Tree:
    """Lark's own parse of the grammar text, tokens and positions kept."""
    parser = _lark_load._get_parser()
    try:
        return parser.parse(text + "\n", "start")
    except UnexpectedInput as e:
        if isinstance(e, UnexpectedToken):
            hint = _lark_load._translate_parser_exception(parser.parse, e)
            message = hint or ("unexpected end of line" if not str(e.token).strip() else f"unexpected {str(e.token)!r}")
        elif isinstance(e, UnexpectedCharacters):
            message = f"unexpected character {e.char!r}"
        else:
            message = "unexpected end of the grammar"
        line = e.line if e.line > 0 else None
        raise GrammarError(f"Lark syntax error: {message}", line=line, column=e.column if line else None) from None


class _Source:
    """Definitions, imports and tokens of the user's grammar text (imported grammars are not in it)."""

    def __init__(self, raw: Tree) -> None:
        self.defs: dict[str, Token] = {}
        self.imports: list[tuple[set[str], Token]] = []
        self.tokens = {(t.line, t.column, str(t)) for t in raw.scan_values(lambda v: isinstance(v, Token))}
        refs: list[Token] = []
        for stmt in raw.children:
            kind = stmt.data
            if kind in ("override", "extend"):
                (stmt,) = stmt.children
            if stmt.data in ("rule", "term"):
                self._definition(stmt, kind)
                refs += _references(stmt.children[-1])
            elif kind == "import":
                self.imports.append(_imported_names(stmt))
            elif kind == "ignore":
                refs += _references(stmt.children[0])
            elif kind == "declare":
                tok = _first_token(stmt)
                raise GrammarError(
                    "%declare cannot be honoured: a declared terminal has no definition to recognize",
                    line=tok.line,
                    column=tok.column,
                )
        defined = set(self.defs).union(*(names for names, _ in self.imports))
        for tok in refs:
            if str(tok) not in defined:
                kind = "terminal" if tok.type == "TERMINAL" else "rule"
                raise GrammarError(f"undefined {kind} {str(tok)!r}", line=tok.line, column=tok.column)

    def _definition(self, stmt: Tree, kind: str) -> None:
        if stmt.data == "rule":
            _, name, params, priority, body = stmt.children
            if params.children:
                raise GrammarError(
                    f"templates are not supported (rule {str(name)!r} takes parameters)",
                    line=name.line,
                    column=name.column,
                )
            prio = priority.children[0] if priority.children else None
        else:
            name, body = stmt.children[0], stmt.children[-1]
            prio = stmt.children[1] if len(stmt.children) == 3 else None
        for t in body.find_data("template_usage"):
            tok = _first_token(t)
            raise GrammarError("templates are not supported", line=tok.line, column=tok.column)
        if prio is not None:
            raise GrammarError(
                f"priority .{prio} on {str(name)!r} is not supported: priorities rank Lark's parse trees or "
                "change its tokenization, and Stencil enforces the language only",
                line=prio.line,
                column=prio.column,
            )
        if kind not in ("override", "extend") and str(name) in self.defs:
            raise GrammarError(f"{str(name)!r} is defined twice", line=name.line, column=name.column)
        self.defs.setdefault(str(name), name)

    def where(self, name: str | None) -> tuple[int | None, int | None]:
        """Where the definition of ``name`` comes from: its own line, or the %import that brought it."""
        tok = self.defs.get(name) if name else None
        if tok is None:
            for names, t in self.imports:
                if name in names:
                    tok = t
                    break
            else:
                tok = self.imports[0][1] if self.imports else None
        return (tok.line, tok.column) if tok is not None else (None, None)

    def error(self, message: str, name: str | None, tok: Token | None = None) -> GrammarError:
        """An error about definition ``name``, at ``tok`` when that token is in the user's text."""
        if tok is not None and (tok.line, tok.column, str(tok)) in self.tokens:
            return GrammarError(message, line=tok.line, column=tok.column)
        if name is not None and name not in self.defs:
            message += f" (in {name!r}, imported)"
        line, column = self.where(name)
        return GrammarError(message, line=line, column=column)

    def lark_error(self, e: Exception) -> GrammarError:
        """A Lark loader error, placed at the first symbol it names that we can find."""
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError):
            message = f"cannot %import: {message}"
        for name in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", message):
            if name in self.defs or any(name in names for names, _ in self.imports):
                line, column = self.where(name)
                return GrammarError(f"Lark: {message}", line=line, column=column)
        line, column = self.where(None) if isinstance(e, OSError) else (None, None)
        return GrammarError(f"Lark: {message}", line=line, column=column)


def _first_token(t: Tree) -> Token:
    return next(t.scan_values(lambda v: isinstance(v, Token)))


def _references(t: Tree) -> Iterator[Token]:
    """Symbol tokens used in an expansion tree (alias names are labels, not references)."""
    if t.data in ("terminal", "nonterminal"):
        yield t.children[0]
        return
    children = t.children[:1] if t.data == "alias" else t.children
    for c in children:
        if isinstance(c, Tree):
            yield from _references(c)


def _imported_names(stmt: Tree) -> tuple[set[str], Token]:
    path, *rest = stmt.children
    if rest and isinstance(rest[0], Tree):  # %import lib (A, B)
        names = {str(t) for t in rest[0].children}
    elif rest and rest[0] is not None:  # %import lib.A -> B
        names = {str(rest[0])}
    else:
        names = {str(path.children[-1])}
    return names, _first_token(stmt)


# ----------------------------------------------------------------------------------------------
# Lowering
# ----------------------------------------------------------------------------------------------


class _Lowering:
    def __init__(self, loaded: _lark_load.Grammar, source: _Source) -> None:
        self.source = source
        self.terms = {str(name): (tree, prio) for name, (tree, prio) in loaded.term_defs}
        self.rules = [(str(name), params, tree, options) for name, params, tree, options in loaded.rule_defs]
        self.ignore = list(loaded.ignore)
        self.builder = GrammarBuilder()

    def build(self, start: str) -> Grammar:
        if self.ignore:
            bodies = [self.terminal_expr(self.terms[name][0], name) for name in self.ignore]
            self.builder.rule(IGNORE, star(alt(*bodies)))
        for name, params, tree, options in self.rules:
            if params:
                raise self.source.error(f"templates are not supported (rule {name!r})", name)
            if options is not None and options.priority is not None:
                raise self.source.error(f"priority on rule {name!r} is not supported", name)
            self.builder.rule(name, self.rule_expr(tree, name))
        if start not in {r[0] for r in self.rules}:
            raise GrammarError(f"the start rule {start!r} is not defined")
        if not self.ignore:
            return self.builder.build(start)
        self.builder.rule(ROOT, seq(Ref(IGNORE), Ref(start)))
        return self.builder.build(ROOT)

    def token_suffix(self, body: Expr) -> Expr:
        return seq(body, Ref(IGNORE)) if self.ignore else body

    def terminal_rule(self, name: str, where: str) -> Ref:
        """The rule for terminal ``name`` (its body, then ignored text), defined on first use."""
        if name not in self.builder.rules:
            if name not in self.terms or self.terms[name][0] is None:
                raise self.source.error(f"terminal {name!r} has no definition", where)
            tree, prio = self.terms[name]
            if prio != TOKEN_DEFAULT_PRIORITY:
                raise self.source.error(f"priority on terminal {name!r} is not supported", name)
            self.builder.rule(name, self.token_suffix(self.terminal_expr(tree, name)))
        return Ref(name)

    def rule_expr(self, t: object, where: str) -> Expr:
        if isinstance(t, NonTerminal):
            return Ref(t.name)
        if isinstance(t, Terminal):
            return self.terminal_rule(t.name, where)
        kind = t.data
        if kind == "expansions":
            return alt(*(self.rule_expr(c, where) for c in t.children))
        if kind == "expansion":
            return seq(*(self.rule_expr(c, where) for c in t.children))
        if kind in ("alias", "value"):
            return self.rule_expr(t.children[0], where)
        if kind == "maybe":
            return opt(self.rule_expr(t.children[0], where))
        if kind == "expr":
            return self.repeat(self.rule_expr(t.children[0], where), t.children[1:], where)
        if kind in ("literal", "range"):
            return self.token_suffix(self.terminal_expr(t, where))
        raise self.source.error(f"unsupported Lark construct {kind!r}", where, _first_token(t))

    def repeat(self, body: Expr, op: list, where: str) -> Expr:
        if op[0] == "*":
            return star(body)
        if op[0] == "+":
            return Repeat(body, 1, None)
        if op[0] == "?":
            return opt(body)
        lo = int(op[1])
        hi = int(op[2]) if len(op) == 3 else lo
        if lo < 0 or hi < lo:
            raise self.source.error(f"bad repetition range ~ {lo}..{hi}", where, op[1])
        return Repeat(body, lo, hi)

    # -- terminals ----------------------------------------------------------------------------

    def terminal_expr(self, tree: Tree, where: str) -> Expr:
        """A terminal's language; lazy patterns keep their shortest matches only."""
        lazy: list[Token] = []
        e = self.term_expr(tree, where, lazy)
        return _shortest_matches(e, lambda msg: self.source.error(msg, where, lazy[0])) if lazy else e

    def term_expr(self, t: object, where: str, lazy: list[Token]) -> Expr:
        if not isinstance(t, Tree):
            raise self.source.error(f"rule {t!s} cannot be used inside a terminal", where)
        kind = t.data
        if kind == "expansions":
            return alt(*(self.term_expr(c, where, lazy) for c in t.children))
        if kind == "expansion":
            items = list(_flat_items(t))
            k = _escaped_string_idiom(items)
            if k is not None:
                delim = _literal_value(items[k + 2])
                before = seq(*(self.term_expr(c, where, lazy) for c in items[:k]))
                after = seq(*(self.term_expr(c, where, lazy) for c in items[k + 3 :]))
                return seq(before, _escaped_body(delim), lit(delim), after)
            return seq(*(self.term_expr(c, where, lazy) for c in items))
        if kind == "value":
            return self.term_expr(t.children[0], where, lazy)
        if kind == "maybe":
            return opt(self.term_expr(t.children[0], where, lazy))
        if kind == "expr":
            return self.repeat(self.term_expr(t.children[0], where, lazy), t.children[1:], where)
        if kind == "literal":
            return self.literal(t.children[0], where, lazy)
        if kind == "range":
            a, b = (self.pattern(tok, where).value for tok in t.children)
            if len(a) != 1 or len(b) != 1 or a > b:
                raise self.source.error(f"bad range {t.children[0]}..{t.children[1]}", where, t.children[0])
            return CharClass(((ord(a), ord(b)),))
        if kind == "alias":
            raise self.source.error("aliases (->) are not allowed in terminals", where, _first_token(t))
        raise self.source.error(f"unsupported Lark construct {kind!r} in a terminal", where, _first_token(t))

    def pattern(self, tok: Token, where: str):
        try:
            return _lark_load._literal_to_pattern(tok)
        except LarkError as e:
            raise self.source.error(f"Lark: {e}", where, tok) from None

    def literal(self, tok: Token, where: str, lazy: list[Token]) -> Expr:
        p = self.pattern(tok, where)
        flags = set(p.flags)
        if isinstance(p, PatternStr):
            e: Expr = lit(p.value)
        else:
            if "l" in flags:
                raise self.source.error("regex flag 'l' (locale) is not supported", where, tok)
            try:
                parsed = _sre_parse.parse(p.value, sum(_RE_FLAGS[f] for f in flags))
                pattern, origin = _python_to_ecma(p.value, "x" in flags, "s" in flags)
                e = regex_to_expr(pattern, anchored=True)
            except re.error as err:
                raise self.source.error(f"bad regex {tok}: {err}", where, tok) from None
            except RegexError as err:
                at = origin[err.position] if err.pattern != p.value and err.position < len(origin) else err.position
                raise self.source.error(f"regex {tok}: {err.message} at position {at}", where, tok) from None
            if _has_lazy(parsed):
                lazy.append(tok)
        return _casefold(e) if "i" in flags else e


def _flat_items(t: Tree) -> Iterator[object]:
    """The items of an expansion, with single-alternative groups (inlined terminals) spliced in."""
    for c in t.children:
        inner = c.children[0] if isinstance(c, Tree) and c.data == "value" else c
        if (
            isinstance(inner, Tree)
            and inner.data == "expansions"
            and len(inner.children) == 1
            and inner.children[0].data == "expansion"
        ):
            yield from _flat_items(inner.children[0])
        else:
            yield c


def _literal_token(item: object) -> Token | None:
    if isinstance(item, Tree) and item.data == "value":
        item = item.children[0]
    if isinstance(item, Tree) and item.data == "literal":
        return item.children[0]
    return None


def _literal_value(item: object) -> str:
    p = _lark_load._literal_to_pattern(_literal_token(item))
    return p.value


def _escaped_string_idiom(items: list[object]) -> int | None:
    """Index k where items k, k+1 are _STRING_ESC_INNER's two regexes, preceded by a string literal
    not ending in a backslash and followed by a one-character string literal (the delimiter)."""
    toks = [_literal_token(i) for i in items]
    for k in range(1, len(items) - 2):
        if toks[k] != _ESC_INNER[0] or toks[k + 1] != _ESC_INNER[1]:
            continue
        prev, nxt = toks[k - 1], toks[k + 2]
        if prev is None or nxt is None or prev.type != "STRING" or nxt.type != "STRING":
            continue
        p, d = _lark_load._literal_to_pattern(prev), _lark_load._literal_to_pattern(nxt)
        if not p.flags and not d.flags and not p.value.endswith("\\") and len(d.value) == 1 and d.value != "\\":
            return k
    return None


def _escaped_body(delim: str) -> Expr:
    """What Lark's ``.*?(?<!\\\\)(\\\\\\\\)*?`` matches before ``delim``: characters other than the
    delimiter, backslash and newline, or a backslash and any character but newline."""
    plain = CharClass(complement_ranges(normalize_ranges([(ord(delim),) * 2, (92, 92), (10, 10)]), MAX_CODE_POINT))
    escaped = seq(lit("\\"), CharClass(complement_ranges(((10, 10),), MAX_CODE_POINT)))
    return star(alt(plain, escaped))


# ----------------------------------------------------------------------------------------------
# Python regex semantics on top of the regex frontend (ECMA-262 flavoured)
# ----------------------------------------------------------------------------------------------


def _has_lazy(node: object) -> bool:
    if isinstance(node, _sre_parse.SubPattern):
        return any(op == _sre_parse.MIN_REPEAT or _has_lazy(av) for op, av in node)
    if isinstance(node, (list, tuple)):
        return any(_has_lazy(x) for x in node)
    return False


@lru_cache(maxsize=None)
def _python_class(letter: str) -> str:
    """Python ``re``'s ``\\d \\w \\s \\D \\W \\S`` (str patterns) as class contents, found by
    running ``re`` itself over every code point; surrogates are left out (UTF-8 has none)."""
    every = "".join(map(chr, range(MAX_CODE_POINT + 1)))
    found = [(m.start(), m.end() - 1) for m in re.finditer(f"\\{letter}+", every)]
    ranges = complement_ranges(complement_ranges(found, MAX_CODE_POINT) + ((0xD800, 0xDFFF),), MAX_CODE_POINT)
    return "".join(f"\\u{{{lo:X}}}" if lo == hi else f"\\u{{{lo:X}}}-\\u{{{hi:X}}}" for lo, hi in ranges)


def _python_to_ecma(pattern: str, verbose: bool, dotall: bool) -> tuple[str, list[int]]:
    """Rewrite a (valid) Python pattern so the regex frontend reads it with Python's meaning.

    Spells out ``\\d \\w \\s \\D \\W \\S`` and ``.`` with Python's character sets, applies the ``x``
    and ``s`` flags, and escapes a ``]`` that opens a class. Anchors are rejected: under Lark's
    ``re.match`` at a position they refer to the whole input, not to the terminal. Returns the new
    pattern and, per character of it, the position in ``pattern`` it came from (for error messages).
    """
    out: list[str] = []
    origin: list[int] = []

    def emit(text: str, at: int) -> None:
        out.append(text)
        origin.extend([at] * len(text))

    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            e = pattern[i + 1 : i + 2]
            if e and e in "dDwWsS":
                emit(_python_class(e) if in_class else f"[{_python_class(e)}]", i)
            else:
                emit(pattern[i : i + 2], i)
            i += 2
        elif in_class:
            in_class = c != "]"
            emit(c, i)
            i += 1
        elif c == "[":
            in_class = True
            j = i + 1 + (pattern[i + 1 : i + 2] == "^")
            emit(pattern[i:j], i)
            if pattern[j : j + 1] == "]":  # Python reads a ']' right after '[' or '[^' as a member
                emit("\\]", j)
                j += 1
            i = j
        elif verbose and c in " \t\n\r\v\f":
            i += 1
        elif verbose and c == "#":
            while i < n and pattern[i] != "\n":
                i += 1
        elif c == ".":
            emit("[\\s\\S]" if dotall else "[^\\n]", i)
            i += 1
        elif c in "^$":
            raise RegexError(
                f"anchor {c!r} is not supported in a Lark terminal (it refers to the whole input)",
                pattern=pattern,
                position=i,
            )
        else:
            emit(c, i)
            i += 1
    return "".join(out), origin


@lru_cache(maxsize=None)
def _case_partners() -> tuple[list[int], list[tuple[int, ...]]]:
    """For every cased code point, the others Python's ``re.IGNORECASE`` matches it with.

    Candidates come from the simple lowercase mapping ``re`` uses and the single-character upper
    mappings (cased letters all lie below U+20000); ``re`` itself confirms each pair, so its special
    cases (``ſ``, the Kelvin sign, ``İ``, ...) hold.
    """
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for cp in range(0x20000):
        ch = chr(cp)
        for other in (chr(_sre.unicode_tolower(cp)), ch.lower(), ch.upper()):
            if len(other) == 1 and other != ch:
                a, b = find(cp), find(ord(other))
                if a != b:
                    parent[a] = b
    groups: dict[int, list[int]] = {}
    for cp in parent:
        groups.setdefault(find(cp), []).append(cp)
    for root, members in groups.items():
        if root not in members:
            members.append(root)
    partners: dict[int, tuple[int, ...]] = {}
    for members in groups.values():
        for c in members:
            pat = re.compile(re.escape(chr(c)), re.IGNORECASE)
            found = tuple(sorted(d for d in members if d != c and pat.fullmatch(chr(d))))
            if found:
                partners[c] = found
    keys = sorted(partners)
    return keys, [partners[k] for k in keys]


def _fold_ranges(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    keys, partners = _case_partners()
    extra = []
    for lo, hi in ranges:
        for j in range(bisect_right(keys, lo - 1), bisect_right(keys, hi)):
            extra.extend((d, d) for d in partners[j])
    return normalize_ranges(list(ranges) + extra)


def _casefold(e: Expr) -> Expr:
    """``e`` under Python's ``re.IGNORECASE``."""
    if isinstance(e, Lit):
        return seq(*(CharClass(_fold_ranges(((ord(c), ord(c)),))) for c in e.data.decode("utf-8")))
    if isinstance(e, CharClass):
        return CharClass(_fold_ranges(e.ranges))
    if isinstance(e, Seq):
        return Seq(tuple(_casefold(x) for x in e.items))
    if isinstance(e, Alt):
        return Alt(tuple(_casefold(x) for x in e.options))
    if isinstance(e, Repeat):
        return Repeat(_casefold(e.body), e.lo, e.hi)
    if isinstance(e, Automaton):
        return Automaton(e.n_states, tuple((p, _casefold(x), q) for p, x, q in e.edges), e.finals)
    raise TypeError(f"unexpected expression in a regex: {e!r}")


def _shortest_matches(e: Expr, error) -> Expr:
    """The strings of ``e`` none of whose proper prefixes is in ``e``, as a byte automaton.

    Built on the IR's own determinized automaton: drop every edge leaving an accepting state, then
    keep the states that are reachable and can still accept.
    """
    b = GrammarBuilder()
    b.rule("t", e)
    g = b.build("t")
    start = int(g.rule_start[0])
    edges: dict[int, list[tuple[int, int, int]]] = {}
    for s in range(g.n_states):
        lo_e, hi_e = int(g.edge_ptr[s]), int(g.edge_ptr[s + 1])
        for k in range(lo_e, hi_e):
            if k + 1 < hi_e and g.edge_hi[k] >= g.edge_lo[k + 1]:
                raise error("a lazy terminal too large to determinize for its shortest matches")
        if not g.state_final[s]:
            edges[s] = [(int(g.edge_lo[k]), int(g.edge_hi[k]), int(g.edge_target[k])) for k in range(lo_e, hi_e)]
    reach, stack = {start}, [start]
    while stack:
        for _, _, t in edges.get(stack.pop(), ()):
            if t not in reach:
                reach.add(t)
                stack.append(t)
    live = {s for s in reach if g.state_final[s]}
    changed = True
    while changed:
        changed = False
        for s in reach - live:
            if any(t in live for _, _, t in edges.get(s, ())):
                live.add(s)
                changed = True
    order = [start] + sorted(live - {start})
    num = {s: i for i, s in enumerate(order)}
    arcs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for s in order:
        for lo, hi, t in edges.get(s, ()):
            if t in live:
                arcs.setdefault((num[s], num[t]), []).append((lo, hi))
    return Automaton(
        len(order),
        tuple((p, ByteClass(normalize_ranges(rs)), q) for (p, q), rs in sorted(arcs.items())),
        tuple(num[s] for s in order if g.state_final[s]),
    )
