"""Tool calling: grammars for the three formats, parsing, and generation with random-weight models.

Two kinds of evidence:

* Language oracles: hypothesis builds answers (free text, calls with arguments that do or do not
  satisfy the tool's schema, separators, openers inside text) and the grammar must accept exactly
  those that the format's rules and ``jsonschema`` accept.
* Generation: a tiny random-weight Llama/Qwen2 model with a real tokenizer, decoded under the
  grammar by exact constrained sampling (AWRS over the tokens whose first byte the grammar allows),
  over 100 runs per format: every answer parses, every call's arguments validate against its
  tool's schema, ``required`` always calls, a named tool fixes the name, ``none`` never calls,
  parallel calls parse in order, and the free text is exactly what was generated before the calls.
  The driver biases the model a little (stop more likely as the answer grows; in ``auto`` runs,
  sometimes the call opener) so that answers end and both branches of ``auto`` occur.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.matcher import GrammarMatcher
from stencil.decode.parser import grammar_accepts
from stencil.errors import GrammarError, SchemaError
from stencil.grammar.compiler import GrammarCompiler, bind
from stencil.grammar.vocab import TokenizerInfo
from stencil.integrations.tools import (
    ToolCallParseError,
    build_tool_grammar,
    detect_tool_format,
    parse_tool_calls,
)
from tests.conftest import tokenizer_dir, tokenizer_meta

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["c", "f"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                        "b": {"type": "integer", "minimum": -99, "maximum": 99}},
       "required": ["a", "b"]}
TAGS = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8},
                                         "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
        "required": ["q"]}
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "search": TAGS, "ping": {"type": "object", "properties": {}, "additionalProperties": False}}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"the {n} tool", "parameters": s}}
         for n, s in SCHEMAS.items()]
OPENER = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
NAMED = {"type": "function", "function": {"name": "add"}}


def strict(schema):
    return dict(schema, additionalProperties=False)


def validates(name, args) -> bool:
    """Valid arguments for the tool, members in the order the schema declares them (the JSON Schema
    frontend's order without ``any_order``, docs/json_schema.md)."""
    if name not in SCHEMAS:
        return False
    declared = list(SCHEMAS[name].get("properties", {}))
    in_order = list(args) == [k for k in declared if k in args]
    return in_order and jsonschema.Draft202012Validator(strict(SCHEMAS[name])).is_valid(args)


@lru_cache(maxsize=None)
def grammar(fmt, choice, parallel):
    return build_tool_grammar(TOOLS, json.loads(choice), parallel, format=fmt)


# ----------------------------------------------------------------------------------------------
# Language oracles
# ----------------------------------------------------------------------------------------------

ARG_VALUES = st.one_of(st.integers(-120, 120), st.text(alphabet="ab é\"\\", max_size=14), st.sampled_from(["c", "f", "x", "y"]),
                       st.lists(st.sampled_from(["x", "y", "z"]), max_size=3), st.none())
CALLS = st.tuples(st.sampled_from(sorted(SCHEMAS) + ["nope"]),
                  st.dictionaries(st.sampled_from(["city", "unit", "days", "a", "b", "q", "tags", "zz"]), ARG_VALUES, max_size=3))
FREE = st.one_of(st.text(alphabet="ab {}<>_tolcaé\n", max_size=12),
                 st.sampled_from(["", "Sure!", "<tool_call", " {x", "{", "[TOOL_CALLS", "<tool_call>", "a[TOOL_CALLS]"]))


def render(fmt, free, calls, sep_ws):
    """The answer text a model would write, and whether each call is well-formed for the tools."""
    key = "parameters" if fmt == "llama3_json" else "arguments"
    objs = [json.dumps({"name": n, key: a}) for n, a in calls]
    if fmt == "hermes":
        body = sep_ws.join(f"<tool_call>\n{o}\n</tool_call>" for o in objs)
    elif fmt == "llama3_json":
        body = "; ".join(objs)
    else:
        body = "[TOOL_CALLS][" + ", ".join(objs) + "]" if objs else ""
    return free + body


def is_llama_call(free, calls) -> bool:
    """Llama-3.1 answers are calls exactly when they start (after whitespace) with '{'."""
    return render("llama3_json", free, calls, "").lstrip(" \t\r\n").startswith("{")


def expected(fmt, choice, parallel, free, calls) -> bool:
    """The format's rules, stated directly."""
    mode = choice if isinstance(choice, str) else "named"
    ok_calls = all(validates(n, a) for n, a in calls) and (parallel or len(calls) <= 1)
    if mode == "named":
        ok_calls = ok_calls and all(n == "add" for n, _ in calls)
    if fmt == "llama3_json":
        if not is_llama_call(free, calls):
            return mode in ("auto", "none")  # the whole answer is free text
        # The answer is the calls, after at most the envelope's whitespace.
        ws = re.fullmatch(r"[ \t]{0,16}(\r?\n[ \t]{0,16})?", free) is not None
        return bool(calls) and mode != "none" and ok_calls and ws
    free_ok = OPENER[fmt] not in free
    if not calls:
        return mode in ("auto", "none") and free_ok
    return mode != "none" and ok_calls and free_ok and (mode == "auto" or free == "")


CHOICES = ["auto", "required", "none", NAMED]


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
@pytest.mark.parametrize("parallel", [True, False])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_grammar_language_matches_format_rules(fmt, parallel, data):
    choice = data.draw(st.sampled_from(CHOICES))
    free = data.draw(FREE)
    calls = data.draw(st.lists(CALLS, max_size=3))
    if data.draw(st.booleans()):  # mostly well-formed calls, so that acceptance is common
        calls = [(n, {k: v for k, v in a.items() if k in SCHEMAS.get(n, {}).get("properties", {})}) for n, a in calls]
    text = render(fmt, free, calls, data.draw(st.sampled_from(["\n", "", " \n "])))
    g = grammar(fmt, json.dumps(choice), parallel)
    data_bytes = text.encode()
    if fmt == "mistral" and "[TOOL_CALLS]" in text:
        # The opener is a special token: the grammar names it as a symbol, never as text.
        from stencil.decode.parser import Recognizer

        head, _, tail = text.partition("[TOOL_CALLS]")
        got = False
        if "[TOOL_CALLS]" in g.special_tokens:
            r = Recognizer(g)
            sym = 256 + g.special_tokens.index("[TOOL_CALLS]")
            got = (r.accept_bytes(head.encode()) and r.accept_symbol(sym) and r.accept_bytes(tail.encode())
                   and r.is_accepting())
        assert not grammar_accepts(g, data_bytes)  # spelled as text it is neither a call nor free text
    else:
        got = grammar_accepts(g, data_bytes)
    assert got == expected(fmt, choice, parallel, free, calls), text
    if got:
        free_text, parsed = parse_tool_calls(text, fmt)
        if fmt == "llama3_json" and not is_llama_call(free, calls):
            free, calls = text, []
        assert [c["function"]["name"] for c in parsed] == [n for n, _ in calls]
        assert [json.loads(c["function"]["arguments"]) for c in parsed] == [a for _, a in calls]
        assert free_text == ("" if calls and fmt == "llama3_json" else free)


def test_parse_rejects_misshaped_calls():
    with pytest.raises(ToolCallParseError, match="JSON"):
        parse_tool_calls('<tool_call>\n{"name": "a", </tool_call>', "hermes")
    with pytest.raises(ToolCallParseError, match="</tool_call>"):
        parse_tool_calls('<tool_call>{"name": "a", "arguments": {}} x', "hermes")
    with pytest.raises(ToolCallParseError, match='"name" and "parameters"'):
        parse_tool_calls('{"name": "a", "arguments": {}}', "llama3_json")
    with pytest.raises(ToolCallParseError, match="after the calls"):
        parse_tool_calls('[TOOL_CALLS][{"name": "a", "arguments": {}}] hi', "mistral")
    free, calls = parse_tool_calls('Hi.<tool_call>{"name": "a", "arguments": {"x": "é"}}</tool_call>', "qwen")
    assert free == "Hi." and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": "é"}
    assert len({c["id"] for c in parse_tool_calls('{"name": "a", "parameters": {}}; {"name": "a", "parameters": {}}',
                                                  "llama3")[1]}) == 2


@pytest.mark.parametrize("tools, choice, err, match", [
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", GrammarError, "function name"),
    ([{"type": "code_interpreter"}], "auto", GrammarError, "tools\\[0\\]"),
    (TOOLS + TOOLS[:1], "auto", GrammarError, "defined twice"),
    (TOOLS, "sometimes", GrammarError, "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, GrammarError, "not among the tools"),
    ([], "required", GrammarError, "at least one tool"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "auto", SchemaError, "type"),
])
def test_bad_tools_raise_typed_errors(tools, choice, err, match):
    with pytest.raises(err, match=match):
        build_tool_grammar(tools, choice, format="hermes")


def test_unknown_format_and_no_tokenizer():
    with pytest.raises(GrammarError, match="unknown tool-call format"):
        build_tool_grammar(TOOLS, format="xml")
    with pytest.raises(GrammarError, match="format="):
        build_tool_grammar(TOOLS)


def test_detect_format_from_real_tokenizers():
    assert detect_tool_format(tokenizer_dir("qwen2")) == "hermes"  # chat template
    assert detect_tool_format(TokenizerInfo.from_file(tokenizer_dir("qwen2"))) == "hermes"  # whole <tool_call> token
    assert detect_tool_format(tokenizer_dir("mistral")) == "mistral"  # [TOOL_CALLS] special token
    assert detect_tool_format(tokenizer_dir("llama3")) == "llama3_json"  # <|python_tag|>
    with pytest.raises(GrammarError, match="format="):
        detect_tool_format(tokenizer_dir("gpt2"))


def test_mistral_grammar_needs_the_special_token():
    gpt2 = TokenizerInfo.from_file(tokenizer_dir("gpt2"))
    with pytest.raises(GrammarError, match="TOOL_CALLS"):
        GrammarCompiler(gpt2).compile_tools(TOOLS, format="mistral")


# ----------------------------------------------------------------------------------------------
# Generation with random-weight models and real tokenizers
# ----------------------------------------------------------------------------------------------

# format -> (tokenizer, model family)
SETUPS = {"hermes": ("qwen2", "qwen2"), "llama3_json": ("gpt2", "llama"), "mistral": ("mistral", "llama")}


@lru_cache(maxsize=None)
def setup(fmt):
    name, family = SETUPS[fmt]
    meta = tokenizer_meta(name)
    info = TokenizerInfo.from_file(tokenizer_dir(name), vocab_size=meta["model_vocab_size"])
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(vocab_size=info.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    model = model_cls(cfg).eval()
    return info, model, Driver(info)


class Driver:
    """Exact constrained sampling: the first token the grammar accepts in a Gumbel-perturbed order.

    Keys ``logit + Gumbel noise`` sorted from the top are a draw of the vocabulary without
    replacement from the model's distribution, so the first accepted token is an exact sample of
    the constrained distribution. The walk checks the top few keys one by one and, if the grammar
    rejects them all, takes the best key among the tokens of the matcher's mask.
    """

    def __init__(self, info: TokenizerInfo):
        self.info = info
        v = info.vocab_size
        self.stops = frozenset(info.stop_token_ids)
        self.bitmask = np.zeros((1, (v + 31) // 32), np.int32)
        # A model that writes compact JSON: whitespace-heavy tokens are less likely (never excluded).
        self.whitespace = np.array([sum(map(info.decoded_vocab[t].count, (b" ", b"\t", b"\n", b"\r")))
                                    for t in range(v)], np.float64)
        # In mistral's call list: "]" ends it, "}," (and "}},", ...) goes on to another call.
        self.closing = np.array([info.decoded_vocab[t][:1] == b"]" for t in range(v)])
        self.continuing = np.array([info.decoded_vocab[t][:1] == b"}" and b"," in info.decoded_vocab[t]
                                    for t in range(v)])

    def check(self, m: GrammarMatcher, t: int) -> bool:
        return m.is_completed() if t in self.stops else m.try_token(t)

    def sample(self, m: GrammarMatcher, keys: np.ndarray) -> int:
        top = np.argpartition(-keys, 8)[:8]
        for t in top[np.argsort(-keys[top], kind="stable")]:
            if np.isfinite(keys[t]) and self.check(m, int(t)):
                return int(t)
        m.fill_next_token_bitmask(self.bitmask, 0)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: keys.shape[0]].astype(bool)
        assert allowed.any(), "the grammar allows no token"
        return int(np.argmax(np.where(allowed, keys, -np.inf)))


def generate(fmt, choice, parallel, seeds, max_new_tokens=300):
    """One batch of runs (one per seed) of the random model under the tool grammar: [(text, ended)]."""
    info, model, driver = setup(fmt)
    cg = _compiled(fmt, json.dumps(choice), parallel)
    named = np.flatnonzero(cg.special_symbol_of_token >= 0)
    n, v = len(seeds), info.vocab_size
    rngs = [np.random.default_rng(s) for s in seeds]
    matchers = [GrammarMatcher(cg) for _ in seeds]
    bias = (-3.0 * np.minimum(driver.whitespace, 4)).astype(np.float32)
    bias[info.tokenizer_size:] = -np.inf  # padding ids
    openers = opener_ids(fmt, info, named)
    eager = [choice == "auto" and rng.random() < 0.5 for rng in rngs]
    # Stop grows likelier as the answer grows, and so does "]" in mistral's call list, so answers end.
    stops = np.array(info.stop_token_ids)
    closing = np.flatnonzero(driver.closing) if fmt == "mistral" else np.zeros(0, np.int64)
    continuing = np.flatnonzero(driver.continuing) if fmt == "mistral" else np.zeros(0, np.int64)
    list_since: list[int | None] = [None] * n
    patience = [int(rng.integers(0, 60)) for rng in rngs]
    ids = torch.full((n, 1), int(info.tokens_with_prefix(b"Hi")[0]))
    past, outs, done = None, [[] for _ in seeds], [False] * n
    with torch.no_grad():
        for step in range(max_new_tokens):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1].float().numpy()
            nxt = ids[:, 0].clone()
            for i in range(n):
                if done[i]:
                    continue
                u = rngs[i].random(v, dtype=np.float32)
                keys = logits[i] * 20.0 + bias - np.log(-np.log(u + np.float32(1e-30)))
                keys[stops] += 0.8 * step
                if eager[i]:
                    keys[openers] += 14.0
                if list_since[i] is not None:
                    push = 0.5 * max(0, step - list_since[i] - patience[i])
                    keys[closing] += push
                    keys[continuing] -= push
                t = driver.sample(matchers[i], keys)
                assert matchers[i].accept_token(t)
                if matchers[i].is_terminated():
                    done[i] = True
                    continue
                if fmt == "mistral" and t in named:
                    list_since[i] = step
                outs[i].append(t)
                nxt[i] = t
            if all(done):
                break
            ids = nxt[:, None]
    return [(decode(info, cg, o), d) for o, d in zip(outs, done)]


def opener_ids(fmt, info, named) -> np.ndarray:
    """The token(s) that start a call in each format, for the driver's bias."""
    if fmt == "mistral":
        return named
    prefix = b"<tool_call>" if fmt == "hermes" else b"{"
    ids = info.tokens_with_prefix(prefix)
    return ids[[info.decoded_vocab[t] == prefix for t in ids]]


@lru_cache(maxsize=None)
def _compiled(fmt, choice, parallel):
    info, _, _ = setup(fmt)
    return bind(grammar(fmt, choice, parallel), info)


def decode(info, cg, ids) -> str:
    """Token bytes, with special tokens the grammar names spelled out (skip_special_tokens=False)."""
    names = {v: k for k, v in info.special_token_names.items()}
    return b"".join(names[t].encode() if cg.special_symbol_of_token[t] >= 0 else info.decoded_vocab[t]
                    for t in ids).decode("utf-8")


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread (and do not fight the other tests for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RUNS = [("auto", True, 40), ("auto", False, 15), ("required", True, 20), ("required", False, 10),
        (NAMED, True, 10), ("none", True, 10)]  # 105 runs per format


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_generated_tool_calls_always_parse_and_validate(fmt, one_torch_thread):
    stats = {"calls": 0, "with_calls": 0, "free_only": 0, "multi": 0}
    seed = 0
    for choice, parallel, n in RUNS:
        seeds = list(range(seed, seed + n))
        seed += n
        for text, finished in generate(fmt, choice, parallel, seeds):
            assert finished, f"a run did not end: {text!r}"
            free, calls = parse_tool_calls(text, fmt)
            names = [c["function"]["name"] for c in calls]
            for c in calls:
                assert c["type"] == "function" and c["id"].startswith("call_")
                args = json.loads(c["function"]["arguments"])
                assert jsonschema.Draft202012Validator(SCHEMAS[c["function"]["name"]]).is_valid(args), text
            # The names appear in the text in the order parse_tool_calls returns them.
            assert names == re.findall(r'"name"\s*:\s*"([^"]*)"', text[len(free):]), text
            # The free text is the untouched beginning of the answer; the rest is calls only.
            assert text.startswith(free)
            if fmt in OPENER:
                assert OPENER[fmt] not in free
                assert not calls or text[len(free):].startswith(OPENER[fmt])
            else:
                assert not calls or free == "" and text.lstrip().startswith("{")
                assert calls or not text.lstrip().startswith("{")
            if choice == "none":
                assert not calls and free == text
            if choice in ("required",) or isinstance(choice, dict):
                assert calls and (fmt == "llama3_json" or free == "")
            if isinstance(choice, dict):
                assert set(names) == {"add"}
            if not parallel:
                assert len(calls) <= 1
            stats["calls"] += len(calls)
            stats["with_calls" if calls else "free_only"] += 1
            stats["multi"] += len(calls) > 1
    # Both branches of auto, and parallel calls, actually happened.
    assert stats["with_calls"] >= 40 and stats["free_only"] >= 15 and stats["multi"] >= 5, stats


def test_arguments_follow_the_declared_member_order():
    """Arguments are read through the JSON Schema frontend, in declaration order (hypothesis found the
    oracle above accepting {"b": 0, "a": 0} before it checked the order)."""
    g = grammar("hermes", json.dumps("auto"), True)
    ok = render("hermes", "", [("add", {"a": 0, "b": 0})], "\n")
    swapped = render("hermes", "", [("add", {"b": 0, "a": 0})], "\n")
    assert grammar_accepts(g, ok.encode()) and not grammar_accepts(g, swapped.encode())
    assert validates("add", {"a": 0, "b": 0}) and not validates("add", {"b": 0, "a": 0})
