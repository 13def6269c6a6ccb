"""Structural tags (XGrammar's JSON format) and the IR helpers that tool-call grammars share.

A structural tag describes an output as nested *formats* (XGrammar's documented structural-tag
JSON, so existing specs carry over unchanged)::

    {"type": "structural_tag",
     "format": {"type": "triggered_tags", "triggers": ["<tool_call>"],
                "tags": [{"type": "tag", "begin": "<tool_call>\\n{\\"name\\": \\"f\\", \\"arguments\\": ",
                          "content": {"type": "json_schema", "json_schema": {...}},
                          "end": "}\\n</tool_call>"}]}}

Supported formats and their languages (``T`` is free text, any UTF-8):

* ``const_string`` ``{"value": s}``: exactly ``s``.
* ``json_schema`` ``{"json_schema": schema}``: the schema's JSON, through the JSON Schema frontend.
  Options: ``any_order`` (default false), ``any_whitespace`` (default true: flexible whitespace;
  false: none) and ``strict_mode`` (default true, as in XGrammar: objects that declare
  properties accept no others unless the schema says ``additionalProperties``). ``style`` must be
  ``"json"``; the XML styles and ``indent``/``separators`` are rejected.
* ``grammar`` ``{"grammar": ebnf}``: an EBNF/GBNF grammar whose start rule is ``root``.
* ``regex`` ``{"pattern": p}``: the strings ``p`` fully matches.
* ``any_text`` ``{"excludes": [...]}``: any text containing none of ``excludes``. As the content of
  a ``tag`` (or the last element of a sequence that is), it also contains none of the tag's end
  strings, so the tag ends at the first end string.
* ``sequence`` / ``or`` ``{"elements": [...]}``: concatenation / alternation.
* ``tag`` ``{"begin": b, "content": f, "end": e}``: ``b f e``; ``e`` may be a list of strings
  (any one of them ends the tag); ``b``/``e`` may be ``{"type": "token", "token": name}``.
* ``triggered_tags`` ``{"triggers", "tags", "at_least_one", "stop_after_first", "excludes"}``:
  free text in which the first occurrence of a trigger starts one of the tags whose begin string
  starts with that trigger (each tag has exactly one trigger); after the tag, free text again.
  ``at_least_one``: the output starts with a tag. ``stop_after_first``: the structure ends after
  the first tag. The free text never contains a trigger (nor ``excludes``).
* ``tags_with_separator`` ``{"tags", "separator", "at_least_one", "stop_after_first"}``: zero or
  more tags joined by the separator, nothing else; ``at_least_one`` / ``stop_after_first`` as above.

The top level is ``{"type": "structural_tag", "format": f}``, a bare format, or the legacy
``{"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}`` (triggered tags of JSON
schemas). Special tokens: with ``special_tokens`` (the tokenizer's names, which
:meth:`GrammarCompiler.compile_structural_tag` passes), any literal string (a const string, a begin,
an end, a separator) that spells a special token matches that token's id, never its text; free text
can never produce a special token, so such triggers need no exclusion.

Every problem raises :class:`~stencil.errors.GrammarError` naming the offending path
(``format.tags[1].content``). The shared helpers, :func:`embed_grammar` (a whole grammar as a rule of
another), :func:`text_avoiding` (text that contains none of some strings) and :func:`literal`, are
what :mod:`stencil.integrations.tools` builds tool-call grammars from.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import Any

from stencil.errors import GrammarError, RegexError, SchemaError
from stencil.grammar.ir import (
    EMPTY,
    MAX_CODE_POINT,
    Alt,
    Automaton,
    CharClass,
    Expr,
    Grammar,
    GrammarBuilder,
    Lit,
    Ref,
    Repeat,
    Seq,
    Special,
    alt,
    complement_ranges,
    normalize_ranges,
    opt,
    seq,
    star,
)

__all__ = [
    "structural_tag_to_grammar",
    "embed_grammar",
    "text_avoiding",
    "literal",
    "ANY_CHAR",
]

ANY_CHAR = CharClass(((0, MAX_CODE_POINT),))
"""One Unicode scalar value as UTF-8 (surrogates excluded)."""


# ----------------------------------------------------------------------------------------------
# Shared IR helpers
# ----------------------------------------------------------------------------------------------


def _rename(e: Expr, names: dict[str, str]) -> Expr:
    if isinstance(e, Ref):
        return Ref(names[e.name])
    if isinstance(e, Seq):
        return Seq(tuple(_rename(x, names) for x in e.items))
    if isinstance(e, Alt):
        return Alt(tuple(_rename(x, names) for x in e.options))
    if isinstance(e, Repeat):
        return Repeat(_rename(e.body, names), e.lo, e.hi)
    if isinstance(e, Automaton):
        return Automaton(e.n_states, tuple((p, _rename(x, names), q) for p, x, q in e.edges), e.finals)
    return e


def embed_grammar(builder: GrammarBuilder, grammar: Grammar, prefix: str) -> Ref:
    """Add every rule of ``grammar`` to ``builder`` as ``prefix + name``; return a reference to its root.

    The rules keep their expressions (special tokens included), so the embedded language is
    exactly ``grammar``'s. ``prefix`` must make the names unique in ``builder``.
    """
    names = {n: prefix + n for n in grammar.rule_names}
    for n, body in zip(grammar.rule_names, grammar.rule_exprs):
        builder.rule(names[n], _rename(body, names))
    return Ref(names[grammar.rule_names[grammar.root]])


def literal(text: str, special_tokens: Collection[str] = ()) -> Expr:
    """``text`` as an expression; every substring that spells one of ``special_tokens`` becomes that token.

    At each position the longest special-token name that starts there wins.
    """
    if not special_tokens or not text:
        return Lit(text.encode("utf-8"))
    by_first: dict[str, list[str]] = {}
    for name in special_tokens:
        if name:
            by_first.setdefault(name[0], []).append(name)
    for names in by_first.values():
        names.sort(key=len, reverse=True)
    parts: list[Expr] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        hit = next((n for n in by_first.get(text[i], ()) if text.startswith(n, i)), None)
        if hit is None:
            buf.append(text[i])
            i += 1
            continue
        if buf:
            parts.append(Lit("".join(buf).encode("utf-8")))
            buf = []
        parts.append(Special(hit))
        i += len(hit)
    if buf:
        parts.append(Lit("".join(buf).encode("utf-8")))
    return seq(*parts) if parts else EMPTY


def _is_text(e: Expr) -> bool:
    return isinstance(e, Lit)


def text_avoiding(avoid: Iterable[str], followers: Iterable[str] = ()) -> Expr:
    """Any text (UTF-8) that contains none of the strings ``avoid``.

    ``followers`` (each also in ``avoid``) are the strings that may come right after the text:
    the text may only end where appending any follower creates no avoided string before that
    follower's last character, so in ``text + follower`` the first avoided occurrence is the
    follower itself (the boundary is unambiguous even for self-overlapping strings).

    The automaton is Aho-Corasick over code points: its states are the trie nodes that complete no
    avoided string, and characters outside the avoided strings' alphabet go back to the root.
    """
    pats = sorted(set(avoid))
    if "" in pats:
        raise GrammarError("cannot exclude the empty string from text")
    follow = sorted(set(followers))
    missing = [f for f in follow if f not in pats]
    if missing:
        raise GrammarError(f"text followers {missing} must also be avoided")
    if not pats:
        return star(ANY_CHAR)
    # Trie over code points.
    children: list[dict[str, int]] = [{}]
    terminal = [False]
    for p in pats:
        node = 0
        for ch in p:
            nxt = children[node].get(ch)
            if nxt is None:
                nxt = len(children)
                children[node][ch] = nxt
                children.append({})
                terminal.append(False)
            node = nxt
        terminal[node] = True
    alphabet = sorted({ch for p in pats for ch in p})
    # BFS for failure links; a node is dead if it or a failure ancestor completes a pattern.
    fail = [0] * len(children)
    order = [0]
    for node in order:
        for ch, child in children[node].items():
            if node != 0:
                f = fail[node]
                while f and ch not in children[f]:
                    f = fail[f]
                fail[child] = children[f].get(ch, 0)
            terminal[child] = terminal[child] or terminal[fail[child]]
            order.append(child)

    def step(node: int, ch: str) -> int:
        while node and ch not in children[node]:
            node = fail[node]
        return children[node].get(ch, 0)

    live = [n for n in order if not terminal[n]]
    index = {n: i for i, n in enumerate(live)}

    def may_end(node: int) -> bool:
        for f in follow:
            cur = node
            for ch in f[:-1]:
                cur = step(cur, ch)
                if terminal[cur]:
                    return False
        return True

    other = CharClass(complement_ranges(normalize_ranges((ord(c), ord(c)) for c in alphabet), MAX_CODE_POINT))
    edges: list[tuple[int, Expr, int]] = []
    for n in live:
        for ch in alphabet:
            t = step(n, ch)
            if not terminal[t]:
                edges.append((index[n], Lit(ch.encode("utf-8")), index[t]))
        if other.ranges:
            edges.append((index[n], other, 0))
    finals = tuple(index[n] for n in live if may_end(n))
    return Automaton(len(live), tuple(edges), finals)


# ----------------------------------------------------------------------------------------------
# Structural tags
# ----------------------------------------------------------------------------------------------

_FORMATS = ("const_string", "json_schema", "grammar", "regex", "any_text", "sequence", "or", "tag",
            "triggered_tags", "tags_with_separator")


class _Compiler:
    def __init__(self, special_tokens: Collection[str]):
        self.specials = frozenset(special_tokens)
        self.b = GrammarBuilder()

    # -- small readers ---------------------------------------------------------------------

    @staticmethod
    def _fail(path: str, msg: str) -> GrammarError:
        return GrammarError(f"structural tag: {path}: {msg}")

    def _obj(self, node: Any, path: str) -> dict:
        if not isinstance(node, dict):
            raise self._fail(path, f"expected an object, got {type(node).__name__}")
        return node

    def _str(self, node: dict, key: str, path: str) -> str:
        v = node.get(key)
        if not isinstance(v, str):
            raise self._fail(f"{path}.{key}", f"expected a string, got {type(v).__name__}")
        return v

    def _bool(self, node: dict, key: str, path: str, default: bool) -> bool:
        v = node.get(key, default)
        if not isinstance(v, bool):
            raise self._fail(f"{path}.{key}", f"expected true or false, got {v!r}")
        return v

    def _list(self, node: dict, key: str, path: str, nonempty: bool = True) -> list:
        v = node.get(key, None if nonempty else [])
        if not isinstance(v, list) or (nonempty and not v):
            raise self._fail(f"{path}.{key}", "expected a non-empty list" if nonempty else "expected a list")
        return v

    def _strings(self, node: dict, key: str, path: str) -> list[str]:
        v = self._list(node, key, path, nonempty=False)
        for i, s in enumerate(v):
            if not isinstance(s, str) or not s:
                raise self._fail(f"{path}.{key}[{i}]", "expected a non-empty string")
        return v

    def _rule(self, prefix: str, body: Expr) -> Ref:
        return Ref(self.b.rule(self.b.fresh(prefix), body))

    def _literal(self, node: Any, path: str) -> Expr:
        """A begin/end/separator: a string, or a token format naming a special token."""
        if isinstance(node, str):
            return literal(node, self.specials)
        if isinstance(node, dict) and node.get("type") == "token":
            name = node.get("token")
            if not isinstance(name, str):
                raise self._fail(f"{path}.token", "only special tokens named by their content are supported")
            if self.specials and name not in self.specials:
                raise self._fail(f"{path}.token", f"{name!r} is not a special token of this tokenizer")
            return Special(name)
        raise self._fail(path, "expected a string or a token format")

    # -- formats ---------------------------------------------------------------------------

    def format(self, node: Any, path: str, ends: tuple[str, ...]) -> Expr:
        """The expression for one format; ``ends`` are the plain-text strings that end the enclosing tag."""
        node = self._obj(node, path)
        kind = node.get("type")
        if kind == "const_string":
            return literal(self._str(node, "value", path), self.specials)
        if kind == "json_schema":
            return self.json_schema(node, path)
        if kind == "grammar":
            from stencil.grammar.ebnf import ebnf_to_grammar

            text = self._str(node, "grammar", path)
            try:
                g = ebnf_to_grammar(text, root="root")
            except GrammarError as e:
                raise self._fail(f"{path}.grammar", str(e)) from None
            return embed_grammar(self.b, g, self.b.fresh("g") + "_")
        if kind == "regex":
            from stencil.grammar.regex import regex_to_expr

            if node.get("excludes"):
                raise self._fail(f"{path}.excludes", "excludes on a regex are not supported")
            try:
                return self._rule("regex", regex_to_expr(self._str(node, "pattern", path), anchored=True))
            except RegexError as e:
                raise self._fail(f"{path}.pattern", str(e)) from None
        if kind == "any_text":
            excl = self._strings(node, "excludes", path) + self._strings(node, "excluded_str", path)
            return self._rule("text", text_avoiding(list(excl) + list(ends), ends))
        if kind in ("sequence", "or"):
            elems = self._list(node, "elements", path)
            if kind == "or":
                return alt(*(self.format(x, f"{path}.elements[{i}]", ends) for i, x in enumerate(elems)))
            last = len(elems) - 1
            return seq(*(self.format(x, f"{path}.elements[{i}]", ends if i == last else ())
                         for i, x in enumerate(elems)))
        if kind == "tag":
            return self.tag(node, path)
        if kind == "triggered_tags":
            return self.triggered_tags(node, path, ends)
        if kind == "tags_with_separator":
            return self.tags_with_separator(node, path)
        raise self._fail(f"{path}.type", f"unknown format {kind!r}; supported: {', '.join(_FORMATS)}")

    def json_schema(self, node: dict, path: str) -> Expr:
        from stencil.grammar.json_schema import json_schema_to_grammar

        if "json_schema" not in node:
            raise self._fail(path, "a json_schema format needs 'json_schema'")
        style = node.get("style", "json")
        if style != "json":
            raise self._fail(f"{path}.style", f"only the 'json' style is supported, not {style!r}")
        for key in ("indent", "separators"):
            if node.get(key) is not None:
                raise self._fail(f"{path}.{key}", "is not supported; use any_whitespace")
        try:
            g = json_schema_to_grammar(
                node["json_schema"],
                strict=self._bool(node, "strict_mode", path, True),
                any_order=self._bool(node, "any_order", path, False),
                whitespace="flexible" if self._bool(node, "any_whitespace", path, True) else "compact",
            )
        except SchemaError as e:
            raise self._fail(f"{path}.json_schema", str(e)) from None
        return embed_grammar(self.b, g, self.b.fresh("js") + "_")

    def _ends(self, node: dict, path: str) -> tuple[list[Expr], list[str] | None]:
        """The end alternatives, and those that are plain text (None if one is empty)."""
        raw = node.get("end")
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise self._fail(f"{path}.end", "expected a string, a non-empty list of strings, or a token")
        exprs = [self._literal(x, f"{path}.end" if len(items) == 1 else f"{path}.end[{i}]") for i, x in enumerate(items)]
        if any(x == "" for x in items):
            # An empty end cannot bound free text: the content runs to wherever the tag is followed.
            return exprs, None
        return exprs, [x for e, x in zip(exprs, items) if _is_text(e)]

    def tag(self, node: dict, path: str) -> Expr:
        node = self._obj(node, path)
        if node.get("type", "tag") != "tag":
            raise self._fail(f"{path}.type", "expected a tag")
        begin = self._literal(node.get("begin"), f"{path}.begin")
        end_exprs, end_texts = self._ends(node, path)
        if "content" not in node:
            raise self._fail(path, "a tag needs 'content'")
        content = self.format(node["content"], f"{path}.content", tuple(end_texts or ()))
        return self._rule("tag", seq(begin, content, alt(*end_exprs)))

    def _tags(self, node: dict, path: str) -> tuple[list[dict], Ref]:
        tags = self._list(node, "tags", path)
        exprs = [self.tag(t, f"{path}.tags[{i}]") for i, t in enumerate(tags)]
        return tags, self._rule("tags", alt(*exprs))

    def triggered_tags(self, node: dict, path: str, ends: tuple[str, ...]) -> Expr:
        triggers = self._strings(node, "triggers", path)
        if not triggers:
            raise self._fail(f"{path}.triggers", "expected a non-empty list of strings")
        tags, any_tag = self._tags(node, path)
        for i, t in enumerate(tags):
            begin = t.get("begin")
            if not isinstance(begin, str):
                raise self._fail(f"{path}.tags[{i}].begin", "a triggered tag's begin must be a string")
            hits = [tr for tr in triggers if begin.startswith(tr)]
            if len(hits) != 1:
                raise self._fail(f"{path}.tags[{i}].begin",
                                 f"{begin!r} must start with exactly one trigger, but starts with {len(hits)} of {triggers}")
        # Triggers that start with a special token cannot occur inside text: nothing to exclude.
        text_triggers = [tr for tr in triggers if _is_text(literal(tr, self.specials))]
        excl = self._strings(node, "excludes", path)
        avoid = text_triggers + excl + list(ends)
        mid = self._rule("text", text_avoiding(avoid, text_triggers))
        last = self._rule("text", text_avoiding(avoid, ends))
        at_least_one = self._bool(node, "at_least_one", path, False)
        stop_after_first = self._bool(node, "stop_after_first", path, False)
        if stop_after_first:
            return any_tag if at_least_one else alt(last, seq(mid, any_tag))
        more = star(seq(mid, any_tag))
        return seq(any_tag, more, last) if at_least_one else seq(more, last)

    def tags_with_separator(self, node: dict, path: str) -> Expr:
        _, any_tag = self._tags(node, path)
        if "separator" not in node:
            raise self._fail(path, "tags_with_separator needs 'separator'")
        sep = self._literal(node["separator"], f"{path}.separator")
        at_least_one = self._bool(node, "at_least_one", path, False)
        stop_after_first = self._bool(node, "stop_after_first", path, False)
        body = any_tag if stop_after_first else seq(any_tag, star(seq(sep, any_tag)))
        return body if at_least_one else opt(body)


def _legacy(tag: dict) -> dict:
    """The legacy ``{"structures": [...], "triggers": [...]}`` form as triggered tags."""
    structures = tag.get("structures")
    if not isinstance(structures, list):
        raise GrammarError("structural tag: structures: expected a list")
    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not {"begin", "schema", "end"} <= s.keys():
            raise GrammarError(f"structural tag: structures[{i}]: expected an object with begin, schema and end")
        try:
            schema = json.loads(s["schema"]) if isinstance(s["schema"], str) else s["schema"]
        except json.JSONDecodeError as e:
            raise GrammarError(f"structural tag: structures[{i}].schema: not valid JSON ({e.msg})") from None
        tags.append({"type": "tag", "begin": s["begin"], "end": s["end"],
                     "content": {"type": "json_schema", "json_schema": schema}})
    return {"type": "triggered_tags", "triggers": tag.get("triggers"), "tags": tags}


def structural_tag_to_grammar(tag: dict | str, *, special_tokens: Collection[str] = ()) -> Grammar:
    """Compile a structural tag (see the module docstring) into a grammar whose start rule is ``root``.

    ``special_tokens``: names of the tokenizer's special tokens; literal strings that spell one
    match that token (without it, every literal is plain text and ``token`` formats are bound to
    the tokenizer later, when the grammar is compiled).
    """
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError as e:
            raise GrammarError(f"structural tag: not valid JSON ({e.msg})", line=e.lineno, column=e.colno) from None
    if not isinstance(tag, dict):
        raise GrammarError(f"structural tag: expected a JSON object, got {type(tag).__name__}")
    if "structures" in tag:
        fmt, path = _legacy(tag), "structures"
    elif tag.get("type") == "structural_tag" or "format" in tag:
        if "format" not in tag:
            raise GrammarError("structural tag: a structural_tag needs 'format'")
        fmt, path = tag["format"], "format"
    else:
        fmt, path = tag, "format"
    c = _Compiler(special_tokens)
    c.b.rule("root", c.format(fmt, path, ()))
    return c.b.build("root")
