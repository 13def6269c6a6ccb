"""Structural tags (XGrammar's format) against independent reference recognizers.

The oracles are small Python functions written from XGrammar's documented semantics (free text up
to the first trigger, tags that end at the first end string, separators, at_least_one /
stop_after_first), run on strings that hypothesis assembles from the spec's own fragments plus
noise, so both accepted and rejected strings are common. JSON content is judged by the
``jsonschema`` library.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.matcher import GrammarMatcher
from stencil.decode.parser import Recognizer, grammar_accepts
from stencil.errors import GrammarError
from stencil.grammar.compiler import GrammarCompiler
from stencil.grammar.ir import GrammarBuilder, Special, lit, seq
from stencil.grammar.structural_tag import literal, structural_tag_to_grammar, text_avoiding
from stencil.grammar.vocab import TokenizerInfo
from tests.conftest import tokenizer_dir

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def accepts(g, s: str) -> bool:
    return grammar_accepts(g, s.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# text_avoiding: text with none of some strings, ending only where a follower starts cleanly
# ----------------------------------------------------------------------------------------------


def first_end(s: str, pats) -> int | None:
    """The smallest end index of any occurrence of any pattern in s (None if none occurs)."""
    ends = [i + len(p) for p in pats for i in range(len(s)) if s.startswith(p, i)]
    return min(ends) if ends else None


PATTERN_SETS = [["<tool_call>"], ["aa"], ["ab", "ba"], ["abab", "b"], ["é€", "x"], ["<a>", "</a>", "<<"]]


@pytest.mark.parametrize("avoid", PATTERN_SETS)
@FAST
@given(data=st.data())
def test_text_avoiding_matches_substring_oracle(avoid, data):
    alphabet = sorted({c for p in avoid for c in p} | {"z", "😀"})
    frag = st.one_of(st.sampled_from(avoid), st.text(alphabet=alphabet, max_size=4))
    s = "".join(data.draw(st.lists(frag, max_size=5)))
    b = GrammarBuilder()
    b.rule("root", text_avoiding(avoid))
    assert accepts(b.build("root"), s) == (first_end(s, avoid) is None)
    # With a follower f, text + f is accepted exactly when the first avoided occurrence ends at the end.
    f = data.draw(st.sampled_from(avoid))
    b = GrammarBuilder()
    b.rule("root", seq(text_avoiding(avoid, [f]), lit(f)))
    t = s + f
    assert accepts(b.build("root"), t) == (first_end(t, avoid) == len(t))


def test_text_avoiding_rejects_bad_arguments():
    with pytest.raises(GrammarError, match="empty string"):
        text_avoiding([""])
    with pytest.raises(GrammarError, match="followers"):
        text_avoiding(["a"], ["b"])


def test_literal_splits_special_tokens_longest_first():
    e = literal("x<|a|><|ab|>y", {"<|a|>", "<|ab|>", "<|"})
    assert e == seq(lit("x"), Special("<|a|>"), Special("<|ab|>"), lit("y"))
    assert literal("plain", set()) == lit("plain")


# ----------------------------------------------------------------------------------------------
# Reference recognizer for tags / triggered tags / tags with separator (finite contents)
# ----------------------------------------------------------------------------------------------


def ref_tag(s: str, i: int, tag) -> list[int]:
    """End positions of ``begin content end`` matched at i (content: a finite set, or None = any text)."""
    begin, contents, ends = tag
    if not s.startswith(begin, i):
        return []
    j = i + len(begin)
    if contents is None:  # any text up to the first end string
        k = first_end(s[j:], ends)
        return [] if k is None else [j + k]
    return [j + len(c) + len(e) for c in contents for e in ends if s.startswith(c + e, j)]


def ref_triggered(s: str, triggers, tags, at_least_one: bool, stop_after_first: bool) -> bool:
    def text_to(i: int) -> int:
        """Index of the first trigger occurrence at or after i (len(s) when none)."""
        k = [s.find(t, i) for t in triggers if s.find(t, i) >= 0]
        return min(k) if k else len(s)

    def after_tag(i: int, count: int) -> bool:
        if stop_after_first and count:
            return i == len(s)
        j = text_to(i)
        if j == len(s):
            return True
        return any(after_tag(e, count + 1) for t in tags for e in ref_tag(s, j, t))

    if at_least_one:
        return any(after_tag(e, 1) for t in tags for e in ref_tag(s, 0, t))
    if stop_after_first:
        j = text_to(0)
        return j == len(s) or any(e == len(s) for t in tags for e in ref_tag(s, j, t))
    return after_tag(0, 0)


def ref_separated(s: str, tags, sep: str, at_least_one: bool, stop_after_first: bool) -> bool:
    def from_(i: int, count: int) -> bool:
        if i == len(s):
            return count > 0 or not at_least_one
        if count and (stop_after_first or not s.startswith(sep, i)):
            return False
        j = i + len(sep) if count else i
        return any(from_(e, count + 1) for t in tags for e in ref_tag(s, j, t))

    return from_(0, 0)


def tag_json(begin, contents, end):
    content = ({"type": "any_text"} if contents is None else
               {"type": "or", "elements": [{"type": "const_string", "value": c} for c in contents]})
    return {"type": "tag", "begin": begin, "content": content, "end": end}


TAGS = [("<f=a>", ["1", "12"], ["</f>"]), ("<f=b>", None, ["</f>", "<end>"]), ("<g>", ["x"], ["</g>"])]
TRIGGERS = ["<f=", "<g>"]


def fragments(tags, extra):
    pieces = set(extra)
    for b, cs, es in tags:
        pieces |= {b, *es, *(cs or ["any", "<", "</"])}
    return st.lists(st.one_of(st.sampled_from(sorted(pieces)), st.text(alphabet="<>/=fabx", max_size=3)), max_size=7)


@pytest.mark.parametrize("at_least_one", [False, True])
@pytest.mark.parametrize("stop_after_first", [False, True])
@FAST
@given(data=st.data())
def test_triggered_tags_match_reference(at_least_one, stop_after_first, data):
    spec = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": TRIGGERS, "tags": [tag_json(*t) for t in TAGS],
        "at_least_one": at_least_one, "stop_after_first": stop_after_first}}
    g = _cached_grammar(json.dumps(spec))
    s = "".join(data.draw(fragments(TAGS, TRIGGERS)))
    assert accepts(g, s) == ref_triggered(s, TRIGGERS, TAGS, at_least_one, stop_after_first), s


@pytest.mark.parametrize("at_least_one", [False, True])
@pytest.mark.parametrize("stop_after_first", [False, True])
@FAST
@given(data=st.data())
def test_tags_with_separator_match_reference(at_least_one, stop_after_first, data):
    tags = [t for t in TAGS if t[1] is not None]
    spec = {"type": "tags_with_separator", "tags": [tag_json(*t) for t in tags], "separator": ", ",
            "at_least_one": at_least_one, "stop_after_first": stop_after_first}
    g = _cached_grammar(json.dumps(spec))
    s = "".join(data.draw(fragments(tags, [", ", ","])))
    assert accepts(g, s) == ref_separated(s, tags, ", ", at_least_one, stop_after_first), s


_GRAMMARS: dict[str, object] = {}


def _cached_grammar(spec: str):
    if spec not in _GRAMMARS:
        _GRAMMARS[spec] = structural_tag_to_grammar(spec)
    return _GRAMMARS[spec]


# ----------------------------------------------------------------------------------------------
# Leaf formats, nesting, JSON content, the legacy form
# ----------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}, "s": {"type": "string"}},
          "required": ["n"]}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda kids: st.lists(kids, max_size=2) | st.dictionaries(st.sampled_from(["n", "s", "t"]), kids, max_size=3),
    max_leaves=6,
)


def valid(schema, v) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(v)


@settings(max_examples=120, deadline=None)
@given(v=JSON_VALUES, spaced=st.booleans())
def test_json_schema_content_follows_jsonschema(v, spaced):
    spec = {"type": "tag", "begin": "<tool_call>", "end": "</tool_call>",
            "content": {"type": "json_schema", "json_schema": SCHEMA}}
    g = _cached_grammar(json.dumps(spec))
    doc = json.dumps(v, separators=(", ", ": ") if spaced else (",", ":"))
    # strict_mode (XGrammar's default): no properties beyond the declared ones.
    strict = dict(SCHEMA, additionalProperties=False)
    assert accepts(g, f"<tool_call>{doc}</tool_call>") == valid(strict, v)


def test_json_schema_options():
    loose = structural_tag_to_grammar({"type": "json_schema", "json_schema": SCHEMA, "strict_mode": False})
    assert accepts(loose, '{"n": 1, "t": 2}')
    compact = structural_tag_to_grammar({"type": "json_schema", "json_schema": SCHEMA, "any_whitespace": False})
    assert accepts(compact, '{"n":1}') and not accepts(compact, '{"n": 1}')
    for bad, where in (({"style": "qwen_xml"}, "style"), ({"indent": 2}, "indent")):
        with pytest.raises(GrammarError, match=where):
            structural_tag_to_grammar({"type": "json_schema", "json_schema": SCHEMA, **bad})


def test_leaf_formats_and_combinators():
    g = structural_tag_to_grammar({"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "A:"},
        {"type": "or", "elements": [{"type": "regex", "pattern": r"\d{2,3}"},
                                    {"type": "grammar", "grammar": 'root ::= "x" root | "y"'}]},
        {"type": "tag", "begin": "[", "content": {"type": "any_text", "excludes": ["!"]}, "end": ["]", ")"]},
    ]}})
    for s, ok in [("A:12[hi]", True), ("A:123[hi)", True), ("A:xxy[]", True), ("A:1[hi]", False),
                  ("A:12[h!i]", False), ("A:12[a]b]", False), ("A:xy[a)", True), ("A:12[a]", True)]:
        assert accepts(g, s) == ok, s


def test_any_text_ends_at_the_first_end_string_and_at_top_level_is_free():
    g = structural_tag_to_grammar({"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"})
    assert accepts(g, "<think>a < b </thin</think>")
    assert not accepts(g, "<think>a</think>b</think>")
    top = structural_tag_to_grammar({"type": "any_text"})
    assert accepts(top, "anything </think> at all")


def test_legacy_structures_form():
    legacy = {"structures": [{"begin": "<function=f>", "schema": SCHEMA, "end": "</function>"}],
              "triggers": ["<function="]}
    g = structural_tag_to_grammar(json.dumps(legacy))
    assert accepts(g, 'text <function=f>{"n": 3}</function> more')
    assert not accepts(g, 'text <function=f>{"s": "x"}</function>')
    assert not accepts(g, "text <function=g>{}</function>")


@pytest.mark.parametrize("spec, where", [
    ({"type": "structural_tag"}, "format"),
    ({"type": "nope"}, "format.type"),
    ({"type": "sequence", "elements": []}, "format.elements"),
    ({"type": "tag", "begin": "<a>", "end": "</a>"}, "content"),
    ({"type": "triggered_tags", "triggers": ["<a"], "tags": [
        {"type": "tag", "begin": "<b>", "content": {"type": "any_text"}, "end": "</b>"}]}, "format.tags[0].begin"),
    ({"type": "triggered_tags", "triggers": ["<a", "<ab"], "tags": [
        {"type": "tag", "begin": "<ab>", "content": {"type": "any_text"}, "end": "</b>"}]}, "exactly one trigger"),
    ({"type": "regex", "pattern": "(a"}, "format.pattern"),
    ({"type": "grammar", "grammar": "root ::= ("}, "format.grammar"),
    ({"type": "json_schema", "json_schema": {"type": "nonsense"}}, "format.json_schema"),
    ({"type": "any_text", "excludes": [""]}, "excludes"),
    ({"type": "tags_with_separator", "tags": [
        {"type": "tag", "begin": "a", "content": {"type": "any_text"}, "end": "b"}]}, "separator"),
])
def test_bad_specs_name_the_path(spec, where):
    with pytest.raises(GrammarError, match="structural tag") as e:
        structural_tag_to_grammar(spec)
    assert where in str(e.value)


def test_bad_json_text():
    with pytest.raises(GrammarError, match="not valid JSON"):
        structural_tag_to_grammar("{nope")
    with pytest.raises(GrammarError, match=r"structures\[0\].schema: not valid JSON"):
        structural_tag_to_grammar({"structures": [{"begin": "<f>", "schema": "{", "end": "</f>"}], "triggers": ["<f"]})


# ----------------------------------------------------------------------------------------------
# Special tokens through the compiler (real tokenizer)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mistral():
    return TokenizerInfo.from_file(tokenizer_dir("mistral"))


def test_compile_structural_tag_matches_special_tokens_by_id(mistral):
    tools_id = mistral.special_token_id("[TOOL_CALLS]")
    spec = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["[TOOL_CALLS]"], "tags": [
        {"type": "tag", "begin": "[TOOL_CALLS][", "content": {"type": "json_schema", "json_schema": SCHEMA},
         "end": "]"}], "stop_after_first": True}}
    cg = GrammarCompiler(mistral).compile_structural_tag(spec)
    assert cg.grammar.special_tokens == ["[TOOL_CALLS]"]
    m = GrammarMatcher(cg)
    # Free text may spell "[TOOL_CALLS]" as text only through ordinary tokens; the id starts the tag.
    assert m.accept_string("Sure. ")
    assert m.accept_token(tools_id)
    assert m.accept_string('[{"n": 1}]') and m.is_completed()
    m2 = GrammarMatcher(cg)
    assert m2.accept_string("[TOOL_CALLS][")  # as text it is just text: no tag started
    assert m2.accept_string('{"oops"') and m2.is_completed()


def test_token_format_names_a_special_token(mistral):
    spec = {"type": "tag", "begin": {"type": "token", "token": "[INST]"}, "content": {"type": "any_text"},
            "end": {"type": "token", "token": "[/INST]"}}
    cg = GrammarCompiler(mistral).compile_structural_tag(spec)
    m = GrammarMatcher(cg)
    assert not m.try_token(mistral.special_token_id("[/INST]"))
    assert m.accept_token(mistral.special_token_id("[INST]"))
    assert m.accept_string("hello [/INST] as text")
    assert m.accept_token(mistral.special_token_id("[/INST]")) and m.is_completed()
    with pytest.raises(GrammarError, match="not a special token"):
        GrammarCompiler(mistral).compile_structural_tag(dict(spec, begin={"type": "token", "token": "<nope>"}))


def test_structural_tag_symbols_reach_the_recognizer():
    g = structural_tag_to_grammar({"type": "const_string", "value": "<|x|>!"}, special_tokens=["<|x|>"])
    r = Recognizer(g)
    assert not r.accept_bytes(b"<|x|>")
    assert r.accept_symbol(256) and r.accept_bytes(b"!") and r.is_accepting()
