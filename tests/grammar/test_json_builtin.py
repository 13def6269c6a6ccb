"""The builtin JSON grammar against ``json.loads`` (RFC 8259), on generated and on broken documents."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.parser import grammar_accepts
from stencil.errors import SchemaError
from stencil.grammar.json_schema import builtin_json_grammar

ANY = builtin_json_grammar(whitespace="any")
FLEXIBLE = builtin_json_grammar()
COMPACT = builtin_json_grammar(whitespace="compact")


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _has_surrogate(v) -> bool:
    if isinstance(v, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in v)
    if isinstance(v, list):
        return any(_has_surrogate(x) for x in v)
    if isinstance(v, dict):
        return any(_has_surrogate(k) or _has_surrogate(x) for k, x in v.items())
    return False


def is_json(data: bytes) -> bool:
    """RFC 8259 JSON text: json.loads without NaN/Infinity, valid UTF-8, no lone surrogate escapes."""
    try:
        v = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return not _has_surrogate(v)


text = st.text(st.characters(codec="utf-8"), max_size=12)
scalars = st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False, allow_infinity=False) | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                      max_leaves=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.booleans())
def test_generated_documents_are_accepted(v, ensure_ascii):
    default = json.dumps(v, ensure_ascii=ensure_ascii).encode()
    indented = json.dumps(v, ensure_ascii=ensure_ascii, indent=2).encode()
    compact = json.dumps(v, ensure_ascii=ensure_ascii, separators=(",", ":")).encode()
    for doc in (default, indented, compact):
        assert grammar_accepts(ANY, doc)
        assert grammar_accepts(FLEXIBLE, doc)
    assert grammar_accepts(COMPACT, compact)
    # compact whitespace admits no whitespace at all
    assert grammar_accepts(COMPACT, default) == (default == compact)


MALFORMED = [
    "[1,]", "[,1]", '{"a":1,}', '{"a" 1}', '{"a":}', "{1:2}", "{'a':1}", "[1 2]", "[", "]", "{", '{"a":1', "",
    "01", "-01", "+1", "1.", ".5", "1.e5", "1e", "1e+", "-", "--1", "0x10", "1_000", "NaN", "Infinity", "-Infinity",
    "nan", "tru", "True", "nul", "null null", '"abc', 'abc"', '"\\x41"', '"\\u12"', '"\\u12G4"', '"\\a"', "'a'",
    '"\\ud800"', '"\\udc00"', '"\\ud800\\ud800"', '"\\udc00\\ud800"', '"a\\ud83d"', '"\\ud83dx"',
    '"\x00"', '"\x1f"', '"\t"', '"\n"', "\ufeff1", "[1]]", "[[1]", '{"a":[}]}', "1 2", "\x0c1", "1\x0b",
]


@pytest.mark.parametrize("doc", MALFORMED)
def test_malformed_documents(doc):
    data = doc.encode("utf-8")
    assert grammar_accepts(ANY, data) == is_json(data)
    assert not grammar_accepts(ANY, data)


@pytest.mark.parametrize("data", [b'"\xff"', b'"\xc0\x80"', b'"\xed\xa0\x80"', b'"\xe2\x82"', b'"\xf4\x90\x80\x80"'])
def test_invalid_utf8_is_rejected(data):
    assert not is_json(data)
    assert not grammar_accepts(ANY, data)


VALID = ['"\\ud83d\\ude00"', '"\\uD83D\\uDE00"', '"\\u00e9\\u00E9"', '"\\/\\b\\f\\n\\r\\t\\"\\\\"', "-0", "-0.0e-0",
         "1E+2", "1e-400", "123456789012345678901234567890", '" \\u2028 \u2028"', " [ ] ", '{"":{"":[]}}', "\t\r\n1\n"]


@pytest.mark.parametrize("doc", VALID)
def test_valid_edge_cases(doc):
    data = doc.encode()
    assert is_json(data)
    assert grammar_accepts(ANY, data)


ALPHABET = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"u", b"d", b"8", b"0", b"1", b"-", b"+", b".", b"e",
            b"E", b" ", b"\n", b"\x01", b"n", b"t", b"f", b"a", b"\xc3\xa9", b"\xe9", b"/"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["insert", "delete", "replace"]),
                                   st.sampled_from(ALPHABET)), min_size=1, max_size=3))
def test_mutated_documents_agree_with_json_loads(v, edits):
    data = bytearray(json.dumps(v, ensure_ascii=False).encode())
    for pos, op, b in edits:
        i = pos % (len(data) + 1)
        if op == "insert" or not data:
            data[i:i] = b
        elif op == "delete":
            del data[min(i, len(data) - 1)]
        else:
            data[min(i, len(data) - 1):min(i, len(data) - 1) + 1] = b
    assert grammar_accepts(ANY, bytes(data)) == is_json(bytes(data))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["[", "]", "{", "}", ",", ":", '"a"', "1", "null", " "]), max_size=12))
def test_token_soup_agrees_with_json_loads(tokens):
    data = "".join(tokens).encode()
    assert grammar_accepts(ANY, data) == is_json(data)


def test_flexible_whitespace_is_bounded():
    g = builtin_json_grammar(max_whitespace=4)
    assert grammar_accepts(g, b"[1,    2]")
    assert not grammar_accepts(g, b"[1,     2]")
    assert grammar_accepts(g, b"[1,\n    2]")
    assert not grammar_accepts(g, b"[1,\n\n2]")  # one line break per gap
    assert not grammar_accepts(g, b" 1")  # nothing around the top-level value


def test_deeply_indented_output_fits_default_bound():
    v = [0]
    for _ in range(25):  # the deepest MaskBench instance nests 25 levels
        v = {"k": v}
    assert grammar_accepts(FLEXIBLE, json.dumps(v, indent=2).encode())


def test_custom_whitespace_pattern():
    g = builtin_json_grammar(whitespace=r"[ ]?")
    assert grammar_accepts(g, b'{"a": [1, 2]}')
    assert not grammar_accepts(g, b'{"a":  1}')
    with pytest.raises(SchemaError):
        builtin_json_grammar(whitespace="[ a]*")
    with pytest.raises(SchemaError):
        builtin_json_grammar(whitespace="(")
    with pytest.raises(SchemaError):
        builtin_json_grammar(max_whitespace=-1)


def test_numbers_against_float_parsing():
    for s in ["0", "-0", "1e5", "1E-5", "12.5e+3", "1" * 40, "0.000001"]:
        assert grammar_accepts(ANY, s.encode())
        assert math.isfinite(float(s))
