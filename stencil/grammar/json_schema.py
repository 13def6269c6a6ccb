"""JSON Schema frontend (and the builtin JSON grammar): schemas become exact grammars.

Pipeline. The schema document is indexed once (``$id`` resources, ``$anchor`` names, JSON pointers);
every subschema becomes an *atom* keyed by its canonical JSON and base URI, so identical subschemas
share one grammar rule however often they occur. A set of atoms (their conjunction, a *Sub*) is
normalized into a disjunctive normal form of :class:`Conj` shapes: per JSON kind (null, true, false,
number, string, array, object) the constraints that all atoms put on it. ``allOf``, ``$ref`` and
their siblings intersect, ``anyOf``/``if``/``dependentSchemas`` distribute into alternatives,
``not`` and overlapping ``oneOf`` branches go through an exact negation of shapes. Each Sub then
becomes one grammar rule; object and array members refer to their value's rule (recursion is
allowed), and strings and numbers become automata from :mod:`stencil.grammar.json_lex`.

Soundness is the rule: a keyword that cannot be enforced exactly raises :class:`SchemaError` naming
the keyword and its JSON pointer; ``lenient=True`` instead compiles a superset and warns, listing
every dropped or loosened keyword. Documented choices (see docs/json_schema.md):

* Property order follows ``properties`` (then names that are only ``required``); undeclared
  properties may appear anywhere between them. ``any_order=True`` accepts any order.
* Numbers compare exactly in positional notation; exponent notation is accepted where provably in
  range (see :mod:`stencil.grammar.json_lex`). Integers accept ``5`` and ``5.0``.
* Strings accept every JSON spelling (raw UTF-8, short escapes, ``\\uXXXX``), and lengths count code
  points. Supported ``format`` values are enforced, unknown ones are annotations.
* Duplicate member names are never needed to satisfy a constraint: ``minProperties`` counts
  undeclared members at most once unless that is inexact, which is an error (``lenient`` counts them).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable
from urllib.parse import unquote, urldefrag, urljoin

from stencil.errors import GrammarError, RegexError, SchemaError
from stencil.grammar import json_lex as lx
from stencil.grammar.ir import (
    EMPTY,
    NOTHING,
    Automaton,
    ByteClass,
    CharClass,
    Expr,
    Grammar,
    GrammarBuilder,
    Ref,
    Repeat,
    alt,
    derivable_rules,
    lit,
    opt,
    seq,
    star,
)

__all__ = [
    "builtin_json_grammar",
    "json_schema_to_grammar",
    "UnsatisfiableSchemaError",
    "DEFAULT_MAX_WHITESPACE",
]

DEFAULT_MAX_WHITESPACE = 64
"""Default bound on spaces/tabs on each side of the one line break that flexible whitespace allows."""


class UnsatisfiableSchemaError(SchemaError):
    """The schema accepts no JSON value at all (e.g. ``false``, or ``allOf`` of disjoint types)."""


# ----------------------------------------------------------------------------------------------
# Whitespace and the builtin JSON grammar
# ----------------------------------------------------------------------------------------------

_JSON_WS_BYTES = frozenset(b" \t\n\r")


def _whitespace_expr(whitespace: str, max_whitespace: int) -> tuple[Expr, bool]:
    """(expression between tokens, whether it also surrounds the top-level value)."""
    if whitespace == "compact":
        return EMPTY, False
    if whitespace == "flexible":
        if not isinstance(max_whitespace, int) or max_whitespace < 0:
            raise SchemaError(f"max_whitespace must be a non-negative integer, got {max_whitespace!r}")
        run = Repeat(ByteClass(((0x09, 0x09), (0x20, 0x20))), 0, max_whitespace)
        return seq(run, opt(seq(opt(lit("\r")), lit("\n"), run))), False
    if whitespace == "any":
        return star(ByteClass(((0x09, 0x0A), (0x0D, 0x0D), (0x20, 0x20)))), True
    if not isinstance(whitespace, str):
        raise SchemaError(f"whitespace must be 'flexible', 'compact', 'any' or a regex, got {whitespace!r}")
    from stencil.grammar.regex import regex_to_expr

    try:
        e = regex_to_expr(whitespace, anchored=True)
        dfa = lx.dfa_from_expr(e)
    except (RegexError, lx.LexLimit) as err:
        raise SchemaError(f"bad whitespace pattern {whitespace!r}: {err}") from None
    for row in dfa.trans:
        for lo, hi, _ in row:
            if any(c not in _JSON_WS_BYTES for c in range(lo, min(hi, 0x7F) + 1)) or hi > 0x7F:
                raise SchemaError(f"whitespace pattern {whitespace!r} matches characters other than JSON whitespace")
    return e, False


def _json_rules(b: GrammarBuilder, ws: Expr, prefix: str = "json_") -> dict[str, str]:
    """Add the rules of an unconstrained JSON value to ``b``; return their names by kind."""
    names = {k: f"{prefix}{k}" for k in ("value", "object", "array", "string", "number", "ws")}
    w = Ref(names["ws"])
    b.rule(names["ws"], ws)
    value = Ref(names["value"])
    member = seq(Ref(names["string"]), w, lit(":"), w, value)
    b.rule(names["value"], alt(Ref(names["object"]), Ref(names["array"]), Ref(names["string"]), Ref(names["number"]),
                               lit("true"), lit("false"), lit("null")))
    b.rule(names["object"], seq(lit("{"), w, opt(seq(member, w, star(seq(lit(","), w, member, w)))), lit("}")))
    b.rule(names["array"], seq(lit("["), w, opt(seq(value, w, star(seq(lit(","), w, value, w)))), lit("]")))
    b.rule(names["string"], seq(lit('"'), star(lx.json_char(lx.ALL)), lit('"')))
    b.rule(names["number"], lx.NUMBER)
    return names


def builtin_json_grammar(*, whitespace: str = "flexible", max_whitespace: int = DEFAULT_MAX_WHITESPACE) -> Grammar:
    """A grammar for any RFC 8259 JSON value.

    Exact except that escaped lone surrogates (``"\\ud800"``) are rejected: RFC 8259 calls such
    strings not interoperable, and they have no UTF-8 encoding. ``whitespace``: ``"flexible"``
    (between tokens at most one line break, with at most ``max_whitespace`` spaces/tabs on either
    side of it; accepts ``json.dumps`` output with or without ``indent``), ``"compact"`` (none),
    ``"any"`` (RFC 8259: unbounded, also around the value) or a regex over JSON whitespace.
    """
    ws, around = _whitespace_expr(whitespace, max_whitespace)
    b = GrammarBuilder()
    names = _json_rules(b, ws)
    b.rule("root", seq(Ref(names["ws"]), Ref(names["value"]), Ref(names["ws"])) if around else Ref(names["value"]))
    return b.build("root")


# ----------------------------------------------------------------------------------------------
# Values: canonical forms with JSON Schema equality (1 == 1.0, key order irrelevant, 0 != false)
# ----------------------------------------------------------------------------------------------

KINDS = ("null", "true", "false", "number", "string", "array", "object")
ALL_KINDS = frozenset(KINDS)
_TYPE_KINDS = {
    "null": {"null"},
    "boolean": {"true", "false"},
    "number": {"number"},
    "integer": {"number"},
    "string": {"string"},
    "array": {"array"},
    "object": {"object"},
}


def _num(x: Any) -> Decimal:
    """A JSON number as an exact decimal (floats by their shortest repr, as json.dumps writes them)."""
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"{x!r} is not a JSON number")
        return Decimal(repr(x))
    return Decimal(x)


def _cv(v: Any) -> tuple:
    """Canonical, hashable form of a JSON value; equal iff JSON Schema calls the values equal."""
    if v is None:
        return ("null",)
    if v is True or v is False:
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", _num(v).normalize())
    if isinstance(v, str):
        return ("str", v)
    if isinstance(v, (list, tuple)):
        return ("arr", tuple(_cv(x) for x in v))
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise ValueError("object keys must be strings")
        return ("obj", tuple(sorted((k, _cv(x)) for k, x in v.items())))
    raise ValueError(f"{type(v).__name__} is not a JSON value")


def _cv_kind(cv: tuple) -> str:
    tag = cv[0]
    if tag == "bool":
        return "true" if cv[1] else "false"
    return {"null": "null", "num": "number", "str": "string", "arr": "array", "obj": "object"}[tag]


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------

Sub = frozenset  # a conjunction of atom ids; frozenset() is the schema ``true``
TRUE: Sub = frozenset()
FALSE_ID = 0  # the atom of the schema ``false`` (always created first)


@dataclass(frozen=True)
class Arr:
    """Array constraints of one conjunction."""

    prefix: tuple = ()  # Sub per leading position
    rest: Sub = TRUE  # items after the prefix
    min: int = 0
    max: int | None = None
    contains: tuple = ()  # (Sub, min, max | None, first position it applies from, pointer)
    unique: str | None = None  # pointer of a uniqueItems: true
    # What the keywords behind this shape evaluate (for unevaluatedItems): leading positions, all
    # items, and items matching these contains schemas. Shapes made by negation evaluate nothing.
    ev_prefix: int = 0
    ev_all: bool = False
    ev_contains: tuple = ()


@dataclass(frozen=True)
class ObjComp:
    """One schema's properties / patternProperties / additionalProperties, which act together."""

    props: tuple = ()  # ((name, Sub), ...)
    patterns: tuple = ()  # ((regex, Sub, pointer), ...)
    additional: Sub = TRUE
    explicit: bool = False  # additionalProperties was given
    evaluates: bool = False  # produces annotations for unevaluatedProperties (not made by negation)


@dataclass(frozen=True)
class Obj:
    """Object constraints of one conjunction."""

    comps: tuple = ()
    required: tuple = ()  # names, in first-seen order
    min: int = 0
    max: int | None = None
    names: Sub = TRUE  # propertyNames
    min_ptr: str = ""
    # "Some member has a key in this language and a value in this Sub" (from negating
    # patternProperties/additionalProperties/propertyNames): ((key language spec, Sub), ...), where a
    # spec is (patterns it matches, patterns it does not match, names it is not, Sub it fails or None).
    exists: tuple = ()


@dataclass(frozen=True)
class Conj:
    """The constraints one alternative puts on each JSON kind; kinds not listed are excluded."""

    kinds: frozenset = ALL_KINDS
    num: frozenset = frozenset()  # number atoms, see _num_atoms
    strs: frozenset = frozenset()  # string atoms, see _str_atoms
    arr: Arr | None = None
    obj: Obj | None = None
    enum: frozenset | None = None  # canonical values, when the alternative is a finite set

    def only(self, *kinds: str) -> "Conj":
        return replace(self, kinds=self.kinds & frozenset(kinds))


TOP = Conj()
DNF = tuple  # tuple[Conj, ...]: a union; () is the empty language


def _uniq(items: Iterable) -> tuple:
    return tuple(dict.fromkeys(items))


def _meet_arr(a: Arr | None, b: Arr | None) -> Arr | None:
    if a is None or b is None:
        return a or b
    n = max(len(a.prefix), len(b.prefix))
    pa = a.prefix + (a.rest,) * (n - len(a.prefix))
    pb = b.prefix + (b.rest,) * (n - len(b.prefix))
    mx = a.max if b.max is None else (b.max if a.max is None else min(a.max, b.max))
    return Arr(
        prefix=tuple(x | y for x, y in zip(pa, pb)),
        rest=a.rest | b.rest,
        min=max(a.min, b.min),
        max=mx,
        contains=_uniq(a.contains + b.contains),
        unique=a.unique or b.unique,
        ev_prefix=max(a.ev_prefix, b.ev_prefix),
        ev_all=a.ev_all or b.ev_all,
        ev_contains=_uniq(a.ev_contains + b.ev_contains),
    )


def _meet_obj(a: Obj | None, b: Obj | None) -> Obj | None:
    if a is None or b is None:
        return a or b
    mx = a.max if b.max is None else (b.max if a.max is None else min(a.max, b.max))
    return Obj(
        comps=_uniq(a.comps + b.comps),
        required=_uniq(a.required + b.required),
        min=max(a.min, b.min),
        max=mx,
        names=a.names | b.names,
        min_ptr=a.min_ptr if a.min >= b.min else b.min_ptr,
        exists=_uniq(a.exists + b.exists),
    )


def _tidy(c: Conj) -> Conj | None:
    """Drop constraints on excluded kinds (so equal languages share rules); None if nothing is left."""
    kinds = c.kinds
    enum = c.enum
    if enum is not None:
        enum = frozenset(v for v in enum if _cv_kind(v) in kinds)
        kinds = kinds & frozenset(_cv_kind(v) for v in enum)
    if "number" in kinds and ("int",) in c.num and ("nint",) in c.num:
        kinds = kinds - {"number"}
    if c.arr is not None and c.arr.max is not None and c.arr.min > c.arr.max:
        kinds = kinds - {"array"}
    if c.obj is not None and (
        c.obj.max is not None and max(c.obj.min, len(c.obj.required)) > c.obj.max
        or any(n in c.obj.required and FALSE_ID in sub for comp in c.obj.comps for n, sub in comp.props)
    ):
        kinds = kinds - {"object"}
    if c.arr is not None and any(FALSE_ID in x for x in c.arr.prefix[: c.arr.min]):
        kinds = kinds - {"array"}
    if not kinds:
        return None
    return Conj(
        kinds=kinds,
        num=c.num if "number" in kinds else frozenset(),
        strs=c.strs if "string" in kinds else frozenset(),
        arr=c.arr if "array" in kinds else None,
        obj=c.obj if "object" in kinds else None,
        enum=enum,
    )


def _meet(a: Conj, b: Conj) -> Conj | None:
    if a == TOP:
        return b
    if b == TOP:
        return a
    if a.enum is not None and b.enum is not None:
        enum = a.enum & b.enum
    else:
        enum = a.enum if a.enum is not None else b.enum
    return _tidy(
        Conj(
            kinds=a.kinds & b.kinds,
            num=a.num | b.num,
            strs=a.strs | b.strs,
            arr=_meet_arr(a.arr, b.arr),
            obj=_meet_obj(a.obj, b.obj),
            enum=enum,
        )
    )


MAX_ALTERNATIVES = 512


def _meet_dnf(a: DNF, b: DNF, ptr: str) -> DNF:
    out: dict[Conj, None] = {}
    for x in a:
        for y in b:
            m = _meet(x, y)
            if m is not None:
                out[m] = None
        if len(out) > MAX_ALTERNATIVES:
            raise SchemaError(
                f"schema too complex: more than {MAX_ALTERNATIVES} alternatives after distributing "
                "anyOf/oneOf/if/dependencies", pointer=ptr)
    return tuple(out)


def _join_dnf(*parts: DNF) -> DNF:
    return tuple(dict.fromkeys(c for p in parts for c in p))


def _esc(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


# ----------------------------------------------------------------------------------------------
# The schema document: resources, anchors, pointers
# ----------------------------------------------------------------------------------------------

_DEFAULT_BASE = "https://stencil.invalid/schema.json"
# Keywords whose value is a subschema / a list of subschemas / a map of subschemas.
_SUB_ONE = ("additionalProperties", "propertyNames", "items", "additionalItems", "contains", "not", "if", "then",
            "else", "unevaluatedItems", "unevaluatedProperties", "contentSchema")
_SUB_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")


def _join_uri(base: str, ref: str) -> str:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", ref):
        return ref
    if ref.startswith("#"):
        return urldefrag(base)[0] + ref
    if re.match(r"^(urn|tag):", base, re.I):
        # Non-hierarchical bases: only fragments can be relative to them.
        return ref
    return urljoin(base, ref)


class _Document:
    """Indexes a schema document: the base URI and pointer of every subschema, resources and anchors."""

    def __init__(self, root: Any, draft4: bool) -> None:
        self.root = root
        self.draft4 = draft4
        self.resources: dict[str, Any] = {}  # absolute URI without fragment -> schema
        self.has_unevaluated = False
        self.anchors: dict[tuple[str, str], Any] = {}
        self.dynamic_anchors: dict[str, set] = {}  # resource URI -> its $dynamicAnchor names
        self.info: dict[int, tuple[str, str]] = {}  # id(schema dict) -> (base URI, pointer)
        self._keep: list = []  # keeps indexed objects alive so id() stays unique
        self.index(root, _DEFAULT_BASE, "")
        self.resources.setdefault(_DEFAULT_BASE, root)

    def index(self, node: Any, base: str, ptr: str) -> None:
        stack = [(node, base, ptr)]
        while stack:
            s, base, ptr = stack.pop()
            if not isinstance(s, dict) or id(s) in self.info:
                continue
            sid = s.get("$id")
            if not isinstance(sid, str) and self.draft4:
                sid = s.get("id") if isinstance(s.get("id"), str) else None
            if isinstance(sid, str) and not ("$ref" in s and self.draft4):
                full, frag = urldefrag(_join_uri(base, sid))
                if frag and not frag.startswith("/"):
                    self.anchors[(full, frag)] = s  # draft-04/06 style "#name" ids
                else:
                    base = full
                    self.resources[base] = s
            self.info[id(s)] = (base, ptr)
            self._keep.append(s)
            if "unevaluatedProperties" in s or "unevaluatedItems" in s:
                self.has_unevaluated = True
            for key in ("$anchor", "$dynamicAnchor"):
                a = s.get(key)
                if isinstance(a, str):
                    self.anchors[(base, a)] = s
                    if key == "$dynamicAnchor":
                        self.dynamic_anchors.setdefault(base, set()).add(a)
            for k in _SUB_ONE:
                if k in s and isinstance(s[k], (dict, bool)):
                    stack.append((s[k], base, f"{ptr}/{k}"))
            for k in _SUB_LIST:
                if isinstance(s.get(k), list):
                    stack.extend((x, base, f"{ptr}/{k}/{i}") for i, x in enumerate(s[k]))
            for k in _SUB_MAP:
                if isinstance(s.get(k), dict):
                    stack.extend((x, base, f"{ptr}/{k}/{_esc(n)}") for n, x in s[k].items() if isinstance(x, (dict, bool)))

    def enter(self, ctx: tuple, resource: str) -> tuple:
        """The dynamic scope after entering ``resource``: its anchors, unless an outer one has them."""
        names = self.dynamic_anchors.get(resource)
        if not names:
            return ctx
        have = {n for n, _ in ctx}
        new = [(n, resource) for n in names if n not in have]
        return tuple(sorted(ctx + tuple(new))) if new else ctx

    def where(self, node: Any, default_base: str, default_ptr: str) -> tuple[str, str]:
        return self.info.get(id(node), (default_base, default_ptr))

    def resolve(self, ref: str, base: str, ptr: str) -> tuple[Any, str, str]:
        """(schema, its base URI, its pointer) that ``ref`` names from a schema whose base is ``base``."""
        full = _join_uri(base, ref)
        uri, frag = urldefrag(full)
        frag = unquote(frag)
        target = self.resources.get(uri)
        if target is None:
            target = _known_remote(uri)
            if target is None:
                raise SchemaError(f"$ref {ref!r} points outside this document ({uri}), which is not available",
                                  pointer=ptr)
            self.resources[uri] = target
            self.index(target, uri, f"<{uri}>")
        if not frag:
            b, p = self.where(target, uri, f"<{uri}>")
            return target, b, p
        if not frag.startswith("/"):
            s = self.anchors.get((uri, frag))
            if s is None:
                raise SchemaError(f"$ref {ref!r}: no anchor {frag!r} in {uri}", pointer=ptr)
            b, p = self.where(s, uri, ptr)
            return s, b, p
        node = target
        b, p = self.where(target, uri, "")
        for raw in frag.split("/")[1:]:
            tok = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and tok in node:
                node = node[tok]
            elif isinstance(node, list) and tok.isdigit() and int(tok) < len(node):
                node = node[int(tok)]
            else:
                raise SchemaError(f"$ref {ref!r}: JSON pointer {frag!r} does not resolve", pointer=ptr)
            p = f"{p}/{_esc(tok)}"
            if isinstance(node, dict) and id(node) in self.info:
                b, p = self.info[id(node)]
        if not isinstance(node, (dict, bool)):
            raise SchemaError(f"$ref {ref!r} does not point to a schema", pointer=ptr)
        if isinstance(node, dict) and id(node) not in self.info:
            self.index(node, b, p)
        return node, b, p


def _known_remote(uri: str) -> Any:
    """The published meta-schemas (shipped with ``jsonschema``), for ``$ref``s to them."""
    try:
        from jsonschema_specifications import REGISTRY
    except ImportError:  # pragma: no cover - jsonschema always brings it
        return None
    for cand in (uri, uri.rstrip("#"), uri + "#"):
        try:
            return REGISTRY[cand].contents
        except Exception:  # noqa: BLE001 - the registry raises its own lookup errors
            continue
    return None


# ----------------------------------------------------------------------------------------------
# Keyword value checks
# ----------------------------------------------------------------------------------------------


def _nonneg_int(v: Any, kw: str, ptr: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and not v.is_integer()):
        raise SchemaError(f"'{kw}' must be a non-negative integer, got {v!r}", pointer=ptr)
    return int(v)


def _number_value(v: Any, kw: str, ptr: str) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SchemaError(f"'{kw}' must be a number, got {v!r}", pointer=ptr)
    try:
        return _num(v).normalize()
    except (ValueError, InvalidOperation):
        raise SchemaError(f"'{kw}' must be a finite number, got {v!r}", pointer=ptr) from None


def _json_value(v: Any, kw: str, ptr: str) -> tuple:
    try:
        return _cv(v)
    except (ValueError, InvalidOperation) as e:
        raise SchemaError(f"'{kw}' must hold JSON values: {e}", pointer=ptr) from None


class _Unenforceable(Exception):
    """Internal: a keyword that cannot be enforced exactly (raised as SchemaError unless lenient)."""

    def __init__(self, message: str, pointer: str):
        super().__init__(message)
        self.message = message
        self.pointer = pointer


# ----------------------------------------------------------------------------------------------
# The compiler
# ----------------------------------------------------------------------------------------------


@dataclass
class _Options:
    strict: bool
    any_order: bool
    lenient: bool
    formats: str = "assert"


class _Normalizer:
    """Normalizes a schema document into shapes (DNFs of Conj) and answers questions about them."""

    MAX_RULES = 50_000
    MAX_DFA = 20_000

    def __init__(self, root: Any, opts: _Options, ws: Expr) -> None:
        self.opts = opts
        draft = root.get("$schema", "") if isinstance(root, dict) else ""
        self.draft4 = isinstance(draft, str) and "draft-04" in draft
        self.doc = _Document(root, self.draft4)
        self.atoms: list[tuple] = []
        self.atom_ids: dict[tuple, int] = {}
        self.atom_ptr: list[str] = []
        self.canon_ids: dict[tuple, int] = {}
        self.canon_memo: dict[int, tuple[int, bool]] = {}
        self.atom_shapes: dict[int, DNF] = {}
        self.sub_shapes: dict[Sub, DNF] = {}
        self.busy: set[int] = set()
        self.loosened: set[int] = set()
        self.loosen_stack: list[bool] = []
        self.warnings: list[str] = []
        self.value_order: dict[tuple, tuple] = {}  # canonical object value -> its keys in schema order
        self.FALSE = self._atom(("false",), "")
        assert self.FALSE == FALSE_ID
        self.FALSE_SUB: Sub = frozenset({self.FALSE})
        # emission state
        self.b = GrammarBuilder()
        self.json = _json_rules(self.b, ws)
        self.ws = Ref(self.json["ws"])
        self.rule_of: dict[Any, str] = {}
        self.queue: list[tuple[str, Callable[[], Expr]]] = []
        self.dfa_cache: dict[Any, Any] = {}
        self.root_sub = self.sub_of(root, _DEFAULT_BASE, "")

    # -- diagnostics --------------------------------------------------------------------------

    def unenforceable(self, message: str, pointer: str) -> None:
        """Raise, or in lenient mode record the loosening (the caller then compiles a superset)."""
        if not self.opts.lenient:
            raise SchemaError(message + " (lenient=True compiles a superset instead)", pointer=pointer)
        self.warnings.append(f"{pointer or '/'}: {message}")
        if self.loosen_stack:
            self.loosen_stack[-1] = True

    # -- atoms --------------------------------------------------------------------------------

    def _atom(self, key: tuple, ptr: str) -> int:
        a = self.atom_ids.get(key)
        if a is None:
            a = len(self.atoms)
            self.atom_ids[key] = a
            self.atoms.append(key)
            self.atom_ptr.append(ptr)
        return a

    def canon(self, node: Any) -> tuple[int, bool]:
        """(interned id of the node's canonical JSON, whether it contains a reference)."""
        if isinstance(node, (dict, list)):
            hit = self.canon_memo.get(id(node))
            if hit is not None:
                return hit
            if isinstance(node, dict):
                items = []
                has_ref = False
                for k in sorted(node):
                    if not isinstance(k, str):
                        raise SchemaError(f"schema object keys must be strings, got {k!r}")
                    cid, r = self.canon(node[k])
                    items.append((k, cid))
                    has_ref = has_ref or r or k in ("$ref", "$dynamicRef", "$recursiveRef")
                key: tuple = ("d", tuple(items))
            else:
                parts = [self.canon(x) for x in node]
                key = ("l", tuple(p[0] for p in parts))
                has_ref = any(p[1] for p in parts)
            cid = self.canon_ids.setdefault(key, len(self.canon_ids))
            self.canon_memo[id(node)] = (cid, has_ref)
            self.doc._keep.append(node)
            return cid, has_ref
        if node is None or isinstance(node, (bool, str, int)):
            return self.canon_ids.setdefault(("v", type(node).__name__, node), len(self.canon_ids)), False
        if isinstance(node, float):
            if not math.isfinite(node):
                raise SchemaError(f"{node!r} is not a JSON number")
            return self.canon_ids.setdefault(("v", "float", node), len(self.canon_ids)), False
        raise SchemaError(f"{type(node).__name__} is not a JSON value")

    def sub_of(self, node: Any, base: str, ptr: str, ctx: tuple = ()) -> Sub:
        """The Sub of a subschema found at ``ptr`` (``true``/``{}`` give the empty conjunction).

        ``ctx`` is the dynamic scope as far as ``$dynamicRef`` cares: for each dynamic anchor name,
        the outermost schema resource entered so far that defines it.
        """
        if node is True or (isinstance(node, dict) and not node):
            return TRUE
        if node is False:
            return self.FALSE_SUB
        if not isinstance(node, dict):
            raise SchemaError(f"a schema must be an object or a boolean, got {type(node).__name__}", pointer=ptr)
        base, ptr = self.doc.where(node, base, ptr)
        if self.doc.dynamic_anchors:
            ctx = self.doc.enter(ctx, base)
        else:
            ctx = ()
        cid, has_ref = self.canon(node)
        key = ("loc", cid, base if has_ref else "", ctx)
        a = self._atom(key, ptr)
        if len(self.atoms[a]) == 4:
            self.atoms[a] = key + (node, base)
        return frozenset({a})

    def dnf_sub(self, dnf: DNF) -> Sub:
        """A Sub whose shape is ``dnf``."""
        if dnf == (TOP,):
            return TRUE
        if not dnf:
            return self.FALSE_SUB
        return frozenset({self._atom(("dnf", dnf), "")})

    def const_sub(self, cv: tuple) -> Sub:
        return self.dnf_sub((Conj(kinds=frozenset({_cv_kind(cv)}), enum=frozenset({cv})),))

    def neg_sub(self, sub: Sub, ptr: str) -> Sub:
        if sub == TRUE:
            return self.FALSE_SUB
        if sub == self.FALSE_SUB:
            return TRUE
        if len(sub) == 1:
            (a,) = sub
            if self.atoms[a][0] == "neg":
                return self.atoms[a][1]
        return frozenset({self._atom(("neg", sub), ptr)})

    # -- shapes -------------------------------------------------------------------------------

    def shape(self, sub: Sub) -> DNF:
        hit = self.sub_shapes.get(sub)
        if hit is not None:
            return hit
        if self.FALSE in sub:
            out: DNF = ()
        else:
            out = (TOP,)
            for a in sorted(sub):
                out = _meet_dnf(out, self.atom_shape(a), self.atom_ptr[a])
                if not out:
                    break
        self.sub_shapes[sub] = out
        return out

    def atom_shape(self, a: int) -> DNF:
        hit = self.atom_shapes.get(a)
        if hit is not None:
            if a in self.loosened and self.loosen_stack:
                self.loosen_stack[-1] = True
            return hit
        if a in self.busy:
            raise SchemaError("the schema refers to itself without an enclosing property or item "
                              "(a $ref cycle that matches no finite value)", pointer=self.atom_ptr[a])
        self.busy.add(a)
        self.loosen_stack.append(False)
        try:
            key = self.atoms[a]
            if key[0] == "false":
                out: DNF = ()
            elif key[0] == "loc":
                out = self.normalize(key[4], key[5], self.atom_ptr[a], key[3])
            elif key[0] == "dnf":
                out = key[1]
            else:
                out = self.negate(key[1], self.atom_ptr[a])
        finally:
            self.busy.discard(a)
            loosened = self.loosen_stack.pop()
        if loosened:
            self.loosened.add(a)
            if self.loosen_stack:
                self.loosen_stack[-1] = True
        self.atom_shapes[a] = out
        return out

    def normalize(self, s: dict, base: str, ptr: str, ctx: tuple) -> DNF:
        """The shape of one schema object (its keywords intersected)."""
        kinds = ALL_KINDS
        num: set = set()
        strs: set = set()
        enum: frozenset | None = None
        arr: Arr | None = None
        obj: Obj | None = None
        extra: list[DNF] = []
        p = lambda kw: f"{ptr}/{_esc(kw)}"  # noqa: E731

        if "type" in s:
            t = s["type"]
            ts = [t] if isinstance(t, str) else t
            if not isinstance(ts, list) or not ts and False or not all(isinstance(x, str) and x in _TYPE_KINDS for x in ts):
                raise SchemaError(f"'type' must be a type name or a list of them, got {t!r}", pointer=p("type"))
            kinds = frozenset(k for x in ts for k in _TYPE_KINDS[x])
            if "integer" in ts and "number" not in ts:
                num.add(("int",))
        if "enum" in s:
            if not isinstance(s["enum"], list):
                raise SchemaError(f"'enum' must be an array, got {s['enum']!r}", pointer=p("enum"))
            enum = frozenset(self.record_value(v, "enum", p("enum")) for v in s["enum"])
        if "const" in s:
            c = self.record_value(s["const"], "const", p("const"))
            enum = frozenset({c}) if enum is None else enum & {c}

        # numbers
        for kw, op in (("minimum", "ge"), ("maximum", "le")):
            if kw in s:
                v = _number_value(s[kw], kw, p(kw))
                excl = s.get("exclusiveMinimum" if op == "ge" else "exclusiveMaximum")
                num.add(((("gt" if op == "ge" else "lt") if excl is True else op), v))
        for kw, op in (("exclusiveMinimum", "gt"), ("exclusiveMaximum", "lt")):
            if kw in s and not isinstance(s[kw], bool):
                num.add((op, _number_value(s[kw], kw, p(kw))))
        if "multipleOf" in s:
            m = _number_value(s["multipleOf"], "multipleOf", p("multipleOf"))
            if m <= 0:
                raise SchemaError(f"'multipleOf' must be greater than 0, got {s['multipleOf']!r}", pointer=p("multipleOf"))
            num.add(("mul", m, p("multipleOf")))

        # strings
        if "minLength" in s:
            strs.add(("min", _nonneg_int(s["minLength"], "minLength", p("minLength"))))
        if "maxLength" in s:
            strs.add(("max", _nonneg_int(s["maxLength"], "maxLength", p("maxLength"))))
        if "pattern" in s:
            if not isinstance(s["pattern"], str):
                raise SchemaError(f"'pattern' must be a string, got {s['pattern']!r}", pointer=p("pattern"))
            strs.add(("re", s["pattern"], p("pattern")))
        if "format" in s:
            from stencil.grammar import json_formats

            f = s["format"]
            if not isinstance(f, str):
                raise SchemaError(f"'format' must be a string, got {f!r}", pointer=p("format"))
            if self.opts.formats == "assert" and json_formats.is_assertable(f):
                strs.add(("fmt", f, p("format")))

        # arrays
        if any(k in s for k in ("items", "prefixItems", "minItems", "maxItems", "contains", "uniqueItems")):
            arr = self.array_keywords(s, base, ptr, ctx)

        # objects
        if any(k in s for k in ("properties", "patternProperties", "additionalProperties", "required",
                                "minProperties", "maxProperties", "propertyNames")):
            obj = self.object_keywords(s, base, ptr, ctx)
        for kw in ("dependentRequired", "dependentSchemas", "dependencies"):
            if kw in s:
                extra.extend(self.dependencies(s[kw], kw, base, p(kw), ctx))

        # applicators
        for kw in ("allOf", "anyOf", "oneOf"):
            if kw in s:
                xs = s[kw]
                if not isinstance(xs, list) or not xs:
                    raise SchemaError(f"'{kw}' must be a non-empty array of schemas", pointer=p(kw))
                subs = [self.sub_of(x, base, f"{p(kw)}/{i}", ctx) for i, x in enumerate(xs)]
                if kw == "allOf":
                    extra.extend(self.shape(x) for x in subs)
                elif kw == "anyOf":
                    extra.append(_join_dnf(*(self.shape(x) for x in subs)))
                else:
                    extra.append(self.one_of(subs, p(kw)))
        if "not" in s:
            extra.append(self.shape(self.neg_sub(self.sub_of(s["not"], base, p("not"), ctx), p("not"))))
        if "if" in s and ("then" in s or "else" in s or self.doc.has_unevaluated):
            cond = self.sub_of(s["if"], base, p("if"), ctx)
            then = self.sub_of(s.get("then", True), base, p("then"), ctx)
            other = self.sub_of(s.get("else", True), base, p("else"), ctx)
            yes = _meet_dnf(self.shape(cond), self.shape(then), p("if"))
            no = _meet_dnf(self.shape(self.neg_sub(cond, p("if"))), self.shape(other), p("if"))
            extra.append(_join_dnf(yes, no))
        if "$ref" in s:
            ref = s["$ref"]
            if not isinstance(ref, str):
                raise SchemaError(f"'$ref' must be a string, got {ref!r}", pointer=p("$ref"))
            node, b2, p2 = self.doc.resolve(ref, base, p("$ref"))
            extra.append(self.shape(self.sub_of(node, b2, p2, ctx)))
            if self.draft4:
                # Before draft 2019-09 a $ref replaces its siblings.
                return extra[-1]
        for kw in ("$dynamicRef", "$recursiveRef"):
            if kw in s:
                extra.append(self.dynamic_ref(s[kw], kw, base, p(kw), ctx))
        head = _tidy(Conj(kinds=kinds, num=frozenset(num), strs=frozenset(strs), arr=arr, obj=obj, enum=enum))
        out: DNF = () if head is None else (head,)
        for d in extra:
            if not out:
                break
            out = _meet_dnf(out, d, ptr)
        if out and ("unevaluatedProperties" in s or "unevaluatedItems" in s):
            # Present even as true: it then evaluates every member, which an enclosing one sees.
            out = self.unevaluated(out, self.sub_of(s["unevaluatedProperties"], base, p("unevaluatedProperties"), ctx)
                                   if "unevaluatedProperties" in s else None,
                                   self.sub_of(s["unevaluatedItems"], base, p("unevaluatedItems"), ctx)
                                   if "unevaluatedItems" in s else None, ptr)
        return out

    def split_overlaps(self, conjs: list[Conj], ptr: str) -> list[Conj]:
        """Equivalent alternatives that are pairwise disjoint, each the meet of the ones that hold."""
        conjs = [c for c in conjs if not self.conj_empty(c, 1)]
        if all(self.disjoint((conjs[i],), (conjs[j],)) for i in range(len(conjs)) for j in range(i + 1, len(conjs))):
            return conjs
        if len(conjs) > 8:
            self.unenforceable("unevaluatedProperties/unevaluatedItems over more than 8 overlapping "
                               "alternatives (anyOf/oneOf/if) is not supported", ptr)
            return conjs
        parts: list[DNF] = []
        negs = [self.neg_conj(c, ptr) for c in conjs]
        for mask in range(1, 2 ** len(conjs)):
            cur: DNF = (TOP,)
            for i, c in enumerate(conjs):
                cur = _meet_dnf(cur, (c,) if mask >> i & 1 else negs[i], ptr)
                if not cur:
                    break
            parts.append(tuple(c for c in cur if not self.conj_empty(c, 1)))
        return list(_join_dnf(*parts))

    def unevaluated(self, d: DNF, uprops: Sub | None, uitems: Sub | None, ptr: str) -> DNF:
        """Apply unevaluatedProperties/unevaluatedItems to the shape of their schema's other keywords.

        A value's evaluated members are the union over the alternatives it satisfies, so overlapping
        alternatives are first split into disjoint ones (each subset of alternatives that hold, with
        the others negated; negation evaluates nothing).
        """
        out = [x for x in (_tidy(c.only(*(c.kinds - {"object", "array"}))) for c in d) if x is not None]
        for kind, u in (("object", uprops), ("array", uitems)):
            part = [x for x in (_tidy(c.only(kind)) for c in d) if x is not None]
            if u is None:
                out += part
                continue
            for c in self.split_overlaps(part, ptr):
                if kind == "object":
                    o = c.obj or Obj()
                    ev = [comp for comp in o.comps if comp.evaluates]
                    if not any(comp.explicit for comp in ev):
                        comp = ObjComp(props=tuple(dict.fromkeys((n, TRUE) for x in ev for n, _ in x.props)),
                                       patterns=tuple(dict.fromkeys((pat, TRUE, pp) for x in ev for pat, _, pp in x.patterns)),
                                       additional=u, explicit=True, evaluates=True)
                        c = _meet(c, Conj(obj=Obj(comps=(comp,))))
                else:
                    a = c.arr or Arr()
                    if not a.ev_all:
                        rest = u if not a.ev_contains else self.dnf_sub(
                            _join_dnf(self.shape(u), *(self.shape(x) for x in a.ev_contains)))
                        c = _meet(c, Conj(arr=Arr(prefix=(TRUE,) * a.ev_prefix, rest=rest, ev_all=True)))
                if c is not None:
                    out.append(c)
        return tuple(dict.fromkeys(out))

    def record_value(self, v: Any, kw: str, ptr: str) -> tuple:
        cv = _json_value(v, kw, ptr)
        self._remember_order(v, cv)
        return cv

    def _remember_order(self, v: Any, cv: tuple) -> None:
        if isinstance(v, dict):
            self.value_order.setdefault(cv, tuple(v))
            for (k, c) in cv[1]:
                self._remember_order(v[k], c)
        elif isinstance(v, (list, tuple)):
            for x, c in zip(v, cv[1]):
                self._remember_order(x, c)

    def array_keywords(self, s: dict, base: str, ptr: str, ctx: tuple) -> Arr:
        p = lambda kw: f"{ptr}/{_esc(kw)}"  # noqa: E731
        items = s.get("items", True)
        if isinstance(items, list):  # draft 2019-09 and earlier: tuple validation
            prefix = tuple(self.sub_of(x, base, f"{p('items')}/{i}", ctx) for i, x in enumerate(items))
            rest = self.sub_of(s.get("additionalItems", True), base, p("additionalItems"), ctx)
        else:
            pi = s.get("prefixItems", [])
            if not isinstance(pi, list):
                raise SchemaError("'prefixItems' must be an array of schemas", pointer=p("prefixItems"))
            prefix = tuple(self.sub_of(x, base, f"{p('prefixItems')}/{i}", ctx) for i, x in enumerate(pi))
            rest = self.sub_of(items, base, p("items"), ctx)
        mn = _nonneg_int(s["minItems"], "minItems", p("minItems")) if "minItems" in s else 0
        mx = _nonneg_int(s["maxItems"], "maxItems", p("maxItems")) if "maxItems" in s else None
        contains: tuple = ()
        if "contains" in s:
            c = self.sub_of(s["contains"], base, p("contains"), ctx)
            cmin = _nonneg_int(s["minContains"], "minContains", p("minContains")) if "minContains" in s else 1
            cmax = _nonneg_int(s["maxContains"], "maxContains", p("maxContains")) if "maxContains" in s else None
            if cmin > 0 or cmax is not None:
                contains = ((c, cmin, cmax, 0, p("contains")),)
        u = s.get("uniqueItems", False)
        if not isinstance(u, bool):
            raise SchemaError(f"'uniqueItems' must be a boolean, got {u!r}", pointer=p("uniqueItems"))
        ev_prefix = len(prefix)
        ev_all = "items" in s and not isinstance(items, list) or isinstance(items, list) and "additionalItems" in s
        while prefix and prefix[-1] == rest:
            prefix = prefix[:-1]
        return Arr(prefix=prefix, rest=rest, min=mn, max=mx, contains=contains, unique=p("uniqueItems") if u else None,
                   ev_prefix=ev_prefix, ev_all=ev_all, ev_contains=(self.sub_of(s["contains"], base, p("contains"), ctx),) if "contains" in s else ())

    def object_keywords(self, s: dict, base: str, ptr: str, ctx: tuple) -> Obj:
        p = lambda kw: f"{ptr}/{_esc(kw)}"  # noqa: E731
        comps: tuple = ()
        if any(k in s for k in ("properties", "patternProperties", "additionalProperties")):
            props = s.get("properties", {})
            pats = s.get("patternProperties", {})
            for kw, v in (("properties", props), ("patternProperties", pats)):
                if not isinstance(v, dict):
                    raise SchemaError(f"'{kw}' must be an object of schemas", pointer=p(kw))
            comps = (
                ObjComp(
                    props=tuple((n, self.sub_of(x, base, f"{p('properties')}/{_esc(n)}", ctx)) for n, x in props.items()),
                    patterns=tuple(
                        (pat, self.sub_of(x, base, f"{p('patternProperties')}/{_esc(pat)}", ctx),
                         f"{p('patternProperties')}/{_esc(pat)}")
                        for pat, x in pats.items()
                    ),
                    additional=self.sub_of(s.get("additionalProperties", True), base, p("additionalProperties"), ctx),
                    explicit="additionalProperties" in s,
                    evaluates=True,
                ),
            )
        req = s.get("required", [])
        if not isinstance(req, list) or not all(isinstance(x, str) for x in req):
            # draft-03 style "required": true inside a property is not a keyword of later drafts.
            if isinstance(req, bool):
                req = []
            else:
                raise SchemaError(f"'required' must be an array of strings, got {req!r}", pointer=p("required"))
        mn = _nonneg_int(s["minProperties"], "minProperties", p("minProperties")) if "minProperties" in s else 0
        mx = _nonneg_int(s["maxProperties"], "maxProperties", p("maxProperties")) if "maxProperties" in s else None
        names = self.sub_of(s.get("propertyNames", True), base, p("propertyNames"), ctx)
        return Obj(comps=comps, required=_uniq(req), min=mn, max=mx, names=names, min_ptr=p("minProperties"))

    def forbid(self, name: str) -> ObjComp:
        return ObjComp(props=((name, self.FALSE_SUB),))

    def dependencies(self, deps: Any, kw: str, base: str, ptr: str, ctx: tuple) -> list[DNF]:
        if not isinstance(deps, dict):
            raise SchemaError(f"'{kw}' must be an object", pointer=ptr)
        out = []
        not_obj = Conj(kinds=ALL_KINDS - {"object"})
        for name, d in deps.items():
            q = f"{ptr}/{_esc(name)}"
            absent = Conj(kinds=frozenset({"object"}), obj=Obj(comps=(self.forbid(name),)))
            if isinstance(d, list) and kw != "dependentSchemas":
                if not all(isinstance(x, str) for x in d):
                    raise SchemaError(f"'{kw}' lists must hold property names", pointer=q)
                if not d:
                    continue
                present = Conj(kinds=frozenset({"object"}), obj=Obj(required=_uniq([name, *d])))
                out.append((not_obj, absent, present))
            elif isinstance(d, (dict, bool)) and kw != "dependentRequired":
                present = Conj(kinds=frozenset({"object"}), obj=Obj(required=(name,)))
                then = _meet_dnf((present,), self.shape(self.sub_of(d, base, q, ctx)), q)
                out.append(_join_dnf((not_obj, absent), then))
            else:
                raise SchemaError(f"'{kw}' values must be {'arrays of names' if kw == 'dependentRequired' else 'schemas'}",
                                  pointer=q)
        return out

    def dynamic_ref(self, ref: Any, kw: str, base: str, ptr: str, ctx: tuple) -> DNF:
        if not isinstance(ref, str):
            raise SchemaError(f"'{kw}' must be a string", pointer=ptr)
        if kw == "$recursiveRef":
            node, b2, p2 = self.doc.resolve(ref, base, ptr)
            anchors = [1 for s in self.doc._keep if isinstance(s, dict) and s.get("$recursiveAnchor") is True]
            if len(anchors) > 1:
                self.unenforceable("'$recursiveRef' with several recursive anchors needs dynamic scope", ptr)
                return (TOP,)
            return self.shape(self.sub_of(node, b2, p2, ctx))
        frag = urldefrag(_join_uri(base, ref))[1]
        node, b2, p2 = self.doc.resolve(ref, base, ptr)
        if isinstance(node, dict) and node.get("$dynamicAnchor") == frag:
            # The static target is a dynamic anchor: the outermost resource in scope with that anchor wins.
            outer = dict(ctx).get(frag)
            if outer is not None and (outer, frag) in self.doc.anchors:
                node = self.doc.anchors[(outer, frag)]
                b2, p2 = self.doc.where(node, outer, p2)
        return self.shape(self.sub_of(node, b2, p2, ctx))

    def one_of(self, subs: list[Sub], ptr: str) -> DNF:
        """Exactly one branch: per JSON kind, the union where branches are disjoint, else branch i
        minus the others (kinds never overlap, so branches that only overlap on, say, strings do
        not need their object parts negated)."""
        shapes = [self.shape(x) for x in subs]
        if any(x in self.loosened for sub in subs for x in sub):
            self.unenforceable("a loosened branch inside 'oneOf' cannot be negated exactly", ptr)
            return _join_dnf(*shapes)
        parts = []
        for kind in KINDS:
            local = [tuple(x for x in (_tidy(c.only(kind)) for c in d) if x is not None) for d in shapes]
            for i, d in enumerate(local):
                for j, other in enumerate(local):
                    if i != j and d and other and not self.disjoint(d, other):
                        d = _meet_dnf(d, self.negate_dnf(other, ptr), ptr)
                parts.append(d)
        return _join_dnf(*parts)

    def negate_dnf(self, d: DNF, ptr: str) -> DNF:
        out: DNF = (TOP,)
        for c in d:
            out = _meet_dnf(out, self.neg_conj(c, ptr), ptr)
            if not out:
                break
        return out

    # -- negation -----------------------------------------------------------------------------

    def negate(self, sub: Sub, ptr: str) -> DNF:
        """The complement of ``sub``'s language, as a shape."""
        self.loosen_stack.append(False)
        d = self.shape(sub)
        inexact = self.loosen_stack.pop()
        if inexact:
            # The operand is a superset, so its complement would be a subset: give up on the 'not'.
            self.unenforceable("a loosened schema inside 'not' (or a oneOf/if) cannot be negated", ptr)
            return (TOP,)
        return self.negate_dnf(d, ptr)

    def neg_conj(self, c: Conj, ptr: str) -> DNF:
        """The complement of one alternative as pairwise disjoint alternatives.

        Each keyword's violation is met with the keywords before it holding (``¬k1 ∪ (k1 ∧ ¬k2) ∪
        ...``), so the parts never overlap; that keeps later oneOf/unevaluated* splits small.
        """
        others = ALL_KINDS - c.kinds
        if c.enum is not None:
            out: list[Conj] = [Conj(kinds=others)] if others else []
            vals = [v for v in c.enum if self.check_conj(replace(c, enum=None), v)]
            for kind in sorted(c.kinds):
                kv = [v for v in vals if _cv_kind(v) == kind]
                k = frozenset({kind})
                if not kv:
                    out.append(Conj(kinds=k))
                elif kind == "number":
                    out.append(Conj(kinds=k, num=frozenset(("ne", v[1]) for v in kv)))
                elif kind == "string":
                    out.append(Conj(kinds=k, strs=frozenset(("ne", v[1]) for v in kv)))
                elif kind in ("array", "object"):
                    out.extend(self.neg_values(kind, kv, ptr))
            return tuple(out)
        pairs: list[tuple[Conj, Conj]] = []
        if others:
            pairs.append((Conj(kinds=others), Conj(kinds=c.kinds)))
        for a in sorted(c.num, key=repr):
            pairs.append((self.neg_num_atom(a), Conj(num=frozenset({a}))))
        for a in sorted(c.strs, key=repr):
            n = self.neg_str_atom(a)
            if n is not None:
                pairs.append((n, Conj(strs=frozenset({a}))))
        if c.arr is not None:
            pairs += [(Conj(kinds=frozenset({"array"}), arr=v), Conj(arr=p)) for v, p in self.neg_arr(c.arr, ptr)]
        if c.obj is not None:
            pairs += [(Conj(kinds=frozenset({"object"}), obj=v), Conj(obj=p)) for v, p in self.neg_obj(c.obj, ptr)]
        out = []
        held: Conj | None = TOP
        for violation, positive in pairs:
            part = _meet(held, violation)
            if part is not None:
                out.append(part)
            held = _meet(held, positive)
            if held is None:
                break
        return tuple(out)

    @staticmethod
    def neg_num_atom(a: tuple) -> Conj:
        k = frozenset({"number"})
        flip = {"int": "nint", "nint": "int", "ge": "lt", "lt": "ge", "gt": "le", "le": "gt", "mul": "nmul", "nmul": "mul"}
        if a[0] == "ne":
            return Conj(kinds=k, enum=frozenset({("num", a[1])}))
        return Conj(kinds=k, num=frozenset({(flip[a[0]],) + a[1:]}))

    @staticmethod
    def neg_str_atom(a: tuple) -> Conj | None:
        k = frozenset({"string"})
        if a[0] == "min":
            return Conj(kinds=k, strs=frozenset({("max", a[1] - 1)})) if a[1] > 0 else None
        if a[0] == "max":
            return Conj(kinds=k, strs=frozenset({("min", a[1] + 1)}))
        if a[0] == "ne":
            return Conj(kinds=k, enum=frozenset({("str", a[1])}))
        flip = {"re": "nre", "nre": "re", "fmt": "nfmt", "nfmt": "fmt"}
        return Conj(kinds=k, strs=frozenset({(flip[a[0]],) + a[1:]}))

    def neg_values(self, kind: str, values: list[tuple], ptr: str) -> list[Conj]:
        """Arrays (or objects) other than the given finite set of values."""
        k = frozenset({kind})
        out: DNF = (Conj(kinds=k),)
        for v in values:
            alts: list[Conj] = []
            if kind == "array":
                n = len(v[1])
                alts.append(Conj(kinds=k, arr=Arr(max=n - 1)) if n else None)
                alts.append(Conj(kinds=k, arr=Arr(min=n + 1)))
                for i, x in enumerate(v[1]):
                    alts.append(Conj(kinds=k, arr=Arr(prefix=(TRUE,) * i + (self.neg_sub(self.const_sub(x), ptr),),
                                                      min=max(i + 1, n), max=n)))
            else:
                names = [name for name, _ in v[1]]
                for name in names:
                    alts.append(Conj(kinds=k, obj=Obj(comps=(self.forbid(name),))))
                alts.append(Conj(kinds=k, obj=Obj(required=tuple(names), min=len(names) + 1)))
                for name, x in v[1]:
                    comp = ObjComp(props=((name, self.neg_sub(self.const_sub(x), ptr)),))
                    alts.append(Conj(kinds=k, obj=Obj(comps=(comp,), required=(name,))))
            out = _meet_dnf(out, tuple(a for a in alts if a is not None), ptr)
        return list(out)

    def neg_arr(self, a: Arr, ptr: str) -> list[tuple[Arr, Arr]]:
        """(violation, the keyword itself) for each array keyword of ``a``."""
        out = []
        if a.min > 0:
            out.append((Arr(max=a.min - 1), Arr(min=a.min)))
        if a.max is not None:
            out.append((Arr(min=a.max + 1), Arr(max=a.max)))
        for i, s in enumerate(a.prefix):
            if s != TRUE:
                pad = (TRUE,) * i
                out.append((Arr(prefix=pad + (self.neg_sub(s, ptr),), min=i + 1), Arr(prefix=pad + (s,))))
        if a.rest != TRUE:
            pad = (TRUE,) * len(a.prefix)
            out.append((Arr(contains=((self.neg_sub(a.rest, ptr), 1, None, len(a.prefix), ptr),)),
                        Arr(prefix=pad, rest=a.rest)))
        for c, cmin, cmax, frm, p in a.contains:
            if cmin > 0:
                out.append((Arr(contains=((c, 0, cmin - 1, frm, p),)), Arr(contains=((c, cmin, None, frm, p),))))
            if cmax is not None:
                out.append((Arr(contains=((c, cmax + 1, None, frm, p),)), Arr(contains=((c, 0, cmax, frm, p),))))
        if a.unique:
            self.unenforceable("the negation of 'uniqueItems' (an array with duplicates) cannot be enforced", a.unique)
            return [(Arr(), Arr())]
        return out

    def neg_obj(self, o: Obj, ptr: str) -> list[tuple[Obj, Obj]]:
        """(violation, the keyword itself) for each object keyword of ``o``."""
        out = []
        if o.min > 0:
            out.append((Obj(max=o.min - 1), Obj(min=o.min)))
        if o.max is not None:
            out.append((Obj(min=o.max + 1), Obj(max=o.max)))
        for r in o.required:
            out.append((Obj(comps=(self.forbid(r),)), Obj(required=(r,))))
        for comp in o.comps:
            for name, s in comp.props:
                if s != TRUE:
                    out.append((Obj(comps=(ObjComp(props=((name, self.neg_sub(s, ptr)),)),), required=(name,)),
                                Obj(comps=(ObjComp(props=((name, s),)),))))
            for pat, s, pp in comp.patterns:
                if s != TRUE:
                    spec = (((pat, pp),), (), (), None)
                    out.append((Obj(exists=((spec, self.neg_sub(s, ptr)),)), Obj(comps=(ObjComp(patterns=((pat, s, pp),)),))))
            if comp.additional != TRUE:
                spec = ((), tuple((pat, pp) for pat, _, pp in comp.patterns), tuple(n for n, _ in comp.props), None)
                keep = ObjComp(props=tuple((n, TRUE) for n, _ in comp.props),
                               patterns=tuple((pat, TRUE, pp) for pat, _, pp in comp.patterns),
                               additional=comp.additional, explicit=comp.explicit)
                out.append((Obj(exists=((spec, self.neg_sub(comp.additional, ptr)),)), Obj(comps=(keep,))))
        if o.names != TRUE:
            out.append((Obj(exists=((((), (), (), o.names), TRUE),)), Obj(names=o.names)))
        if o.exists:
            self.unenforceable("negating 'some property is invalid' (a negated patternProperties, additionalProperties "
                               "or propertyNames inside another negation) is not supported", ptr)
            return [(Obj(), Obj())]
        return out

    # -- checking concrete values (enum filtering, propertyNames, disjointness) -----------------

    def check_sub(self, sub: Sub, v: tuple) -> bool:
        return any(self.check_conj(c, v) for c in self.shape(sub))

    def check_conj(self, c: Conj, v: tuple) -> bool:
        kind = _cv_kind(v)
        if kind not in c.kinds or (c.enum is not None and v not in c.enum):
            return False
        if kind == "number":
            return all(_num_atom_holds(a, v[1]) for a in c.num)
        if kind == "string":
            return all(self.str_atom_holds(a, v[1]) for a in c.strs)
        if kind == "array" and c.arr is not None:
            return self.check_arr(c.arr, v[1])
        if kind == "object" and c.obj is not None:
            return self.check_obj(c.obj, v[1])
        return True

    def str_atom_holds(self, a: tuple, s: str) -> bool:
        if a[0] == "min":
            return len(s) >= a[1]
        if a[0] == "max":
            return len(s) <= a[1]
        if a[0] == "ne":
            return s != a[1]
        dfa = self.atom_dfa(a)
        if dfa is None:  # unsupported (only reachable in lenient mode): treat as satisfied
            return True
        limit = _FORMAT_LIMITS.get(a[1]) if a[0] in ("fmt", "nfmt") else None
        ok = dfa.accepts(s) and (limit is None or len(s) <= limit)
        return ok != (a[0] in ("nre", "nfmt"))

    def check_arr(self, a: Arr, items: tuple) -> bool:
        n = len(items)
        if n < a.min or (a.max is not None and n > a.max):
            return False
        for i, x in enumerate(items):
            if not self.check_sub(a.prefix[i] if i < len(a.prefix) else a.rest, x):
                return False
        for c, cmin, cmax, frm, _ in a.contains:
            k = sum(1 for x in items[frm:] if self.check_sub(c, x))
            if k < cmin or (cmax is not None and k > cmax):
                return False
        return not (a.unique and len(set(items)) != n)

    def check_obj(self, o: Obj, members: tuple) -> bool:
        keys = {k for k, _ in members}
        n = len(members)
        if n < o.min or (o.max is not None and n > o.max) or any(r not in keys for r in o.required):
            return False
        for k, x in members:
            if o.names != TRUE and not self.check_sub(o.names, ("str", k)):
                return False
            if not self.check_sub(self.member_sub(o, k), x):
                return False
        for spec, sub in o.exists:
            keys = self.keyspec_dfa(spec)
            if keys is not None and not any(keys.accepts(k) and self.check_sub(sub, x) for k, x in members):
                return False
        return True

    def keyspec_dfa(self, spec: tuple) -> lx.CharDFA | None:
        """The key language of an ``exists`` entry (None if unsupported, in lenient mode)."""
        pos, neg, names, not_names = spec
        key = ("keyspec", spec)
        if key in self.dfa_cache:
            return self.dfa_cache[key]
        d = lx.UNIVERSE
        try:
            for pat, pp in pos + neg:
                part = self.atom_dfa(("re", pat, pp))
                if part is None:
                    self.dfa_cache[key] = None
                    return None
                d = lx.minimize(lx.intersect(d, part if (pat, pp) in pos else lx.complement(part), self.MAX_DFA))
            if names:
                d = lx.minimize(lx.intersect(d, lx.complement(lx.strings_dfa(names)), self.MAX_DFA))
            if not_names is not None:
                n = self.names_dfa(not_names)
                d = lx.minimize(lx.intersect(d, lx.complement(n), self.MAX_DFA)) if n is not None else lx.strings_dfa([])
        except lx.LexLimit as e:
            self.unenforceable(f"the property-name constraints are too complex to enforce exactly: {e}",
                               (pos + neg)[0][1] if pos + neg else "")
            d = None
        self.dfa_cache[key] = d
        return d

    def member_sub(self, o: Obj, name: str) -> Sub:
        """What the value of member ``name`` must satisfy (all components together)."""
        out: set = set()
        for comp in o.comps:
            hit = [s for n, s in comp.props if n == name]
            if hit:
                out |= hit[0]
            matched = False
            for pat, s, ptr in comp.patterns:
                if self.pattern_matches(pat, ptr, name):
                    out |= s
                    matched = True
            if not hit and not matched:
                out |= comp.additional
        return frozenset(out)

    def pattern_matches(self, pat: str, ptr: str, name: str) -> bool:
        dfa = self.atom_dfa(("re", pat, ptr))
        if dfa is None:  # lenient: an unsupported key pattern is taken to match (a superset)
            return True
        return dfa.accepts(name)

    # -- emptiness / disjointness (sound: True means provably empty) --------------------------

    def disjoint(self, a: DNF, b: DNF) -> bool:
        return all(self.conj_empty(_meet(x, y), 2) for x in a for y in b)

    def sub_empty(self, sub: Sub, depth: int) -> bool:
        if self.FALSE in sub:
            return True
        if depth <= 0:
            return False
        try:
            return all(self.conj_empty(c, depth) for c in self.shape(sub))
        except SchemaError:
            return False

    def conj_empty(self, c: Conj | None, depth: int) -> bool:
        if c is None:
            return True
        if c.enum is not None:
            return not any(self.check_conj(c, v) for v in c.enum)
        for kind in c.kinds:
            if kind in ("null", "true", "false"):
                return False
            if kind == "number" and not self.num_empty(c.num):
                return False
            if kind == "string" and not self.str_empty(c.strs):
                return False
            if kind == "array":
                a = c.arr or Arr()
                need = [a.prefix[i] if i < len(a.prefix) else a.rest for i in range(a.min)]
                if not any(self.sub_empty(s, depth - 1) for s in need):
                    return False
            if kind == "object":
                o = c.obj or Obj()
                if not (any(self.sub_empty(self.member_sub(o, r), depth - 1) for r in o.required)
                        or self.exists_contradicted(o)):
                    return False
        return True

    def exists_contradicted(self, o: Obj) -> bool:
        """An ``exists`` entry that the object's own keyword forbids (as negation pairs them)."""
        for (pos, neg, names, not_names), esub in o.exists:
            if not_names is not None and not_names <= o.names:
                return True
            for comp in o.comps:
                if len(pos) == 1 and not neg and not names and not_names is None:
                    for pat, sub, pp in comp.patterns:
                        if (pat, pp) == pos[0] and esub == self.neg_sub(sub, pp):
                            return True
                if (not pos and not_names is None and comp.additional != TRUE
                        and set(neg) == {(pat, pp) for pat, _, pp in comp.patterns}
                        and set(names) == {n for n, _ in comp.props}
                        and esub == self.neg_sub(comp.additional, "")):
                    return True
        return False

    def num_empty(self, atoms: frozenset) -> bool:
        if not atoms:
            return False
        try:
            d, _ = self.number_dfa(atoms)
        except _Unenforceable:
            return False
        return lx.is_empty(d)

    def str_empty(self, atoms: frozenset) -> bool:
        if not atoms:
            return False
        try:
            d = self.string_dfa(atoms)
        except _Unenforceable:
            return False
        return d is not None and lx.is_empty(d)

    # -- lexical automata ---------------------------------------------------------------------

    def atom_dfa(self, a: tuple) -> lx.CharDFA | None:
        """The code-point DFA of a pattern/format atom (positive form, without a format's length limit);
        None if unsupported (only in lenient mode)."""
        try:
            return self.atom_dfa_strict(a)
        except _Unenforceable as e:
            self.unenforceable(e.message, e.pointer)
            return None

    def atom_dfa_strict(self, a: tuple) -> lx.CharDFA:
        _, dfa, err = _regular(a[0].lstrip("n"), a[1])
        if err is not None:
            raise _Unenforceable(err, a[2])
        return dfa

    def atom_expr(self, a: tuple) -> Expr:
        """The code-point expression of a pattern or format atom (positive form)."""
        e, _, err = _regular(a[0].lstrip("n"), a[1], need_dfa=False)
        if e is None:
            raise _Unenforceable(err, a[2])
        return e

    def string_dfa(self, atoms: frozenset) -> lx.CharDFA | None:
        """The DFA of all string atoms together (None: no regular atoms, only lengths)."""
        key = ("str", atoms)
        if key in self.dfa_cache:
            return self.dfa_cache[key]
        lo, hi = _length_bounds(atoms)
        regular = [a for a in sorted(atoms, key=repr) if a[0] not in ("min", "max")]
        dfa = None
        try:
            for a in regular:
                if a[0] == "ne":
                    part = lx.complement(lx.strings_dfa([a[1]]))
                else:
                    part = self.atom_dfa_strict(a)
                    limit = _FORMAT_LIMITS.get(a[1]) if a[0] in ("fmt", "nfmt") else None
                    if limit is not None:
                        part = lx.minimize(lx.with_length(part, 0, limit, self.MAX_DFA))
                    if a[0] in ("nre", "nfmt"):
                        part = lx.complement(part)
                dfa = part if dfa is None else lx.minimize(lx.intersect(dfa, part, self.MAX_DFA))
            if dfa is not None and (lo > 0 or hi is not None):
                bounds = lx.length_bounds(dfa)
                if bounds is not None and not (bounds[0] >= lo and (hi is None or (bounds[1] is not None and bounds[1] <= hi))):
                    dfa = lx.minimize(lx.with_length(dfa, lo, hi, self.MAX_DFA))
        except lx.LexLimit as e:
            ptr = next((a[2] for a in regular if len(a) > 2), "")
            raise _Unenforceable(f"the string constraints ({', '.join(_kw(a) for a in regular)}"
                                 f"{' and lengths' if lo or hi is not None else ''}) are too complex to "
                                 f"intersect exactly: {e}", ptr) from None
        self.dfa_cache[key] = dfa
        return dfa

    def number_dfa(self, atoms: frozenset) -> tuple[lx.CharDFA, bool]:
        """(DFA of the positional numerals satisfying the atoms, whether only bounds are involved)."""
        key = ("num", atoms)
        if key in self.dfa_cache:
            return self.dfa_cache[key]
        d = lx.PLAIN_DFA
        only_bounds = True
        for a in sorted(atoms, key=repr):
            op = a[0]
            if op == "int":
                part = lx.dfa_from_expr(lx.INTEGER)
            elif op == "nint":
                part = lx.complement(lx.dfa_from_expr(lx.INTEGER))
            elif op in ("ge", "gt", "le", "lt"):
                part = lx.dfa_from_expr(lx.bound_expr(op, a[1]))
            elif op in ("mul", "nmul"):
                try:
                    part = lx.multiple_dfa(a[1])
                except lx.LexLimit as e:
                    raise _Unenforceable(f"'multipleOf' {a[1]} is too fine-grained to enforce exactly: {e}", a[2]) from None
                if op == "nmul":
                    part = lx.complement(part)
            else:  # ne
                part = lx.complement(lx.dfa_from_expr(lx.value_spellings(a[1])))
            only_bounds = only_bounds and op in ("ge", "gt", "le", "lt")
            try:
                d = lx.minimize(lx.intersect(d, part, self.MAX_DFA))
            except lx.LexLimit as e:
                where = next((x[2] for x in atoms if x[0] in ("mul", "nmul")), "")
                raise _Unenforceable(f"the number constraints are too complex to combine exactly: {e}", where) from None
        self.dfa_cache[key] = (d, only_bounds)
        return d, only_bounds


def _format_limits() -> dict[str, int]:
    from stencil.grammar import json_formats

    return dict(json_formats.LENGTH_LIMITS)


_FORMAT_LIMITS = _format_limits()


@lru_cache(maxsize=None)
def _label_dfa(name: str) -> lx.CharDFA:
    from stencil.grammar import json_formats
    from stencil.grammar.regex import regex_to_expr

    return lx.minimize(lx.dfa_from_expr(regex_to_expr(json_formats.SEGMENT_LABELS[name], anchored=True)))


@lru_cache(maxsize=4096)
def _regular(kind: str, value: str, need_dfa: bool = True) -> tuple[Expr | None, lx.CharDFA | None, str | None]:
    """(code-point expression, minimized DFA, error) of a ``pattern`` ("re") or ``format`` ("fmt").

    Cached for the process: real schema collections repeat the same patterns and formats.
    """
    from stencil.grammar import json_formats
    from stencil.grammar.regex import regex_to_expr

    if kind == "re":
        try:
            e = regex_to_expr(value, anchored=False)
        except RegexError as err:
            return None, None, f"'pattern' {value!r} is not supported: {err.message} at position {err.position}"
    else:
        e = json_formats.format_expr(value)
        if e is None:
            return None, None, f"'format': {value!r} cannot be enforced exactly"
    if not need_dfa:
        return e, None, None
    try:
        return e, lx.minimize(lx.dfa_from_expr(e, _Normalizer.MAX_DFA)), None
    except lx.LexLimit as err:
        what = "pattern" if kind == "re" else "format"
        return e, None, f"'{what}' {value!r} is too complex to determinize (needed to intersect it exactly): {err}"


def _kw(a: tuple) -> str:
    return {"re": "pattern", "nre": "not pattern", "fmt": "format", "nfmt": "not format", "ne": "not const",
            "min": "minLength", "max": "maxLength"}.get(a[0], a[0])


def _length_bounds(atoms: Iterable[tuple]) -> tuple[int, int | None]:
    lo, hi = 0, None
    for a in atoms:
        if a[0] == "min":
            lo = max(lo, a[1])
        elif a[0] == "max":
            hi = a[1] if hi is None else min(hi, a[1])
    return lo, hi


def _num_atom_holds(a: tuple, x: Decimal) -> bool:
    from fractions import Fraction

    op = a[0]
    if op in ("int", "nint"):
        return (x == x.to_integral_value()) == (op == "int")
    if op == "ge":
        return x >= a[1]
    if op == "gt":
        return x > a[1]
    if op == "le":
        return x <= a[1]
    if op == "lt":
        return x < a[1]
    if op in ("mul", "nmul"):
        return ((Fraction(x) / Fraction(a[1])).denominator == 1) == (op == "mul")
    return x != a[1]


# ----------------------------------------------------------------------------------------------
# Emission: shapes to grammar rules
# ----------------------------------------------------------------------------------------------

_RAW_WRITABLE: lx.Ranges = lx.subtract_ranges(((0x20, lx.MAX_CODE_POINT),), ((0x22, 0x22), (0x5C, 0x5C)))
_REPEAT_CHUNK = 256
_FLAT_COUNT = 1024  # bounds up to this many repetitions are deterministic counters (see up_to)
_MAX_AUTOMATON = 20_000
_MAX_ANY_ORDER_STATES = 4096


class _Compiler(_Normalizer):
    """Emits one rule per distinct shape; object members and array items refer to their value's rule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Spellings of character classes (see char_label), for small and big automata: automata of
        # property names repeat the same classes at many states.
        self._char_labels: tuple[dict, dict] = ({}, {})

    def compile(self) -> Grammar:
        self.b.rule("root", self.value_ref(self.root_sub))
        while self.queue:
            name, make = self.queue.pop()
            self.b.rule(name, make())
            if len(self.b.rules) > self.MAX_RULES:
                raise SchemaError(f"schema too large: more than {self.MAX_RULES} grammar rules")
        try:
            g = self.b.build("root")
        except GrammarError as e:
            raise SchemaError(f"schema too large to compile: {e}") from None
        if not derivable_rules(g, read_bytes=True)[g.root]:
            raise UnsatisfiableSchemaError("the schema accepts no JSON value")
        return g

    def lazy_rule(self, key: Any, prefix: str, make: Callable[[], Expr]) -> Ref:
        name = self.rule_of.get(key)
        if name is None:
            name = f"{prefix}{len(self.rule_of)}"
            self.rule_of[key] = name
            self.queue.append((name, make))
        return Ref(name)

    # -- values ---------------------------------------------------------------------------

    def value_ref(self, sub: Sub) -> Expr:
        """An expression for the values of ``sub`` (a reference to its rule, or a literal)."""
        if sub == TRUE:
            return Ref(self.json["value"])
        d = self.shape(sub)
        if not d:
            return NOTHING
        if len(d) == 1:
            return self.conj_expr(d[0])
        return self.lazy_rule(("dnf", d), "any", lambda: alt(*(self.conj_expr(c) for c in d)))

    def conj_expr(self, c: Conj) -> Expr:
        if c == TOP:
            return Ref(self.json["value"])
        if c.enum is not None:
            rest = replace(c, enum=None)
            vals = sorted((v for v in c.enum if self.check_conj(rest, v)), key=repr)
            return alt(*(self.value_expr(v) for v in vals)) if vals else NOTHING
        parts: list[Expr] = []
        for kind in KINDS:
            if kind not in c.kinds:
                continue
            if kind in ("null", "true", "false"):
                parts.append(lit(kind))
            elif kind == "number":
                parts.append(self.number_ref(c.num))
            elif kind == "string":
                parts.append(self.string_ref(c.strs))
            elif kind == "array":
                parts.append(self.array_ref(c.arr or Arr()))
            else:
                parts.append(self.object_ref(c.obj or Obj()))
        return alt(*parts)

    def value_expr(self, v: tuple) -> Expr:
        """Every spelling of one JSON value."""
        tag = v[0]
        if tag == "null":
            return lit("null")
        if tag == "bool":
            return lit("true" if v[1] else "false")
        if tag == "num":
            x = v[1]
            return lx.value_spellings(x) if x == 0 else alt(lx.value_spellings(x), lx.exponent_spellings(x))
        if tag == "str":
            return seq(lit('"'), lx.json_text(v[1], raw_ascii=True), lit('"'))
        if tag == "arr":
            if not v[1]:
                return seq(lit("["), self.ws, lit("]"))
            items = [self.value_expr(x) for x in v[1]]
            body = [items[0]] + [seq(self.ws, lit(","), self.ws, x) for x in items[1:]]
            return seq(lit("["), self.ws, *body, self.ws, lit("]"))
        order = self.value_order.get(v) or tuple(k for k, _ in v[1])
        members = dict(v[1])
        comp = ObjComp(props=tuple((k, self.const_sub(members[k])) for k in order), additional=self.FALSE_SUB,
                       explicit=True)
        return self.object_ref(Obj(comps=(comp,), required=tuple(order)))

    # -- numbers --------------------------------------------------------------------------

    def number_ref(self, atoms: frozenset) -> Expr:
        if not atoms:
            return Ref(self.json["number"])
        return self.lazy_rule(("num", atoms), "num", lambda: self.number_expr(atoms))

    def number_expr(self, atoms: frozenset) -> Expr:
        try:
            d, only_bounds = self.number_dfa(atoms)
        except _Unenforceable as e:
            self.unenforceable(e.message, e.pointer)
            return self.number_expr(frozenset(a for a in atoms if a[0] not in ("mul", "nmul")))
        e = lx.dfa_to_expr(d, lambda r: ByteClass(r))
        if only_bounds:
            lo = hi = None
            lo_strict = hi_strict = False
            for a in atoms:
                if a[0] in ("ge", "gt") and (lo is None or a[1] > lo or (a[1] == lo and a[0] == "gt")):
                    lo, lo_strict = a[1], a[0] == "gt"
                if a[0] in ("le", "lt") and (hi is None or a[1] < hi or (a[1] == hi and a[0] == "lt")):
                    hi, hi_strict = a[1], a[0] == "lt"
            e = alt(e, lx.decade_exponent_expr(lo, lo_strict, hi, hi_strict))
        return e

    # -- strings --------------------------------------------------------------------------

    def string_ref(self, atoms: frozenset) -> Expr:
        if not atoms:
            return Ref(self.json["string"])
        return self.lazy_rule(("str", atoms), "str", lambda: seq(lit('"'), self.string_body(atoms), lit('"')))

    def string_body(self, atoms: frozenset) -> Expr:
        lo, hi = _length_bounds(atoms)
        regular = [a for a in atoms if a[0] not in ("min", "max")]
        if hi is not None and lo > hi:
            return NOTHING
        if not regular:
            return self.counted_chars(lo, hi)
        if len(regular) == 1 and regular[0][0] == "fmt" and regular[0][1] in _FORMAT_LIMITS:
            return self.segmented_body(regular[0], lo, min(_FORMAT_LIMITS[regular[0][1]], hi if hi is not None else 10**9))
        try:
            d = self.string_dfa(atoms)
        except _Unenforceable as e:
            if len(regular) == 1 and regular[0][0] in ("re", "fmt") and lo == 0 and hi is None:
                # Too big to determinize, but alone it needs no intersection: spell the expression.
                try:
                    return lx.json_expr(self.atom_expr(regular[0]), lambda r: lx.json_char(r, True))
                except _Unenforceable:
                    pass
            self.unenforceable(e.message, e.pointer)
            return self.counted_chars(lo, hi)
        if d is None:
            return self.counted_chars(lo, hi)
        return lx.dfa_to_expr(d, self.char_label(d.n_states > 16))

    def segmented_body(self, a: tuple, lo: int, hi: int) -> Expr:
        """A hostname-like format (labels joined by '.') with its total length within lo..hi.

        The product of the label automaton with a length counter has ~24k states. Instead, rule
        ``host_t`` (t characters precede the label) reads a label of some exact length l (a shared
        rule ``label_l``) and continues with ``next_(t+l)``: the end, or a dot and ``host_(t+l+1)``.
        Every rule stays small, and ``host_t`` refers to rules only.
        """
        from stencil.grammar import json_formats

        label_dfa = _label_dfa(a[1])
        spell = self.char_label(False)
        dot = spell(((ord(json_formats.SEGMENT_SEPARATOR),) * 2,))
        longest = (lx.length_bounds(label_dfa) or (0, 0))[1] or hi

        def label(n: int) -> Expr:
            return self.lazy_rule(("label", a[1], n), "label",
                                  lambda: lx.dfa_to_expr(lx.with_length(label_dfa, n, n), spell))

        def host(t: int) -> Expr:
            return self.lazy_rule(("host", a[1], t, lo, hi), "host", lambda: alt(*(
                seq(label(n), after(t + n)) for n in range(1, min(longest, hi - t) + 1))))

        def after(m: int) -> Expr:
            return self.lazy_rule(("after", a[1], m, lo, hi), "next", lambda: alt(
                *([EMPTY] if m >= lo else []), *([seq(dot, host(m + 1))] if m + 2 <= hi else [])))

        return host(0) if hi >= 1 else NOTHING

    def char_label(self, big: bool) -> Callable[[lx.Ranges], Expr]:
        """Spellings of one character class in a constrained string (key, const, pattern, format).

        Printable ASCII is spelled raw only (``json.dumps`` and every serializer write it so): that
        keeps the automata small and lets "any name but the declared ones" exclude a declared name in
        every spelling. Other characters keep all their spellings; large escape sets become shared
        rules when the automaton is ``big``.
        """

        labels = self._char_labels[big]

        def label(ranges: lx.Ranges) -> Expr:
            hit = labels.get(ranges)
            if hit is None:
                hit = labels[ranges] = spell(ranges)
            return hit

        def spell(ranges: lx.Ranges) -> Expr:
            raw = lx.intersect_ranges(ranges, _RAW_WRITABLE)
            esc = lx.subtract_ranges(ranges, lx.PRINTABLE_ASCII)
            parts = [CharClass(raw)] if raw else []
            if esc:
                if not big or (len(esc) <= 2 and esc[-1][1] < 0x80):
                    parts.append(lx.json_escapes(esc))
                else:
                    parts.append(self.lazy_rule(("esc", esc), "esc", lambda: lx.json_escapes(esc)))
            return alt(*parts) if parts else NOTHING

        return label

    def counted_chars(self, lo: int, hi: int | None) -> Expr:
        n = hi if hi is not None else lo
        unit = lx.json_char(lx.ALL) if n <= 32 else self.lazy_rule(("jc", lx.ALL), "char", lambda: lx.json_char(lx.ALL))
        return self.counted(unit, lo, hi)

    def counted(self, unit: Expr, lo: int, hi: int | None) -> Expr:
        """``unit`` repeated lo..hi times, with chunked rules so huge bounds stay small automata."""
        if hi is None:
            return seq(self.exactly(unit, lo), star(unit))
        return seq(self.exactly(unit, lo), self.up_to(unit, hi - lo))

    def chunk(self, unit: Expr) -> Expr:
        return self.lazy_rule(("chunk", unit), "chunk", lambda: Repeat(unit, _REPEAT_CHUNK, _REPEAT_CHUNK))

    def exactly(self, unit: Expr, n: int) -> Expr:
        if n <= _REPEAT_CHUNK:
            return Repeat(unit, n, n)
        q, r = divmod(n, _REPEAT_CHUNK)
        return seq(self.exactly(self.chunk(unit), q), Repeat(unit, r, r))

    def up_to(self, unit: Expr, m: int) -> Expr:
        """``unit`` repeated 0..m times.

        Up to ``_FLAT_COUNT`` repetitions this is a flat counter: every prefix has one derivation,
        which keeps the mask walk in its deterministic (stack) mode. Exactly that needs m + 1
        states: a rule that may end at any count cannot also let its caller read more units
        without two derivations competing for the next unit, so a compact encoding of a bound
        always has prefixes with two live derivations. Beyond ``_FLAT_COUNT`` repetitions the
        rest is therefore counted in chunks of 256 (two derivations alive from there on), which
        keeps huge bounds small.
        """
        if m <= _FLAT_COUNT:
            return Repeat(unit, 0, m)
        return alt(Repeat(unit, 0, _FLAT_COUNT - 1), seq(Repeat(unit, _FLAT_COUNT, _FLAT_COUNT),
                                                          self.chunked_up_to(unit, m - _FLAT_COUNT)))

    def chunked_up_to(self, unit: Expr, m: int) -> Expr:
        """``unit`` repeated 0..m times as chunk rules of 256 units and a remainder (small for any m)."""
        if m <= _REPEAT_CHUNK:
            return Repeat(unit, 0, m)
        q, r = divmod(m, _REPEAT_CHUNK)
        c = self.chunk(unit)
        # m = q*C + r: lengths j*C + t with j < q, t < C, or j = q, t <= r.
        return alt(seq(self.chunked_up_to(c, q - 1), Repeat(unit, 0, _REPEAT_CHUNK - 1)),
                   seq(self.exactly(c, q), Repeat(unit, 0, r)))

    # -- arrays ---------------------------------------------------------------------------

    def array_ref(self, a: Arr) -> Expr:
        if a == Arr():
            return Ref(self.json["array"])
        return self.lazy_rule(("arr", a), "arr", lambda: self.array_expr(a))

    def array_expr(self, a: Arr) -> Expr:
        P = len(a.prefix)
        mx = a.max
        for i, s in enumerate(a.prefix + (a.rest,)):
            if self.FALSE in s or not self.shape(s):
                mx = i if mx is None else min(mx, i)
                break
        if mx is not None and a.min > mx:
            return NOTHING
        contains = []
        for c, cmin, cmax, frm, ptr in a.contains:
            if cmax is not None and cmin > cmax:
                return NOTHING
            contains.append((c, self.neg_sub(c, ptr), cmin, cmax, frm, ptr))
        domain = None
        if a.unique and not (mx is not None and mx <= 1):
            domain = self.finite_items(a, P if mx is None else mx)
            if domain is None:
                self.unenforceable("'uniqueItems' can only be enforced when the items come from a small finite set "
                                   "(or maxItems <= 1)", a.unique)
        item = lambda i: a.prefix[i] if i < P else a.rest  # noqa: E731
        w = self.ws
        sep = lambda i: w if i == 0 else seq(w, lit(","), w)  # noqa: E731
        if not contains and domain is None:
            cap = mx if mx is not None else max(P, a.min)
            if cap > 2 * _REPEAT_CHUNK and P == 0:
                # Uniform items and a large bound: a chunked counted repetition.
                first = seq(w, self.value_ref(a.rest))
                more = self.lazy_rule(("more", a.rest), "item", lambda: seq(w, lit(","), w, self.value_ref(a.rest)))
                lo = max(a.min - 1, 0)
                body = seq(first, self.counted(more, lo, None if mx is None else mx - 1))
                return seq(lit("["), body if a.min > 0 else opt(body), w, lit("]"))
        # General case: an automaton over (position, contains counts, used values); without maxItems
        # the position saturates once past the prefix and minItems (1 at least: "started").
        cap = mx if mx is not None else max(P, a.min, 1)
        if cap > _MAX_AUTOMATON:
            self.unenforceable(f"an array bound of {cap} items with per-position constraints is too large", a.unique or "")
            return Ref(self.json["array"])
        start = (0, tuple(0 for _ in contains), 0)
        index = {start: 0}
        order = [start]
        edges: list[tuple[int, Expr, int]] = []
        end = -1
        i_state = 0
        while i_state < len(order):
            pos, counts, used = order[i_state]
            src = i_state
            i_state += 1
            if len(order) > _MAX_AUTOMATON:
                self.unenforceable("the array constraints (contains counts, uniqueItems) need too many states",
                                   a.unique or (contains[0][5] if contains else ""))
                return Ref(self.json["array"])
            if pos >= a.min and all(k >= cmin for k, (_, _, cmin, _, _, _) in zip(counts, contains)):
                edges.append((src, seq(w, lit("]")), end))
            if mx is not None and pos >= mx:
                continue
            nxt = pos + 1 if mx is not None else min(pos + 1, cap)
            variants: list[tuple[Sub, tuple]] = [(item(pos), counts)]
            for j, (c, nc, cmin, cmax, frm, _) in enumerate(contains):
                if pos < frm:
                    continue
                limit = (cmax + 1) if cmax is not None else cmin
                new = []
                for s, ks in variants:
                    k = ks[j]
                    if cmax is None or k + 1 <= cmax:
                        new.append((s | c, ks[:j] + (min(k + 1, limit),) + ks[j + 1:]))
                    new.append((s | nc, ks))
                variants = new
            for s, ks in variants:
                if domain is None:
                    targets = [((nxt, ks, used), self.value_ref(s))]
                else:
                    targets = [((nxt, ks, used | (1 << b)), self.value_expr(v))
                               for b, v in enumerate(domain) if not used >> b & 1 and self.check_sub(s, v)]
                for key, label in targets:
                    if label == NOTHING:
                        continue
                    if key not in index:
                        index[key] = len(order)
                        order.append(key)
                    edges.append((src, seq(sep(pos), label), index[key]))
        n = len(order)
        edges = [(s, x, n if t == end else t) for s, x, t in edges]
        return seq(lit("["), Automaton(n + 1, tuple(edges), (n,)))

    def finite_items(self, a: Arr, positions: int) -> list[tuple] | None:
        """All values any item may take, if that is a small finite set."""
        values: set = set()
        for s in set(a.prefix) | {a.rest}:
            for c in self.shape(s):
                if c.enum is not None:
                    values |= c.enum
                elif c.kinds <= {"null", "true", "false"}:
                    values |= {("null",) if k == "null" else ("bool", k == "true") for k in c.kinds}
                else:
                    return None
        if len(values) > 12:
            return None
        return sorted(values, key=repr)

    # -- objects --------------------------------------------------------------------------

    def object_ref(self, o: Obj) -> Expr:
        if o == Obj():
            return Ref(self.json["object"])
        return self.lazy_rule(("obj", o), "obj", lambda: self.object_expr(o))

    def object_expr(self, o: Obj) -> Expr:
        declared = _uniq([n for comp in o.comps for n, _ in comp.props] + list(o.required))
        exists = [(spec, sub, d) for spec, sub in o.exists if (d := self.keyspec_dfa(spec)) is not None]
        # Each member is a list of (label, exists-flags it satisfies) variants.
        members: list[tuple[str, list[tuple[Expr, int]], bool]] = []
        for name in declared:
            sub = self.member_sub(o, name)
            ok = self.FALSE not in sub and bool(self.shape(sub))
            if ok and o.names != TRUE:
                ok = self.check_sub(o.names, ("str", name))
            req = name in o.required
            if not ok:
                if req:
                    return NOTHING
                continue
            variants = [(self.member_expr(name, sub, len(declared)), 0)]
            for j, (_, esub, d) in enumerate(exists):
                if d.accepts(name) and self.shape(sub | esub):
                    variants.append((self.member_expr(name, sub | esub, len(declared)), 1 << j))
            members.append((name, variants, req))
        extras: list[tuple[Expr, int]] = []
        extra = self.extra_member(o, declared)
        if extra is not None:
            extras.append((extra, 0))
            if o.min >= 2:
                # Undeclared members cannot be told apart: {"x": 1, "x": 2} would count as two.
                self.unenforceable("'minProperties' >= 2 on an object that allows undeclared properties cannot be "
                                   "enforced exactly (a repeated name would count twice)", o.min_ptr)
        for j, (spec, esub, _) in enumerate(exists):
            witness = self.extra_member(o, declared, (spec, esub))
            if witness is not None:
                extras.append((witness, 1 << j))
        need_flags = (1 << len(exists)) - 1
        if self.opts.any_order:
            return self.any_order_object(o, members, extras, need_flags)
        w = self.ws
        sep = lambda started: seq(w, lit(","), w) if started else w  # noqa: E731
        cap = (o.max + 1) if o.max is not None else o.min
        n = len(members)
        start = (0, False, 0, 0)
        index = {start: 0}
        order = [start]
        edges: list[tuple[int, Expr, int]] = []
        END = -1

        def go(src: int, key: tuple, label: Expr) -> None:
            if o.max is not None and key[2] > o.max:
                return
            if key not in index:
                index[key] = len(order)
                order.append(key)
            edges.append((src, label, index[key]))

        i = 0
        while i < len(order):
            pos, started, cnt, flags = order[i]
            src = i
            i += 1
            if len(order) > _MAX_AUTOMATON:
                self.unenforceable("the object needs too many automaton states (properties x counts)", o.min_ptr)
                return Ref(self.json["object"])
            if pos == n:
                if cnt >= o.min and flags == need_flags:
                    edges.append((src, seq(w, lit("}")), END))
            else:
                name, variants, req = members[pos]
                if not req:
                    go(src, (pos + 1, started, cnt, flags), EMPTY)
                for label, fb in variants:
                    go(src, (pos + 1, True, min(cnt + 1, cap), flags | fb), seq(sep(started), label))
            for label, fb in extras:
                go(src, (pos, True, min(cnt + 1, cap), flags | fb), seq(sep(started), label))
        k = len(order)
        edges = [(s, x, k if t == END else t) for s, x, t in edges]
        return seq(lit("{"), Automaton(k + 1, tuple(edges), (k,)))

    def member_expr(self, name: str, sub: Sub, n_declared: int) -> Expr:
        """``"name": value``; in objects with many properties a shared rule, so that the object's
        automaton does not spell every remaining key at every position (quadratic in their number)."""
        key = seq(lit('"'), lx.json_text(name, raw_ascii=True), lit('"'), self.ws, lit(":"), self.ws)
        value = self.value_ref(sub)
        if n_declared <= 8:
            return seq(key, value)
        return self.lazy_rule(("member", name, value), "prop", lambda: seq(key, value))

    def any_order_object(self, o: Obj, members: list, extras: list, need_flags: int) -> Expr:
        """Members in any order, each declared one at most once (tracked as a set of seen members)."""
        w = self.ws
        cap = (o.max + 1) if o.max is not None else o.min
        n = len(members)
        full = (2**n) * 2 * (cap + 1) * (need_flags + 1) <= _MAX_ANY_ORDER_STATES
        tracked = list(range(n)) if full else [j for j in range(n) if members[j][2]]
        if not full and (o.min > 0 or o.max is not None or 2 ** len(tracked) > _MAX_ANY_ORDER_STATES):
            self.unenforceable(f"any_order=True on an object with {n} properties ({len(tracked)} required) "
                               "and property counts needs too many states", o.min_ptr)
        bit = {j: 1 << t for t, j in enumerate(tracked)}
        need = sum(bit[j] for j in tracked if members[j][2])
        start = (0, False, 0, 0)
        index = {start: 0}
        order = [start]
        edges: list[tuple[int, Expr, int]] = []
        END = -1
        i = 0
        while i < len(order):
            seen, started, cnt, flags = order[i]
            src = i
            i += 1
            if len(order) > _MAX_AUTOMATON:
                self.unenforceable("any_order=True object needs too many automaton states", o.min_ptr)
                return Ref(self.json["object"])
            if seen & need == need and cnt >= o.min and flags == need_flags:
                edges.append((src, seq(w, lit("}")), END))
            sep = seq(w, lit(","), w) if started else w
            moves = [(bit.get(j, 0), label, fb) for j in range(n) if not (j in bit and seen & bit[j])
                     for label, fb in members[j][1]]
            moves += [(0, label, fb) for label, fb in extras]
            if o.max is not None and cnt + 1 > o.max:
                moves = []
            for b, label, fb in moves:
                key = (seen | b, True, min(cnt + 1, cap), flags | fb)
                if key not in index:
                    index[key] = len(order)
                    order.append(key)
                edges.append((src, seq(sep, label), index[key]))
        k = len(order)
        edges = [(s, x, k if t == END else t) for s, x, t in edges]
        return seq(lit("{"), Automaton(k + 1, tuple(edges), (k,)))

    def extra_member(self, o: Obj, declared: tuple, witness: tuple | None = None) -> Expr | None:
        """``"key": value`` for undeclared names, or None if none is allowed.

        ``witness`` = (key language spec, Sub): only members that also satisfy that ``exists`` entry.
        """
        pats = [(pat, s, ptr, ci) for ci, comp in enumerate(o.comps) for pat, s, ptr in comp.patterns]
        strict_forbid = (self.opts.strict and not any(c.explicit for c in o.comps)
                         and any(c.props or c.patterns for c in o.comps))
        also = witness[1] if witness is not None else TRUE
        if not pats and not declared and o.names == TRUE and witness is None:
            sub = frozenset().union(*(c.additional for c in o.comps)) if o.comps else TRUE
            if strict_forbid or self.FALSE in sub or not self.shape(sub):
                return None
            return self.lazy_rule(("extra", o), "member",
                                  lambda: seq(Ref(self.json["string"]), self.ws, lit(":"), self.ws, self.value_ref(sub)))
        if not pats and o.names == TRUE and witness is None:
            # Any name but the declared ones (the general path below gives the same language).
            sub = frozenset().union(*(c.additional for c in o.comps)) if o.comps else TRUE
            if strict_forbid or self.FALSE in sub or not self.shape(sub):
                return None
            key = lx.strings_except_expr(declared, self.char_label(True))
            return self.lazy_rule(("extra", o, None), "member",
                                  lambda: seq(lit('"'), key, lit('"'), self.ws, lit(":"), self.ws, self.value_ref(sub)))
        try:
            base = self.names_dfa(o.names)
            if declared:
                excl = lx.complement(lx.strings_dfa(declared))
                base = excl if base is None else lx.intersect(base, excl, self.MAX_DFA)
            if witness is not None:
                keys = self.keyspec_dfa(witness[0])
                base = keys if base is None else lx.intersect(base, keys, self.MAX_DFA)
            pdfas = [self.atom_dfa(("re", pat, ptr)) for pat, _, ptr, _ in pats]
        except lx.LexLimit as e:
            self.unenforceable(f"the property-name constraints are too complex to enforce exactly: {e}",
                               pats[0][2] if pats else "")
            return self.lazy_rule(("extra-any",), "member", lambda: seq(Ref(self.json["string"]), self.ws, lit(":"),
                                                                         self.ws, Ref(self.json["value"])))
        if base is None:
            base = lx.UNIVERSE
        if any(d is None for d in pdfas):  # lenient: unsupported key patterns, so any key and any value
            return self.lazy_rule(("extra-any",), "member", lambda: seq(Ref(self.json["string"]), self.ws, lit(":"),
                                                                         self.ws, Ref(self.json["value"])))
        alts: list[Expr] = []
        cells: list[tuple[tuple, lx.CharDFA]] = []

        def split(i: int, d: lx.CharDFA, matched: tuple) -> None:
            if lx.is_empty(d):
                return
            if i == len(pats):
                cells.append((matched, d))
                return
            if len(cells) > 64:
                raise lx.LexLimit("more than 64 combinations of patternProperties")
            split(i + 1, lx.minimize(lx.intersect(d, pdfas[i], self.MAX_DFA)), matched + (i,))
            split(i + 1, lx.minimize(lx.intersect(d, lx.complement(pdfas[i]), self.MAX_DFA)), matched)

        try:
            split(0, lx.minimize(base), ())
        except lx.LexLimit as e:
            self.unenforceable(f"patternProperties are too complex to combine exactly: {e}", pats[0][2] if pats else "")
            return self.lazy_rule(("extra-any",), "member", lambda: seq(Ref(self.json["string"]), self.ws, lit(":"),
                                                                         self.ws, Ref(self.json["value"])))
        for matched, d in cells:
            parts: set = set()
            for ci, comp in enumerate(o.comps):
                hit = [pats[m][1] for m in matched if pats[m][3] == ci]
                if hit:
                    for s in hit:
                        parts |= s
                else:
                    parts |= comp.additional
            if not matched and strict_forbid:
                continue
            sub = frozenset(parts) | also
            if self.FALSE in sub or not self.shape(sub):
                continue
            key = lx.dfa_to_expr(d, self.char_label(True))
            alts.append(seq(lit('"'), key, lit('"'), self.ws, lit(":"), self.ws, self.value_ref(sub)))
        if not alts:
            return None
        return self.lazy_rule(("extra", o, witness), "member", lambda: alt(*alts))

    def names_dfa(self, names: Sub) -> lx.CharDFA | None:
        """The DFA of allowed property names (None: any name)."""
        if names == TRUE:
            return None
        out = None
        for c in self.shape(names):
            if "string" not in c.kinds:
                continue
            if c.enum is not None:
                d = lx.strings_dfa([v[1] for v in c.enum if v[0] == "str" and self.check_conj(replace(c, enum=None), v)])
            else:
                try:
                    d = self.string_dfa(c.strs)
                except _Unenforceable as e:
                    self.unenforceable(e.message, e.pointer)
                    return None
                lo, hi = _length_bounds(c.strs)
                if d is None:
                    d = lx.with_length(lx.UNIVERSE, lo, hi, self.MAX_DFA)
            out = d if out is None else lx.union(out, d, self.MAX_DFA)
        return out if out is not None else lx.strings_dfa([])


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def _load_schema(schema: Any) -> Any:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if isinstance(schema, (str, bytes)):
        try:
            return json.loads(schema)
        except ValueError as e:
            raise SchemaError(f"the schema is not valid JSON: {e}") from None
    if isinstance(schema, (dict, bool)):
        return schema
    raise SchemaError(f"a schema must be a dict, a bool, JSON text or a pydantic model class, got {type(schema).__name__}")


def json_schema_to_grammar(
    schema: dict | bool | str | type,
    *,
    strict: bool = False,
    any_order: bool = False,
    whitespace: str = "flexible",
    max_whitespace: int = DEFAULT_MAX_WHITESPACE,
    lenient: bool = False,
    formats: str = "assert",
) -> Grammar:
    """Compile a JSON Schema (dict, JSON text, or pydantic v2 model class) into an exact grammar.

    ``strict``: undeclared properties are forbidden in objects that declare properties (unless the
    schema gives ``additionalProperties`` itself). ``any_order``: declared properties in any order
    (default: the order of ``properties``). ``whitespace``/``max_whitespace``: as for
    :func:`builtin_json_grammar`. ``lenient``: keywords that cannot be enforced exactly are loosened
    (the grammar accepts a superset) and listed in one warning instead of raising. ``formats``:
    ``"assert"`` (default) enforces the standard ``format`` values (an unsupported standard format is
    an error unless lenient; unknown names are annotations); ``"annotate"`` ignores ``format``, which
    is JSON Schema 2020-12's default vocabulary and what its test suite checks.

    Raises :class:`SchemaError` (with the JSON pointer of the keyword) for invalid or unenforceable
    schemas, and :class:`UnsatisfiableSchemaError` if no JSON value satisfies the schema.
    """
    root = _load_schema(schema)
    if formats not in ("assert", "annotate"):
        raise SchemaError(f"formats must be 'assert' or 'annotate', got {formats!r}")
    ws, _ = _whitespace_expr(whitespace, max_whitespace)
    c = _Compiler(root, _Options(strict=strict, any_order=any_order, lenient=lenient, formats=formats), ws)
    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20_000))
    try:
        g = c.compile()
    except RecursionError:
        raise SchemaError("the schema is nested too deeply to compile") from None
    finally:
        sys.setrecursionlimit(old)
    if c.warnings:
        warnings.warn("lenient JSON Schema compilation loosened these keywords (the grammar accepts a superset):\n  "
                      + "\n  ".join(dict.fromkeys(c.warnings)), stacklevel=2)
    return g
