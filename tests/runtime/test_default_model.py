"""The packaged default model: it loads from the package, offline, and answers the example requests.

Oracles: ``jsonschema`` (Draft 2020-12, with format checks) for the example schemas, Python's own
parser for the arithmetic grammar example, the tool's parameters schema for tool calls.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import jsonschema
import pytest
import torch

from stencil.runtime.generate import default_model_path, generate, load_model

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
PROMPTS = {"person.json": "Give me a person as JSON.", "event.json": "Plan an event as JSON."}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_packaged_files_and_size():
    d = default_model_path()
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "recipe.json",
            "LICENSE.gpt2-tokenizer"} <= names
    assert sum(p.stat().st_size for p in d.iterdir()) <= 30 * 1024 * 1024
    recipe = json.loads((d / "recipe.json").read_text())
    assert recipe["corpus"]["examples"] > 0 and recipe["training"]["steps"] > 0
    model, tok = load_model(None)
    assert model.config.model_type == "gpt2" and not model.training
    assert model.get_output_embeddings().weight.shape[0] == len(tok)


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_example_schemas_give_valid_json(name):
    schema = json.loads((EXAMPLES / name).read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    messages = [{"role": "user", "content": PROMPTS[name]}]
    outs = generate(None, [messages] * 4, schema=schema, temperature=0.7, seed=0, max_new_tokens=160)
    greedy = generate(None, messages, schema=schema, temperature=0.0, max_new_tokens=160)
    for out in [*outs, greedy]:
        assert out.finish_reason == "stop", out.text
        assert out.value == json.loads(out.text)
        assert not list(validator.iter_errors(out.value)), out.text


def test_grammar_example_parses_as_python_arithmetic():
    grammar = (EXAMPLES / "arith.gbnf").read_text()
    messages = [{"role": "user", "content": "Write a sum of three numbers."}]
    outs = generate(None, [messages] * 3, grammar=grammar, temperature=1.0, seed=1, max_new_tokens=40)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        tree = ast.parse(out.text, mode="eval")
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
        assert all(isinstance(n, allowed) for n in ast.walk(tree)), out.text


def test_tool_call_with_the_default_model():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}]
    out = generate(None, [{"role": "user", "content": "Please get weather with city Paris."}], tools=tools,
                   tool_choice="required", temperature=0.0, max_new_tokens=80)
    assert out.finish_reason == "stop", out.text
    [call] = out.tool_calls
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), tools[0]["function"]["parameters"])
