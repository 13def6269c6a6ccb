"""An agent loop: the model calls Python functions through grammar-constrained tool calls until it answers.

    python examples/agent.py "What is 12.5 times 4, and how warm is it in Oslo?"
    python examples/agent.py --model path/to/Qwen2.5-0.5B-Instruct "..."      # any local chat model

Each round, ``stencil.generate`` decodes under the grammar of the tools (tool_choice "required" in
the first round, "auto" after, "none" in the last, so the loop always ends with an answer); every
call it returns parses and its arguments satisfy the function's JSON Schema, so the loop can call
the Python function without defensive parsing. The results go back as ``tool`` messages.

It runs offline on Stencil's packaged default model (a small CPU model: the calls are
well-formed, the reasoning is not to be trusted). See docs/tools.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import typing
import zlib
from collections.abc import Callable

import stencil as st

# -- the tools: plain Python functions ------------------------------------------------------------


def get_weather(city: str, unit: typing.Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """The current weather in a city."""
    rng = zlib.crc32(city.lower().encode())  # made-up but stable: no network in an example
    celsius = rng % 35 - 5
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "temperature": temperature, "unit": unit, "sky": ["clear", "cloudy", "rain"][rng % 3]}


def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


def convert_currency(amount: float, to: typing.Literal["EUR", "USD", "JPY"]) -> dict:
    """Convert an amount of US dollars into another currency."""
    rate = {"EUR": 0.92, "USD": 1.0, "JPY": 151.0}[to]
    return {"amount": round(amount * rate, 2), "currency": to}


FUNCTIONS: dict[str, Callable] = {f.__name__: f for f in (get_weather, multiply, convert_currency)}

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def tool_spec(fn: Callable) -> dict:
    """An OpenAI-style tool for a function, from its signature (str/int/float/bool/Literal) and docstring."""
    props, required = {}, []
    hints = typing.get_type_hints(fn)
    for name, p in inspect.signature(fn).parameters.items():
        hint = hints[name]
        if typing.get_origin(hint) is typing.Literal:
            props[name] = {"enum": list(typing.get_args(hint))}
        else:
            props[name] = {"type": _JSON_TYPES[hint]}
        if p.default is inspect.Parameter.empty:
            required.append(name)
    return {"type": "function", "function": {
        "name": fn.__name__, "description": inspect.getdoc(fn),
        "parameters": {"type": "object", "properties": props, "required": required, "additionalProperties": False}}}


TOOLS = [tool_spec(f) for f in FUNCTIONS.values()]


# -- the loop -------------------------------------------------------------------------------------


def call_tool(call: dict) -> str:
    """Run one OpenAI-shaped tool call; the result (or the error) as JSON text for the model."""
    fn = FUNCTIONS[call["function"]["name"]]
    try:
        return json.dumps(fn(**json.loads(call["function"]["arguments"])))
    except Exception as e:  # a tool failing is information for the model, not a crash of the agent
        return json.dumps({"error": f"{type(e).__name__}: {e}"})


def run_agent(question: str, model=None, max_rounds: int = 4, max_new_tokens: int = 160, seed: int = 0,
              log: Callable[[str], None] = print) -> str:
    """Ask, call tools until the model answers in text, and return that answer."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant. Use the tools when they help."},
        {"role": "user", "content": question},
    ]
    for round_ in range(max_rounds):
        choice = "required" if round_ == 0 else ("none" if round_ == max_rounds - 1 else "auto")
        out = st.generate(model, messages, tools=TOOLS, tool_choice=choice, max_new_tokens=max_new_tokens,
                          seed=seed + round_)
        if out.finish_reason != "stop" or not out.tool_calls:
            return out.text
        # The assistant turn exactly as generated (free text and calls), then one result per call.
        messages.append({"role": "assistant", "content": out.raw_text})
        for call in out.tool_calls:
            result = call_tool(call)
            log(f"[round {round_}] {call['function']['name']}({call['function']['arguments']}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                             "content": result})
    return out.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is 12.5 times 4, and how warm is it in Oslo?")
    parser.add_argument("--model", default=None, help="a local chat model (default: Stencil's packaged model)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    answer = run_agent(args.question, model=args.model, max_rounds=args.rounds, seed=args.seed)
    print(f"answer: {answer}")


if __name__ == "__main__":
    main()
