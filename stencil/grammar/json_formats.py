"""``format`` values the JSON Schema frontend enforces, as regular languages over code points.

Each supported format is written as a regex (the dialect of :mod:`stencil.grammar.regex`, anchored)
transcribed from the ABNF of its RFC. Deviations, all on the safe side (a valid string may be
rejected, an invalid one is never accepted):

* ``time``/``date-time``: a leap second (``:60``) is accepted at 23:59:60 UTC written with offset
  ``Z`` or ``±00:00`` only (an exact check of other offsets needs a 1440-state automaton).
* ``idn-hostname``/``idn-email``: only their ASCII forms (RFC 1123 hostnames whose labels have no
  ``--`` in positions 3-4, so no A-labels; RFC 5321 mailboxes), which are always valid IDNs.
* ``email``: RFC 5321 ``Mailbox`` syntax without the size limits of its section 4.5.3.

``hostname`` (RFC 1123, labels of 1-63 letters/digits/hyphens, 253 characters in all) is exact.
Formats outside :data:`STANDARD_FORMATS` are annotations and are ignored; ``regex`` is standard
but not supported (ECMA-262 syntax is not a regular language), so it is an error unless lenient.
"""

from __future__ import annotations

from functools import lru_cache

from stencil.grammar.ir import Expr

# Formats defined by JSON Schema 2020-12 and earlier drafts; any other name is an annotation.
STANDARD_FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
    "relative-json-pointer", "regex",
})

HOSTNAME_MAX_LENGTH = 253

# -- building blocks ---------------------------------------------------------------------------
_D = "[0-9]"
_HEX = "[0-9A-Fa-f]"
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
_MONTH_DAY = ("(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
              "|02-(?:0[1-9]|1[0-9]|2[0-8]))")
_DATE = f"(?:[0-9]{{4}}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_HH = "(?:[01][0-9]|2[0-3])"
_MM = "[0-5][0-9]"
_FRAC = r"(?:\.[0-9]+)?"
_TIME = (f"(?:{_HH}:{_MM}:{_MM}{_FRAC}(?:[Zz]|[+-]{_HH}:{_MM})"
         f"|23:59:60{_FRAC}(?:[Zz]|[+-]00:00))")
_DUR_TIME = r"T(?:[0-9]+H(?:[0-9]+M(?:[0-9]+S)?)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"
_DUR_DATE = r"(?:[0-9]+D|[0-9]+M(?:[0-9]+D)?|[0-9]+Y(?:[0-9]+M(?:[0-9]+D)?)?)"
_DURATION = f"P(?:{_DUR_DATE}(?:{_DUR_TIME})?|{_DUR_TIME}|[0-9]+W)"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = f"{_HEX}{{1,4}}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"


def _ipv6() -> str:
    h = f"(?:{_H16}:)"

    def upto(n: int) -> str:  # [ *n( h16 ":" ) h16 ]
        return f"(?:{h}{{0,{n}}}{_H16})?" if n >= 0 else ""

    forms = [
        f"{h}{{6}}{_LS32}",
        f"::{h}{{5}}{_LS32}",
        f"(?:{_H16})?::{h}{{4}}{_LS32}",
        f"{upto(1)}::{h}{{3}}{_LS32}",
        f"{upto(2)}::{h}{{2}}{_LS32}",
        f"{upto(3)}::{h}{_LS32}",
        f"{upto(4)}::{_LS32}",
        f"{upto(5)}::{_H16}",
        f"{upto(6)}::",
    ]
    return "(?:" + "|".join(forms) + ")"


_IPV6 = _ipv6()
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL})*"
# An NR-LDH label: no "--" in positions 3 and 4 (which would make it an A-label or reserved).
_A, _L = "[A-Za-z0-9]", "[A-Za-z0-9-]"
_NR_LABEL = f"(?:{_A}|{_A}{_A}|{_A}{_L}{_A}|{_A}{_L}{_L}{_A}|{_A}{_L}(?:{_A}{_L}|-{_A}){_L}{{0,58}}{_A})"
_IDN_HOSTNAME = rf"{_NR_LABEL}(?:\.{_NR_LABEL})*"
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_SUBDOMAIN = "[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_LOCAL = rf'(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[\x20\x21\x23-\x5B\x5D-\x7E]|\\[\x20-\x7E])*")'
_EMAIL = rf"{_LOCAL}@(?:{_SUBDOMAIN}(?:\.{_SUBDOMAIN})*|\[{_IPV4}\]|\[IPv6:{_IPV6}\])"

# RFC 3986 / RFC 3987: "i" adds the Unicode ranges.
_UCSCHAR = (r"\u00A0-\uD7FF\uF900-\uFDCF\uFDF0-\uFFEF\u{10000}-\u{1FFFD}\u{20000}-\u{2FFFD}\u{30000}-\u{3FFFD}"
            r"\u{40000}-\u{4FFFD}\u{50000}-\u{5FFFD}\u{60000}-\u{6FFFD}\u{70000}-\u{7FFFD}\u{80000}-\u{8FFFD}"
            r"\u{90000}-\u{9FFFD}\u{A0000}-\u{AFFFD}\u{B0000}-\u{BFFFD}\u{C0000}-\u{CFFFD}\u{D0000}-\u{DFFFD}"
            r"\u{E1000}-\u{EFFFD}")
_IPRIVATE = r"\uE000-\uF8FF\u{F0000}-\u{FFFFD}\u{100000}-\u{10FFFD}"


def _uri(iri: bool) -> tuple[str, str]:
    """(absolute URI/IRI, URI/IRI reference) regexes from the RFC 3986/3987 ABNF."""
    u = _UCSCHAR if iri else ""
    unreserved = rf"A-Za-z0-9\-._~{u}"
    sub_delims = r"!$&'()*+,;="
    pct = f"%{_HEX}{{2}}"
    pchar = rf"(?:[{unreserved}{sub_delims}:@]|{pct})"
    userinfo = rf"(?:[{unreserved}{sub_delims}:]|{pct})*"
    ipfuture = rf"[vV]{_HEX}+\.[{unreserved}{sub_delims}:]+"
    host = rf"(?:\[(?:{_IPV6}|{ipfuture})\]|{_IPV4}|(?:[{unreserved}{sub_delims}]|{pct})*)"
    authority = rf"(?:{userinfo}@)?{host}(?::[0-9]*)?"
    segment = f"{pchar}*"
    segment_nz = f"{pchar}+"
    segment_nz_nc = rf"(?:[{unreserved}{sub_delims}@]|{pct})+"
    abempty = f"(?:/{segment})*"
    absolute = f"/(?:{segment_nz}(?:/{segment})*)?"
    rootless = f"{segment_nz}(?:/{segment})*"
    noscheme = f"{segment_nz_nc}(?:/{segment})*"
    private = _IPRIVATE if iri else ""
    query = rf"(?:{pchar}|[/?{private}])*"
    fragment = rf"(?:{pchar}|[/?])*"
    tail = rf"(?:\?{query})?(?:#{fragment})?"
    scheme = "[A-Za-z][A-Za-z0-9+.-]*"
    absolute_uri = f"{scheme}:(?://{authority}{abempty}|{absolute}|{rootless}|){tail}"
    relative = f"(?://{authority}{abempty}|{absolute}|{noscheme}|){tail}"
    return absolute_uri, f"(?:{absolute_uri}|{relative})"


_URI, _URI_REFERENCE = _uri(False)
_IRI, _IRI_REFERENCE = _uri(True)


def _uri_template() -> str:
    pct = f"%{_HEX}{{2}}"
    literal = rf"(?:[\x21\x23\x24\x26\x28-\x3B\x3D\x3F-\x5B\x5D\x5F\x61-\x7A\x7E{_UCSCHAR}{_IPRIVATE}]|{pct})"
    varchar = rf"(?:[A-Za-z0-9_]|{pct})"
    varname = rf"{varchar}(?:\.?{varchar})*"
    varspec = rf"{varname}(?::[1-9][0-9]{{0,3}}|\*)?"
    expression = rf"\{{[+#./;?&=,!@|]?{varspec}(?:,{varspec})*\}}"
    return f"(?:{literal}|{expression})*"


_JSON_POINTER = "(?:/(?:[^~/]|~[01])*)*"

_PATTERNS: dict[str, str] = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}[Tt]{_TIME}",
    "duration": _DURATION,
    "email": _EMAIL,
    "idn-email": _EMAIL,
    "hostname": _HOSTNAME,
    "idn-hostname": _IDN_HOSTNAME,
    "ipv4": _IPV4,
    "ipv6": _IPV6,
    "uuid": f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}",
    "uri": _URI,
    "uri-reference": _URI_REFERENCE,
    "iri": _IRI,
    "iri-reference": _IRI_REFERENCE,
    "uri-template": _uri_template(),
    "json-pointer": _JSON_POINTER,
    "relative-json-pointer": f"(?:0|[1-9][0-9]*)(?:#|{_JSON_POINTER})",
}

# Formats whose language also bounds the total length: labels joined by SEGMENT_SEPARATOR.
LENGTH_LIMITS = {"hostname": HOSTNAME_MAX_LENGTH, "idn-hostname": HOSTNAME_MAX_LENGTH}
SEGMENT_LABELS = {"hostname": _LABEL, "idn-hostname": _NR_LABEL}
SEGMENT_SEPARATOR = "."


def is_assertable(name: str) -> bool:
    """True for the standard formats (enforced, or an error if we cannot); others are annotations."""
    return name in STANDARD_FORMATS


def supported_formats() -> list[str]:
    return sorted(_PATTERNS)


@lru_cache(maxsize=None)
def format_expr(name: str) -> Expr | None:
    """The language of ``name`` (without its length limit) as a code-point expression; None if unsupported."""
    from stencil.grammar.regex import regex_to_expr

    pat = _PATTERNS.get(name)
    return None if pat is None else regex_to_expr(pat, anchored=True)
