"""JSON Schema frontend: exactness against ``jsonschema`` (Draft 2020-12), API behaviour, diagnostics, fuzzing."""

from __future__ import annotations

import json
import random
import warnings
from decimal import Decimal
from fractions import Fraction

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.parser import Recognizer, grammar_accepts
from stencil.errors import SchemaError, StencilError
from stencil.grammar.ir import Grammar
from stencil.grammar.json_schema import UnsatisfiableSchemaError, json_schema_to_grammar

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _exact_multiple_of(validator, m, instance, schema):
    """multipleOf in exact decimal arithmetic (jsonschema divides floats: it calls -0.07 no multiple of 0.01)."""
    if validator.is_type(instance, "number") and (Fraction(str(instance)) / Fraction(str(m))).denominator != 1:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {m}")


Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"multipleOf": _exact_multiple_of})


def valid(schema, value) -> bool:
    return Validator(schema).is_valid(value)


def accepts(g: Grammar, value, **dump) -> bool:
    return grammar_accepts(g, json.dumps(value, **dump).encode())


# ----------------------------------------------------------------------------------------------
# Sampling strings from a grammar (a random walk over the rule automata)
# ----------------------------------------------------------------------------------------------


def sample(g: Grammar, rng: random.Random, max_bytes: int = 300) -> bytes | None:
    """A random sentence of ``g`` (None if the walk ran too long or into a dead end)."""
    out = bytearray()
    state = int(g.rule_start[g.root])
    stack: list[int] = []
    for _ in range(20 * max_bytes):
        options = []
        if g.state_final[state]:
            options.append(("return", 0, 0))
        for e in range(g.edge_ptr[state], g.edge_ptr[state + 1]):
            options.append(("byte" if g.edge_rule[e] < 0 else "rule", e, 0))
        if not options:
            return None
        # Past half the budget, prefer finishing: return when possible, else avoid rule calls.
        if len(out) > max_bytes // 2 or len(stack) > 12:
            finishing = [o for o in options if o[0] == "return"] or [o for o in options if o[0] == "byte"] or options
            options = finishing
        kind, e, _ = rng.choice(options)
        if kind == "return":
            if not stack:
                return bytes(out)
            state = stack.pop()
        elif kind == "byte":
            lo, hi = int(g.edge_lo[e]), int(g.edge_hi[e])
            out.append(rng.randint(lo, hi) if rng.random() < 0.5 else rng.choice((lo, hi)))
            state = int(g.edge_target[e])
        else:
            stack.append(int(g.edge_target[e]))
            state = int(g.rule_start[g.edge_rule[e]])
        if len(out) > max_bytes:
            return None
    return None


def _exact_float(text: str):
    """A float when it represents the numeral exactly, else a Decimal (so 1e-400 stays non-zero)."""
    d = Decimal(text)
    f = float(text)
    return f if Decimal(f) == d else d


def sampled_values(g: Grammar, n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n * 4):
        s = sample(g, rng)
        if s is None:
            continue
        assert grammar_accepts(g, s), s  # the sampler itself must stay inside the language
        out.append(json.loads(s, parse_float=_exact_float))
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------------------------
# Random schemas built from the supported keywords
# ----------------------------------------------------------------------------------------------

NAMES = ["a", "b", "c", "é", "a b"]
PATTERNS = ["^a", "b$", "^[a-c]*$", "[0-9]", "^(ab|c)+$", "é", "^.{2}$"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 20), st.sampled_from([0.5, 2.5, -1.25, 1.0]),
                    st.sampled_from(["", "a", "ab", "abc", "b", "c1", "é", "aaa", "ca", "a b"]))


def schemas(depth: int = 2) -> st.SearchStrategy:
    sub = schemas(depth - 1) if depth > 0 else st.sampled_from([{}, True, False, {"type": "integer"}, {"type": "string"}])
    numbers = st.fixed_dictionaries({}, optional={
        "minimum": st.integers(-3, 10), "maximum": st.integers(0, 15), "exclusiveMinimum": st.sampled_from([-2, 0.5, 3]),
        "exclusiveMaximum": st.sampled_from([2, 7.5, 12]), "multipleOf": st.sampled_from([1, 2, 3, 0.5, 0.25, 2.5])})
    strings = st.fixed_dictionaries({}, optional={
        "minLength": st.integers(0, 3), "maxLength": st.integers(0, 4), "pattern": st.sampled_from(PATTERNS)})
    arrays = st.fixed_dictionaries({}, optional={
        "items": sub, "prefixItems": st.lists(sub, max_size=2), "minItems": st.integers(0, 2),
        "maxItems": st.integers(0, 3), "contains": sub, "minContains": st.integers(0, 2), "maxContains": st.integers(0, 2)})
    objects = st.fixed_dictionaries({}, optional={
        "properties": st.dictionaries(st.sampled_from(NAMES), sub, max_size=3),
        "required": st.lists(st.sampled_from(NAMES), max_size=2, unique=True),
        "additionalProperties": sub, "patternProperties": st.dictionaries(st.sampled_from(["^a", "b", "é"]), sub, max_size=2),
        "propertyNames": st.sampled_from([{"maxLength": 1}, {"pattern": "^[ab]"}, {"enum": ["a", "b", "c"]}]),
        "minProperties": st.integers(0, 2), "maxProperties": st.integers(0, 3),
        "dependentRequired": st.dictionaries(st.sampled_from(NAMES), st.lists(st.sampled_from(NAMES), max_size=2), max_size=1)})
    typed = st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["null", "boolean", "integer", "number", "string", "array", "object"])
        | st.lists(st.sampled_from(["integer", "string", "null", "array", "object"]), min_size=1, max_size=3, unique=True),
        "enum": st.lists(SCALARS, min_size=1, max_size=4), "const": SCALARS})
    parts = [typed, numbers, strings, arrays, objects]
    if depth > 0:
        parts.append(st.fixed_dictionaries({}, optional={
            "allOf": st.lists(sub, min_size=1, max_size=2), "anyOf": st.lists(sub, min_size=1, max_size=2),
            "oneOf": st.lists(sub, min_size=1, max_size=2), "not": sub, "if": sub, "then": sub, "else": sub}))

    @st.composite
    def build(draw):
        out = {}
        for p in draw(st.lists(st.sampled_from(range(len(parts))), max_size=3, unique=True)):
            out.update(draw(parts[p]))
        return out

    return build()


values = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(NAMES + ["d"]), inner, max_size=3),
    max_leaves=8,
)


def compile_or_none(schema, **kw) -> Grammar | None:
    """The grammar, or None if the compiler declines (an unenforceable keyword or no valid value)."""
    try:
        return json_schema_to_grammar(schema, **kw)
    except UnsatisfiableSchemaError:
        return None
    except SchemaError as e:
        assert "lenient=True" in str(e) or "too complex" in str(e) or "accepts no" in str(e), e
        return None


@FAST
@given(schemas(), st.lists(values, min_size=1, max_size=6))
def test_random_schemas_agree_with_jsonschema(schema, instances):
    g = compile_or_none(schema, any_order=True)
    if g is None:
        return
    for v in instances:
        assert accepts(g, v) == valid(schema, v), (schema, v)


@FAST
@given(schemas(), st.integers(0, 10**6))
def test_sampled_sentences_are_valid(schema, seed):
    """Soundness on the grammar's own output: whatever it accepts parses and validates."""
    g = compile_or_none(schema)
    if g is None:
        return
    for v in sampled_values(g, 5, seed):
        assert valid(schema, v), (schema, v)


@FAST
@given(schemas(), st.integers(0, 10**6))
def test_unsatisfiable_schemas_have_no_valid_instance(schema, seed):
    try:
        json_schema_to_grammar(schema)
    except UnsatisfiableSchemaError:
        rng = random.Random(seed)
        pool = [None, True, False, 0, 1, 2.5, -3, "", "a", "ab", [], [1], ["a", 1], {}, {"a": 1}, {"b": "x"}]
        assert not any(valid(schema, v) for v in rng.sample(pool, 8))
    except SchemaError:
        pass


# ----------------------------------------------------------------------------------------------
# Hand-picked exactness checks (oracle: jsonschema)
# ----------------------------------------------------------------------------------------------

CASES = [
    ({"type": "integer", "minimum": -3, "exclusiveMaximum": 1000}, [-4, -3, 0, 999, 1000, 5.0, 5.5, "1", 1e2]),
    ({"type": "number", "minimum": 1.25, "maximum": 2.5}, [1.2, 1.25, 1.3, 2.5, 2.50001, 2, 1e-5, 2e0]),
    ({"type": "number", "exclusiveMinimum": 0}, [0, -0.0, 1e-7, 1e300, -1e-300, 0.5]),
    ({"multipleOf": 0.01}, [1.23, 1.234, 5, -0.07, "x"]),
    ({"multipleOf": 7, "maximum": 100}, [0, 7, 98, 105, 14.0, 3]),
    ({"type": "string", "minLength": 2, "maxLength": 3}, ["a", "ab", "abc", "abcd", "😀😀", "é"]),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, ["abc", "abcd", "ab1", "", "xyz"]),
    ({"type": "string", "format": "date"}, ["2024-02-29", "2023-02-29", "2024-13-01", "2024-1-01", "1900-02-29"]),
    ({"type": "string", "format": "ipv4"}, ["1.2.3.4", "256.1.1.1", "01.2.3.4", "1.2.3"]),
    ({"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000", "123e4567e89b12d3a456426614174000"]),
    ({"enum": [1, "a", None, [1, 2], {"x": 1}]}, [1, 1.0, "a", None, [1, 2], [2, 1], {"x": 1}, {"x": 1.0}, False, 0]),
    ({"const": {"b": [1, {"c": None}], "a": "x"}}, [{"b": [1, {"c": None}], "a": "x"}, {"a": "x"}, {"b": [1, {"c": 0}], "a": "x"}]),
    ({"properties": {"a": {"type": "integer"}}, "additionalProperties": False, "required": ["a"]},
     [{"a": 1}, {"a": 1, "b": 2}, {}, {"a": "x"}, []]),
    ({"patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     [{"x1": 1, "y": "s"}, {"x1": "s"}, {"y": 1}, {"xy": 2, "z": "q"}]),
    ({"propertyNames": {"maxLength": 2}, "minProperties": 1}, [{}, {"ab": 1}, {"abc": 1}, {"a": 1, "bb": 2}]),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     [[1, "a"], [1], [1, "a", 2], ["a", 1], []]),
    ({"contains": {"type": "integer"}, "minContains": 2, "maxContains": 3}, [[1, 2], [1], [1, 2, 3, 4], ["a", 1, "b", 2]]),
    ({"type": "array", "items": {"enum": ["x", "y", "z"]}, "uniqueItems": True}, [["x", "y"], ["x", "x"], [], ["z", "y", "x"]]),
    ({"oneOf": [{"type": "integer"}, {"minimum": 2}]}, [1, 2, 2.5, "a", 3]),
    ({"oneOf": [{"required": ["a"]}, {"required": ["b"]}]}, [{"a": 1}, {"b": 1}, {"a": 1, "b": 2}, {}]),
    ({"not": {"type": "string", "maxLength": 2}}, ["a", "abc", 1, None]),
    ({"if": {"properties": {"k": {"const": "n"}}, "required": ["k"]}, "then": {"required": ["n"]},
      "else": {"required": ["s"]}}, [{"k": "n", "n": 1}, {"k": "n"}, {"k": "s", "s": 1}, {"s": 1}, {}]),
    ({"dependentSchemas": {"a": {"required": ["b"]}}}, [{"a": 1, "b": 2}, {"a": 1}, {"b": 1}]),
    ({"allOf": [{"properties": {"a": {"minimum": 2}}}, {"properties": {"a": {"maximum": 5}}}]}, [{"a": 3}, {"a": 1}, {"a": 6}]),
    ({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}},
                         "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
     [{"v": 1}, {"v": 1, "next": {"v": 2, "next": {"v": 3}}}, {"v": 1, "next": {}}, {"v": 1, "next": {"v": "x"}}]),
    ({"properties": {"a": True}, "unevaluatedProperties": False, "anyOf": [{"properties": {"b": True}}, {"properties": {"c": True}}]},
     [{"a": 1, "b": 1}, {"b": 1, "c": 1}, {"d": 1}]),
]


@pytest.mark.parametrize("schema,instances", CASES)
def test_cases_agree_with_jsonschema(schema, instances):
    checker = Validator(schema, format_checker=jsonschema.FormatChecker())
    for any_order in (False, True):
        g = json_schema_to_grammar(schema, any_order=any_order)
        for v in instances:
            expect = checker.is_valid(v)
            assert accepts(g, v) == expect, (schema, v, any_order)
            assert accepts(g, v, indent=2) == expect
            assert accepts(g, v, separators=(",", ":"), ensure_ascii=False) == expect


# ----------------------------------------------------------------------------------------------
# API behaviour and options
# ----------------------------------------------------------------------------------------------


def test_pydantic_models_and_json_text():
    pydantic = pytest.importorskip("pydantic")

    class Item(pydantic.BaseModel):
        name: str
        tags: list[str] = []
        price: float | None = None

    class Order(pydantic.BaseModel):
        id: int
        items: list[Item]

    g = json_schema_to_grammar(Order)
    order = Order(id=3, items=[Item(name="x", tags=["a"]), Item(name="y", price=2.5)])
    assert grammar_accepts(g, order.model_dump_json().encode())
    assert not grammar_accepts(g, b'{"id": "3", "items": []}')
    g2 = json_schema_to_grammar(json.dumps(Order.model_json_schema()))
    assert grammar_accepts(g2, order.model_dump_json().encode())
    with pytest.raises(SchemaError):
        json_schema_to_grammar('{"type": ')
    with pytest.raises(SchemaError):
        json_schema_to_grammar(42)


def test_property_order_and_any_order():
    schema = {"properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
    ordered = json_schema_to_grammar(schema)
    free = json_schema_to_grammar(schema, any_order=True)
    assert accepts(ordered, {"a": 1, "b": 2}) and not accepts(ordered, {"b": 2, "a": 1})
    assert accepts(free, {"a": 1, "b": 2}) and accepts(free, {"b": 2, "a": 1})
    assert not accepts(free, {"a": 1}) and not grammar_accepts(free, b'{"a": 1, "a": 2, "b": 3}')
    # undeclared properties may sit anywhere between declared ones
    assert accepts(ordered, {"x": 0, "a": 1, "y": [], "b": 2, "z": None})


def test_strict_forbids_undeclared_properties():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert accepts(json_schema_to_grammar(schema), {"a": 1, "b": 2})
    strict = json_schema_to_grammar(schema, strict=True)
    assert accepts(strict, {"a": 1}) and not accepts(strict, {"a": 1, "b": 2})
    # an explicit additionalProperties still wins, and free-form objects stay free
    assert accepts(json_schema_to_grammar({**schema, "additionalProperties": True}, strict=True), {"b": 2})
    assert accepts(json_schema_to_grammar({"type": "object"}, strict=True), {"b": 2})


def test_whitespace_options():
    schema = {"type": "object", "properties": {"a": {"type": "array"}}}
    v = {"a": [1, {"b": None}]}
    compact = json_schema_to_grammar(schema, whitespace="compact")
    assert accepts(compact, v, separators=(",", ":")) and not accepts(compact, v)
    flexible = json_schema_to_grammar(schema, max_whitespace=6)  # indent=2 here goes 3 levels deep
    assert accepts(flexible, v) and accepts(flexible, v, indent=2)
    assert grammar_accepts(flexible, b'{"a":      []}') and not grammar_accepts(flexible, b'{"a":       []}')
    with pytest.raises(SchemaError):
        json_schema_to_grammar(schema, whitespace="[x]")


def test_unenforceable_keywords_name_their_pointer():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}
    with pytest.raises(SchemaError) as e:
        json_schema_to_grammar(schema)
    assert e.value.pointer == "/properties/tags/uniqueItems"
    with pytest.warns(UserWarning, match="/properties/tags/uniqueItems"):
        g = json_schema_to_grammar(schema, lenient=True)
    assert accepts(g, {"tags": ["a", "a"]})  # the superset
    assert not accepts(g, {"tags": [1]})  # everything else still holds


def test_lenient_never_narrows_inside_not():
    schema = {"not": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}
    with pytest.raises(SchemaError):
        json_schema_to_grammar(schema)
    with pytest.warns(UserWarning):
        g = json_schema_to_grammar(schema, lenient=True)
    for v in [["a", "a"], ["a", "b"], [1], 5]:
        if valid(schema, v):
            assert accepts(g, v)


@pytest.mark.parametrize("schema,pointer", [
    ({"properties": {"a": {"minLength": "3"}}}, "/properties/a/minLength"),
    ({"type": "strin"}, "/type"),
    ({"items": {"$ref": "#/$defs/missing"}}, "/items/$ref"),
    ({"$ref": "other.json"}, "/$ref"),
    ({"required": "a"}, "/required"),
    ({"multipleOf": 0}, "/multipleOf"),
    ({"allOf": []}, "/allOf"),
    ({"enum": 3}, "/enum"),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "/$defs/a"),
])
def test_invalid_schemas_are_typed_errors(schema, pointer):
    with pytest.raises(SchemaError) as e:
        json_schema_to_grammar(schema)
    assert e.value.pointer.startswith(pointer), e.value


@pytest.mark.parametrize("schema", [False, {"not": {}}, {"allOf": [{"type": "string"}, {"type": "integer"}]},
                                    {"type": "integer", "minimum": 5, "maximum": 4}, {"enum": [1], "type": "string"},
                                    {"required": ["a"], "properties": {"a": False}, "type": "object"}])
def test_unsatisfiable_schemas(schema):
    with pytest.raises(UnsatisfiableSchemaError):
        json_schema_to_grammar(schema)


def test_formats_assert_or_annotate():
    schema = {"type": "string", "format": "date-time"}
    g = json_schema_to_grammar(schema)
    assert accepts(g, "2024-01-02T03:04:05Z") and accepts(g, "2024-01-02t03:04:05.5+01:00")
    assert not accepts(g, "2024-01-02 03:04:05") and not accepts(g, "yesterday")
    loose = json_schema_to_grammar(schema, formats="annotate")
    assert accepts(loose, "yesterday")
    assert accepts(json_schema_to_grammar({"format": "x-custom"}), "anything")  # unknown formats are annotations
    with pytest.raises(SchemaError):
        json_schema_to_grammar({"format": "regex"})


def test_escaped_spellings():
    g = json_schema_to_grammar({"type": "string", "maxLength": 1})
    assert grammar_accepts(g, b'"\\u00e9"') and grammar_accepts(g, '"é"'.encode())
    assert grammar_accepts(g, b'"\\ud83d\\ude00"') and not grammar_accepts(g, b'"ab"')
    keys = json_schema_to_grammar({"properties": {"é": {"type": "integer"}}, "additionalProperties": {"type": "string"}})
    assert grammar_accepts(keys, b'{"\\u00e9": 1}') and grammar_accepts(keys, '{"é": 1}'.encode())
    # a declared name cannot come back as an undeclared one under another spelling
    assert not grammar_accepts(keys, b'{"\\u00e9": "s"}') and not grammar_accepts(keys, '{"é": "s"}'.encode())


def test_recognizer_rejects_invalid_prefix_early():
    g = json_schema_to_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False})
    r = Recognizer(g)
    assert r.accept_bytes(b'{"n": 1')
    assert not r.accept_bytes(b".5")
    assert not r.accept_bytes(b', "m"')


# ----------------------------------------------------------------------------------------------
# Fuzzing the compiler: typed errors only
# ----------------------------------------------------------------------------------------------

KEYWORDS = ["type", "enum", "const", "properties", "required", "items", "prefixItems", "additionalProperties",
            "patternProperties", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref", "$defs", "minimum",
            "maximum", "multipleOf", "minLength", "maxLength", "pattern", "format", "minItems", "maxItems",
            "uniqueItems", "contains", "minContains", "propertyNames", "dependentRequired", "dependentSchemas",
            "unevaluatedProperties", "unevaluatedItems", "$id", "$anchor", "$dynamicRef", "exclusiveMinimum"]
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["integer", "string", "object", "#", "#/$defs/a", "#/properties", "^a(", "[", "date", "a"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYWORDS + ["a"]), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk, st.booleans())
def test_fuzzed_schemas_raise_only_typed_errors(schema, lenient):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            json_schema_to_grammar(schema, lenient=lenient)
        except StencilError:
            pass


def test_numbers_beyond_float_range():
    g = json_schema_to_grammar({"type": "integer", "maximum": 10**30})
    assert grammar_accepts(g, str(10**30).encode()) and not grammar_accepts(g, str(10**30 + 1).encode())
    assert Decimal("1e30") == 10**30


def test_ebnf_printout_round_trips():
    """to_ebnf prints the schema grammar (automata as helper rules) as GBNF that means the same."""
    from stencil.grammar.ebnf import ebnf_to_grammar

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}, "s": {"maxLength": 2, "pattern": "^a"}},
              "required": ["n"], "additionalProperties": {"type": "array", "maxItems": 2}}
    g = json_schema_to_grammar(schema)
    g2 = ebnf_to_grammar(g.to_ebnf())
    for v in [{"n": 3}, {"n": 2}, {"n": 4, "s": "ab"}, {"n": 4, "s": "ba"}, {"n": 4, "x": [1, 2]}, {"n": 4, "x": [1, 2, 3]}]:
        assert accepts(g, v) == accepts(g2, v) == valid(schema, v)


def _mutate(node, rng: random.Random, junk_values: list):
    """A copy of a schema with a few random subtrees replaced, keys dropped or values retyped."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            r = rng.random()
            if r < 0.03:
                continue
            out[k] = rng.choice(junk_values) if r < 0.08 else _mutate(v, rng, junk_values)
        return out
    if isinstance(node, list):
        return [_mutate(v, rng, junk_values) for v in node if rng.random() > 0.03]
    return rng.choice(junk_values) if rng.random() < 0.05 else node


def test_mutated_real_schemas_raise_only_typed_errors():
    from tests.conftest import jsonschemabench_records

    records = [r for r in jsonschemabench_records("Handwritten") + jsonschemabench_records("Github_easy")[:40]
               if len(json.dumps(r["schema"])) < 20_000]
    junk_values = [None, True, False, -1, 0, 1.5, 10**12, "", "x", "#/nowhere", "^(", [], [1, "a"], {}, {"type": 3},
                   {"$ref": "#"}, {"minimum": "a"}, {"enum": []}, {"pattern": "(?<=a)b"}]
    rng = random.Random(1234)
    for r in records[:60]:
        for _ in range(3):
            schema = _mutate(r["schema"], rng, junk_values)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    json_schema_to_grammar(schema, lenient=rng.random() < 0.5)
                except StencilError:
                    pass


# ----------------------------------------------------------------------------------------------
# format against independent reference implementations
# ----------------------------------------------------------------------------------------------


def _ref_ipv4(s: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv4Address(s)
    except ValueError:
        return False
    return True


def _ref_ipv6(s: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return "%" not in s  # zone ids are not part of RFC 4291 text addresses


def _ref_date(s: str) -> bool:
    import datetime
    import re

    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", s):
        return False
    try:
        datetime.date.fromisoformat(s)
    except ValueError:
        return False
    return True


def _ref_hostname(s: str) -> bool:
    import re

    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    return len(s) <= 253 and re.fullmatch(rf"{label}(?:\.{label})*", s) is not None


FORMAT_GRAMMARS: dict = {}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["ipv4", "ipv6", "date", "hostname"]), st.data())
def test_formats_against_reference_checkers(fmt, data):
    alphabet = {"ipv4": "0123456789.", "ipv6": "0123456789abcdefABCDEF:.", "date": "0123456789-",
                "hostname": "ab0-."}[fmt]
    if fmt == "date":
        s = data.draw(st.from_regex(r"[0-9]{4}-[01][0-9]-[0-3][0-9]", fullmatch=True) | st.text(alphabet, max_size=12))
        if s.startswith("0000"):
            s = "1" + s[1:]  # Python's datetime has no year 0, RFC 3339 does
    elif fmt == "ipv4":
        s = data.draw(st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", fullmatch=True) | st.text(alphabet, max_size=16))
    elif fmt == "ipv6":
        s = data.draw(st.ip_addresses(v=6).map(str) | st.text(alphabet, max_size=20)
                      | st.ip_addresses(v=6).map(lambda a: a.exploded))
    else:
        s = data.draw(st.text(alphabet, max_size=12) | st.from_regex(r"[a0]{60,66}(\.[a0-]{1,3})?", fullmatch=True))
    ref = {"ipv4": _ref_ipv4, "ipv6": _ref_ipv6, "date": _ref_date, "hostname": _ref_hostname}[fmt]
    if fmt not in FORMAT_GRAMMARS:
        FORMAT_GRAMMARS[fmt] = json_schema_to_grammar({"type": "string", "format": fmt})
    assert accepts(FORMAT_GRAMMARS[fmt], s) == ref(s), (fmt, s)


def test_hostname_length_limits():
    g = json_schema_to_grammar({"type": "string", "format": "hostname"})
    for s in ["a" * 63, "a" * 64, ".".join(["a" * 63] * 3 + ["a" * 61]), ".".join(["a" * 63] * 3 + ["a" * 62]),
              ".".join(["ab"] * 84) + ".a", ".".join(["ab"] * 85), "a-b.c", "-a", "a.", ""]:
        assert accepts(g, s) == _ref_hostname(s), (len(s), s[:20])
