"""stencil.generate and the decode engine, on tiny random-weight Llama, Qwen2 and GPT-2 models.

Oracles: ``jsonschema`` (Draft 2020-12) for schema outputs, Python's ``re`` for regex outputs, Lark's
Earley parser for CFG outputs, ``model.generate`` for unconstrained greedy decoding, one-by-one runs
for batched runs, the non-streamed text for streams, the unstopped run for stop strings, dense
attention for TokenSelect with a budget covering the context.

About completion: a random model does not know JSON. With the fixed structural ``logit_bias`` of
``tiny_models`` most greedy generations finish within the token budget; the tests assert that every
*completed* output is valid, that most generations complete, and that every incomplete one
(``finish_reason == "length"``) is still a prefix the grammar accepts.
"""

from __future__ import annotations

import functools
import json
import re
import warnings

import jsonschema
import pytest
import torch

from stencil.decode.matcher import GrammarMatcher
from stencil.errors import SchemaError, StencilError
from stencil.grammar.compiler import bind
from stencil.grammar.ir import Grammar
from stencil.grammar.json_schema import json_schema_to_grammar
from stencil.runtime.generate import generate, get_engine
from tests.conftest import jsonschemabench_records
from tests.runtime.tiny_models import ARCHS, structural_bias, tiny_model

STRICT = {"strict": True, "whitespace": "compact"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI box is small and shared: one intra-op thread avoids oversubscription stalls.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _dev_schemas(n: int) -> list[tuple[dict, Grammar]]:
    """The first ``n`` small dev-set schemas (in file order) that compile exactly (strict, compact)."""
    out = []
    for split in ("Glaiveai2K", "Github_trivial", "Synthesized", "Github_easy"):
        for rec in jsonschemabench_records(split):
            schema = rec["schema"]
            if len(json.dumps(schema)) > 500:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    grammar = json_schema_to_grammar(schema, **STRICT)
            except (SchemaError, Warning):
                continue
            out.append((schema, grammar))
            if len(out) == n:
                return out
    return out


def _validator(schema):
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _is_prefix(cg, text: str) -> bool:
    return GrammarMatcher(cg).accept_string(text)


SPLIT = {"gpt2": (0, 110), "llama": (110, 160), "qwen2": (160, 200)}
# Qwen2's tokenizer spells every digit as its own token, so dates and times take about twice as many.
BUDGET = {"gpt2": 48, "llama": 48, "qwen2": 96}


@pytest.mark.parametrize("arch", ARCHS)
def test_dev_schemas_generate_valid_json(arch):
    """200 generations over dev-set schemas (110 GPT-2, 50 Llama, 40 Qwen2): all completed ones validate."""
    schemas = _dev_schemas(200)
    assert len(schemas) == 200
    lo, hi = SPLIT[arch]
    model, tok = tiny_model(arch)
    info = get_engine(model, tok).tokenizer_info
    mine = [(schema, bind(grammar, info)) for schema, grammar in schemas[lo:hi]]
    # GPT-2 and Llama decode greedily with masks; Qwen2 samples (check-first), seeded.
    kwargs = dict(temperature=0.0, sampler="mask") if arch != "qwen2" else dict(temperature=0.7, seed=7)
    outs = []
    for start in range(0, len(mine), 25):
        chunk = [cg for _, cg in mine[start:start + 25]]
        outs += generate(model, ["Return JSON:"] * len(chunk), tokenizer=tok, grammar=chunk, max_new_tokens=BUDGET[arch],
                         logit_bias=structural_bias(arch), **kwargs)
    completed = 0
    for (schema, cg), out in zip(mine, outs):
        if out.finish_reason == "stop":
            completed += 1
            errors = list(_validator(schema).iter_errors(json.loads(out.text)))
            assert not errors, (schema, out.text, errors[0].message)
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == BUDGET[arch]
            assert _is_prefix(cg, out.text), (schema, out.text)
    assert completed >= 0.8 * len(mine), f"only {completed}/{len(mine)} generations completed"


REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)", r"-?[1-9][0-9]{0,3}\.[0-9]{2}"]


@pytest.mark.parametrize("arch", ARCHS)
def test_regex_outputs_match(arch):
    model, tok = tiny_model(arch)
    prompts = ["a", "Give me one:", "xyz 123"]
    for pattern in REGEXES:
        outs = generate(model, prompts, tokenizer=tok, regex=pattern, temperature=0.0, max_new_tokens=24)
        for out in outs:
            assert out.finish_reason == "stop", (pattern, out.text)  # every branch is bounded
            assert re.fullmatch(pattern, out.text), (pattern, out.text)


ARITH_GBNF = r'''
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor ("*" factor)*
factor ::= [0-9] | "(" expr ")"
'''
ARITH_LARK = r'''
start: expr
expr: term (("+" | "-") term)*
term: factor ("*" factor)*
factor: /[0-9]/ | "(" expr ")"
'''


def test_cfg_outputs_parse_with_lark():
    from lark import Lark

    lark = Lark(ARITH_LARK, parser="earley")
    model, tok = tiny_model("gpt2")
    engine = get_engine(model, tok)
    prompts = [f"Expression {i}:" for i in range(12)]
    outs = generate(model, prompts, tokenizer=tok, grammar=ARITH_GBNF, temperature=1.0, seed=3, max_new_tokens=16)
    completed = [o for o in outs if o.finish_reason == "stop"]
    assert len(completed) >= 3
    for out in outs:
        if out.finish_reason == "stop":
            lark.parse(out.text)  # raises if the text is not in the language
        else:
            assert _is_prefix(engine.compiler.compile_grammar(ARITH_GBNF), out.text)


@pytest.mark.parametrize("arch", ARCHS)
def test_unconstrained_greedy_equals_transformers(arch):
    model, tok = tiny_model(arch)
    prompt = "The weather today is"
    ours = generate(model, prompt, tokenizer=tok, temperature=0.0, max_new_tokens=12)
    enc = tok(prompt, return_tensors="pt")
    ref = model.generate(**enc, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert ours.token_ids == ref[0, enc.input_ids.shape[1]:].tolist()
    assert ours.finish_reason == "length"


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_one_by_one(arch):
    model, tok = tiny_model(arch)
    bias = structural_bias(arch)
    prompts = ["Hi", "A much longer prompt that needs left padding in a batch:", "Numbers:", "Yes or no?"]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
              "required": ["a", "b"]}
    kw = dict(schema=[schema, None, None, None], regex=[None, r"[0-9]{2,5}", None, None],
              choices=[None, None, None, ["yes", "no"]])
    for sampler in ("mask", "awrs"):
        batch = generate(model, prompts, tokenizer=tok, temperature=0.0, max_new_tokens=20, logit_bias=bias,
                         sampler=sampler, compile_options=STRICT, **kw)
        for i, p in enumerate(prompts):
            one = generate(model, p, tokenizer=tok, temperature=0.0, max_new_tokens=20, logit_bias=bias,
                           sampler=sampler, compile_options=STRICT, **{k: v[i] for k, v in kw.items()})
            assert batch[i].token_ids == one.token_ids, (sampler, p)
            assert batch[i].text == one.text and batch[i].finish_reason == one.finish_reason
    assert batch[3].text in ("yes", "no") and batch[3].finish_reason == "stop"


def test_mask_and_check_first_agree_on_greedy():
    model, tok = tiny_model("llama")
    schema = {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "boolean"}}},
              "required": ["x"]}
    a = generate(model, "go", tokenizer=tok, schema=schema, temperature=0.0, sampler="mask", max_new_tokens=30,
                 logit_bias=structural_bias("llama"))
    b = generate(model, "go", tokenizer=tok, schema=schema, temperature=0.0, sampler="awrs", max_new_tokens=30,
                 logit_bias=structural_bias("llama"))
    assert a.token_ids == b.token_ids
    assert b.stats.checks >= len(b.token_ids) - b.stats.forced_tokens


def test_streaming_yields_the_same_text():
    model, tok = tiny_model("qwen2")
    kw = dict(tokenizer=tok, temperature=0.8, seed=11, max_new_tokens=25)
    full = generate(model, "Once upon a time", **kw)
    stream = generate(model, "Once upon a time", stream=True, **kw)
    pieces = list(stream)
    assert "".join(pieces) == full.text
    assert stream.result.text == full.text and stream.result.token_ids == full.token_ids
    prompts = ["one", "two two two"]
    full = generate(model, prompts, regex=[r"[a-z ]{1,30}", None], stop=["e"], **kw)
    got = {0: "", 1: ""}
    for i, piece in generate(model, prompts, regex=[r"[a-z ]{1,30}", None], stop=["e"], stream=True, **kw):
        got[i] += piece
    assert got == {0: full[0].text, 1: full[1].text}


def test_pydantic_value_is_typed():
    from pydantic import BaseModel

    class Item(BaseModel):
        name: str
        count: int
        tags: list[str]

    model, tok = tiny_model("gpt2")
    out = generate(model, "Item:", tokenizer=tok, schema=Item, temperature=0.0, max_new_tokens=40,
                   logit_bias=structural_bias("gpt2"), compile_options=STRICT)
    assert out.finish_reason == "stop", out.text
    assert isinstance(out.value, Item)
    assert out.value == Item.model_validate_json(out.text)
    assert isinstance(out.value.count, int) and isinstance(out.value.tags, list)


def test_stop_strings_and_max_new_tokens():
    model, tok = tiny_model("gpt2")
    kw = dict(tokenizer=tok, temperature=0.0)
    long = generate(model, "Tell me a story:", max_new_tokens=30, **kw)
    assert long.finish_reason == "length" and len(long.token_ids) == 30
    short = generate(model, "Tell me a story:", max_new_tokens=7, **kw)
    assert short.finish_reason == "length" and short.token_ids == long.token_ids[:7]
    # A stop string taken from the middle of the unstopped text: the text is cut right before it.
    stop = long.text[len(long.text) // 2:][:3]
    cut = long.text.find(stop)
    stopped = generate(model, "Tell me a story:", max_new_tokens=30, stop=[stop, "\x00never"], **kw)
    assert stopped.finish_reason == "stop_string"
    assert stopped.text == long.text[:cut]
    assert stopped.token_ids == long.token_ids[:len(stopped.token_ids)]
    done = generate(model, "Pick:", choices=["alpha", "beta"], max_new_tokens=30, **kw)
    assert done.finish_reason == "stop" and done.text in ("alpha", "beta")


def test_chat_messages_use_the_chat_template():
    model, tok = tiny_model("qwen2")
    messages = [{"role": "user", "content": "Say yes or no."}]
    out = generate(model, messages, tokenizer=tok, choices=["yes", "no"], temperature=0.0)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert out.stats.prompt_tokens == len(ids)
    same = generate(model, text, tokenizer=tok, choices=["yes", "no"], temperature=0.0)
    assert (out.text, out.token_ids) == (same.text, same.token_ids)


def test_smc_returns_a_posterior_over_the_language():
    model, tok = tiny_model("gpt2")
    out = generate(model, "Answer:", tokenizer=tok, choices=["yes", "no", "maybe so"], sampler="smc",
                   particles=6, seed=5, max_new_tokens=8)
    assert out.posterior and abs(sum(g.weight for g in out.posterior) - 1.0) < 1e-9
    assert out is out.posterior[0] and all(g.weight <= out.weight for g in out.posterior)
    assert all(g.text in ("yes", "no", "maybe so") and g.finish_reason == "stop" for g in out.posterior)


def test_long_context_with_full_budget_equals_dense():
    from stencil.runtime.tokenselect import TokenSelectConfig

    model, tok = tiny_model("llama")
    prompt = "word " * 40
    dense = generate(model, prompt, tokenizer=tok, temperature=0.0, max_new_tokens=8)
    sparse = generate(model, prompt, tokenizer=tok, temperature=0.0, max_new_tokens=8,
                      long_context=TokenSelectConfig(top_k=4096))
    assert sparse.token_ids == dense.token_ids
    assert model.config._attn_implementation != "stencil_tokenselect"  # restored after the call


def test_bad_requests_raise_typed_errors():
    model, tok = tiny_model("gpt2")
    with pytest.raises(StencilError, match="at most one constraint"):
        generate(model, "x", tokenizer=tok, regex="a", choices=["b"])
    with pytest.raises(StencilError, match="unknown sampler"):
        generate(model, "x", tokenizer=tok, sampler="beam")
    with pytest.raises(StencilError, match="top_k"):
        generate(model, "x", tokenizer=tok, regex="a", sampler="awrs", top_k=5)
    with pytest.raises(StencilError, match="prompts"):
        generate(model, ["x", "y"], tokenizer=tok, regex=["a"])
    with pytest.raises(StencilError, match="max_new_tokens"):
        generate(model, "x", tokenizer=tok, max_new_tokens=0)
    with pytest.raises(StencilError, match="never downloads"):
        generate("/nonexistent/model/dir", "x")
    with pytest.raises(StencilError, match="name_or_path"):
        generate(model, "x")


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}},
]


@pytest.mark.parametrize("arch,fmt", [("qwen2", None), ("llama", "llama3_json"), ("gpt2", "hermes")])
def test_tool_calls_are_parsed_and_follow_their_schema(arch, fmt):
    model, tok = tiny_model(arch)
    out = generate(model, [{"role": "user", "content": "Weather in Paris?"}] if fmt is None else "Weather?",
                   tokenizer=tok, tools=TOOLS, tool_format=fmt, tool_choice="required", parallel_tool_calls=False,
                   temperature=0.0, max_new_tokens=60, logit_bias=structural_bias(arch),
                   compile_options={"whitespace": "compact", "max_whitespace": 0})
    assert out.finish_reason == "stop", out.raw_text
    [call] = out.tool_calls
    # text is the free text outside the call; raw_text is everything generated, call included.
    assert out.text.strip() == "" and call["function"]["name"] in out.raw_text and out.text in out.raw_text
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    name = call["function"]["name"]
    assert name in params and call["type"] == "function"
    jsonschema.validate(json.loads(call["function"]["arguments"]), params[name])
