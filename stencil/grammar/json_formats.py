"""``format`` values the JSON Schema frontend enforces, as exact regular languages over code points."""

from __future__ import annotations

from functools import lru_cache

from stencil.grammar.ir import Expr

# Formats defined by JSON Schema 2020-12 (and earlier drafts); any other name is an annotation.
STANDARD_FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
    "relative-json-pointer", "regex",
})

_PATTERNS: dict[str, str] = {}


def is_assertable(name: str) -> bool:
    """True for the standard formats (enforced, or an error if we cannot); others are annotations."""
    return name in STANDARD_FORMATS


@lru_cache(maxsize=None)
def format_expr(name: str) -> Expr | None:
    """The exact language of ``name`` as a code-point expression, or None if it is not supported."""
    from stencil.grammar.regex import regex_to_expr

    pat = _PATTERNS.get(name)
    return None if pat is None else regex_to_expr(pat, anchored=True)
