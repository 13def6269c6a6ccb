"""Tool calling: OpenAI-style tools -> a grammar for the model's tool-call format, and back.

:func:`build_tool_grammar` turns ``tools`` (``[{"type": "function", "function": {"name",
"description", "parameters"}}]``), ``tool_choice`` and ``parallel_tool_calls`` into a grammar of
everything the model may answer; :func:`parse_tool_calls` splits an answer into its free text and
OpenAI-shaped ``tool_calls``.

Formats (``format=``, or detected from the tokenizer by :func:`detect_tool_format`):

``"hermes"`` (Qwen2/2.5/3, Hermes, and every chat template that uses ``<tool_call>``)::

    free text<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": ..., "arguments": ...}
    </tool_call>

``"llama3_json"`` (Llama-3.1/3.2/3.3 JSON tool calling): the whole answer is either free text or
calls ``{"name": "get_weather", "parameters": {...}}``, several separated by ``;``.

``"mistral"``: free text, then the special token ``[TOOL_CALLS]`` (matched by id, never by its
spelling) and a JSON list ``[{"name": ..., "arguments": {...}}, ...]``.

``tool_choice``:

* ``"auto"``: free text, then optionally calls. Only the calls are constrained: the free text is any
  text that cannot start a call by accident. It never contains the opener (``<tool_call>``; for
  mistral the opener is the special token, and the text also never spells ``[TOOL_CALLS]``, so
  decoded output stays unambiguous; for llama3_json it does not begin with ``{``), so the first
  opener is where the calls start, and after the calls only whitespace may follow.
* ``"required"``: one or more calls and nothing else.
* ``{"type": "function", "function": {"name": "f"}}``: like required, every call to ``f``.
* ``"none"``: free text only (which, as in auto, contains no opener).

``parallel_tool_calls=False`` allows at most one call. Each call's arguments follow the tool's
``parameters`` JSON Schema exactly (through the JSON Schema frontend, ``strict`` by default:
objects that declare properties accept no others unless the schema says so, members in declaration
order; a tool without ``parameters`` takes any JSON object). Names are written as given (``"name": "f"``), keys in the
format's order, with flexible whitespace between JSON tokens.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from stencil.errors import GrammarError, StencilError
from stencil.grammar.ir import (
    ByteClass,
    CharClass,
    Expr,
    Grammar,
    GrammarBuilder,
    Ref,
    Repeat,
    Special,
    alt,
    lit,
    opt,
    seq,
    star,
)
from stencil.grammar.structural_tag import ANY_CHAR, embed_grammar, text_avoiding

__all__ = [
    "TOOL_FORMATS",
    "ToolCallParseError",
    "build_tool_grammar",
    "parse_tool_calls",
    "detect_tool_format",
    "normalize_tools",
]

TOOL_FORMATS = ("hermes", "llama3_json", "mistral")
_ALIASES = {"qwen": "hermes", "qwen2": "hermes", "qwen2.5": "hermes", "qwen3": "hermes", "llama3": "llama3_json",
            "llama": "llama3_json", "llama3.1": "llama3_json"}
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_MISTRAL_OPEN = "[TOOL_CALLS]"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ToolCallParseError(StencilError, ValueError):
    """Model output that does not have the tool-call format's shape; ``position`` is a character offset."""

    def __init__(self, message: str, *, position: int):
        self.position = position
        super().__init__(f"{message} at character {position}")


@dataclass(frozen=True)
class _Tool:
    name: str
    parameters: Any


def _format_name(format: str) -> str:
    f = _ALIASES.get(format.lower(), format.lower()) if isinstance(format, str) else format
    if f not in TOOL_FORMATS:
        raise GrammarError(f"unknown tool-call format {format!r}; supported: {', '.join(TOOL_FORMATS)}")
    return f


def normalize_tools(tools: Sequence[Any]) -> list[_Tool]:
    """Validate OpenAI-style tools; returns (name, parameters schema) pairs in order.

    Accepts ``{"type": "function", "function": {...}}`` and the bare ``{"name", "parameters"}``.
    """
    if not isinstance(tools, (list, tuple)):
        raise GrammarError(f"tools must be a list, got {type(tools).__name__}")
    out: list[_Tool] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise GrammarError(f"tools[{i}]: expected an object, got {type(t).__name__}")
        if "function" in t:
            if t.get("type", "function") != "function":
                raise GrammarError(f"tools[{i}].type: only 'function' tools are supported, not {t.get('type')!r}")
            fn = t["function"]
            where = f"tools[{i}].function"
        else:
            fn, where = t, f"tools[{i}]"
        if not isinstance(fn, dict):
            raise GrammarError(f"{where}: expected an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise GrammarError(f"{where}.name: {name!r} is not a function name (1-64 of A-Z a-z 0-9 _ . -)")
        if any(x.name == name for x in out):
            raise GrammarError(f"{where}.name: {name!r} is defined twice")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object"}
        elif not isinstance(params, (dict, bool)):
            raise GrammarError(f"{where}.parameters: expected a JSON Schema object")
        out.append(_Tool(name, params))
    return out


def _choice(tool_choice: Any, tools: list[_Tool]) -> tuple[str, str | None]:
    """('auto' | 'required' | 'none', the forced function name or None)."""
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "required", "none"):
            raise GrammarError(f"tool_choice {tool_choice!r}: expected 'auto', 'required', 'none' or a function")
        if tool_choice == "required" and not tools:
            raise GrammarError("tool_choice 'required' needs at least one tool")
        return (tool_choice if tools else "none"), None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function", tool_choice)
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise GrammarError(f"tool_choice {tool_choice!r}: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        if not any(t.name == name for t in tools):
            raise GrammarError(f"tool_choice names {name!r}, which is not among the tools {[t.name for t in tools]}")
        return "required", name
    raise GrammarError(f"tool_choice must be a string or an object, got {type(tool_choice).__name__}")


def _ws(max_ws: int) -> Expr:
    """Whitespace between JSON tokens of the call envelope: spaces/tabs around at most one line break."""
    run = Repeat(ByteClass(((0x09, 0x09), (0x20, 0x20))), 0, max_ws)
    return seq(run, opt(seq(opt(lit("\r")), lit("\n"), run)))


class _Builder:
    def __init__(self, fmt: str, tools: list[_Tool], whitespace: str, max_whitespace: int):
        self.fmt = fmt
        self.b = GrammarBuilder()
        self.w = Ref(self.b.rule("ws", _ws(max_whitespace)))
        self.tools = tools
        self.whitespace = whitespace
        self.args: dict[str, Ref] = {}

    def arguments(self, tool: _Tool) -> Ref:
        from stencil.grammar.json_schema import json_schema_to_grammar

        ref = self.args.get(tool.name)
        if ref is None:
            g = json_schema_to_grammar(tool.parameters, strict=True, whitespace=self.whitespace)
            ref = embed_grammar(self.b, g, f"args{len(self.args)}_")
            self.args[tool.name] = ref
        return ref

    def call(self, tool: _Tool) -> Expr:
        """``{"name": "<name>", "<arguments|parameters>": <args>}``."""
        w = self.w
        key = "parameters" if self.fmt == "llama3_json" else "arguments"
        obj = seq(lit("{"), w, lit('"name"'), w, lit(":"), w, lit(json.dumps(tool.name)), w, lit(","), w,
                  lit(json.dumps(key)), w, lit(":"), w, self.arguments(tool), w, lit("}"))
        if self.fmt == "hermes":
            return seq(lit(_HERMES_OPEN), w, obj, w, lit(_HERMES_CLOSE))
        return obj

    def calls(self, names: list[str], parallel: bool) -> Expr:
        """One call (or, with ``parallel``, one or more) to the named tools, in the format's framing."""
        one = Ref(self.b.rule("call", alt(*(self.call(t) for t in self.tools if t.name in names))))
        w = self.w
        if self.fmt == "hermes":
            return seq(one, star(seq(w, one)), w) if parallel else seq(one, w)
        if self.fmt == "llama3_json":
            return seq(w, one, star(seq(w, lit(";"), w, one)), w) if parallel else seq(w, one, w)
        items = seq(one, star(seq(w, lit(","), w, one))) if parallel else one
        return seq(Special(_MISTRAL_OPEN), opt(lit(" ")), lit("["), w, items, w, lit("]"), w)

    def free_text(self, calls_follow: bool) -> Expr:
        """Text that cannot start a call; with ``calls_follow`` it may end only where a call can start."""
        if self.fmt == "hermes":
            return text_avoiding([_HERMES_OPEN], [_HERMES_OPEN] if calls_follow else [])
        if self.fmt == "llama3_json":
            ws = star(ByteClass(((0x09, 0x0A), (0x0D, 0x0D), (0x20, 0x20))))
            first = CharClass(((0, 0x08), (0x0B, 0x0C), (0x0E, 0x1F), (0x21, 0x7A), (0x7C, 0x10FFFF)))
            return seq(ws, opt(seq(first, star(ANY_CHAR))))
        # Text never produces the special token, but decoded output spells it: keep the spelling out too.
        return text_avoiding([_MISTRAL_OPEN], [_MISTRAL_OPEN] if calls_follow else [])

    def root(self, mode: str, forced: str | None, parallel: bool) -> Grammar:
        names = [forced] if forced else [t.name for t in self.tools]
        if mode == "none":
            body = self.free_text(False)
        elif mode == "required":
            body = self.calls(names, parallel)
        elif self.fmt == "llama3_json":
            # The whole answer is text or calls: calls are recognized only at its start.
            body = alt(self.free_text(False), self.calls(names, parallel))
        else:
            text_then = Ref(self.b.rule("text_before_calls", self.free_text(True)))
            body = alt(self.free_text(False), seq(text_then, self.calls(names, parallel)))
        self.b.rule("root", body)
        return self.b.build("root")


def build_tool_grammar(
    tools: Sequence[dict],
    tool_choice: Any = "auto",
    parallel_tool_calls: bool = True,
    format: str | None = None,
    tokenizer: Any = None,
    *,
    whitespace: str = "flexible",
    max_whitespace: int = 16,
) -> Grammar:
    """The grammar of every answer allowed by ``tools`` and ``tool_choice`` in a tool-call format.

    ``format``: ``"hermes"``, ``"llama3_json"`` or ``"mistral"`` (aliases ``"qwen"``, ``"llama3"``);
    without it the format is detected from ``tokenizer`` (:func:`detect_tool_format`).
    ``whitespace`` is the JSON Schema frontend's option for the arguments; ``max_whitespace`` bounds
    the spaces around line breaks in the call envelope. Bad tools or choices raise
    :class:`~stencil.errors.GrammarError`; a bad parameters schema raises
    :class:`~stencil.errors.SchemaError`.
    """
    if format is None:
        if tokenizer is None:
            raise GrammarError("build_tool_grammar needs format= or a tokenizer to detect the tool-call format from")
        format = detect_tool_format(tokenizer)
    fmt = _format_name(format)
    norm = normalize_tools(tools)
    mode, forced = _choice(tool_choice, norm)
    return _Builder(fmt, norm, whitespace, max_whitespace).root(mode, forced, bool(parallel_tool_calls))


# ----------------------------------------------------------------------------------------------
# Detecting the format
# ----------------------------------------------------------------------------------------------


def _chat_template(tokenizer: Any) -> str:
    """The chat template text of a transformers tokenizer or a tokenizer folder ('' if none)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        p = Path(tokenizer)
        cfg = p / "tokenizer_config.json" if p.is_dir() else p.with_name("tokenizer_config.json")
        if not cfg.is_file():
            return ""
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") or ""
    else:
        template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, list):  # named templates: [{"name", "template"}]
        template = "\n".join(t.get("template", "") for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else ""


def _vocab_names(tokenizer: Any) -> tuple[set[str], set[bytes]]:
    """(special token names, a few marker strings found as whole tokens) of any supported tokenizer."""
    from stencil.grammar.vocab import TokenizerInfo

    if isinstance(tokenizer, (str, os.PathLike)):
        p = Path(tokenizer)
        if not (p / "tokenizer.json").is_file() and not p.is_file():
            return set(), set()
        tokenizer = TokenizerInfo.from_file(p)
    if isinstance(tokenizer, TokenizerInfo):
        specials = set(tokenizer.special_token_names)
        whole = {m for m in (_HERMES_OPEN.encode(),) if any(
            tokenizer.decoded_vocab[t] == m for t in tokenizer.tokens_with_prefix(m))}
        return specials, whole
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return set(vocab), {m.encode() for m in (_HERMES_OPEN,) if m in vocab}


def detect_tool_format(tokenizer: Any) -> str:
    """The tool-call format a tokenizer's model uses: ``"hermes"``, ``"llama3_json"`` or ``"mistral"``.

    ``tokenizer`` is a :class:`~stencil.grammar.vocab.TokenizerInfo`, a transformers tokenizer, or a
    tokenizer folder. The chat template decides when there is one (``<tool_call>`` -> hermes,
    ``[TOOL_CALLS]`` -> mistral, ``<|python_tag|>`` or Llama-3 headers with tools -> llama3_json);
    otherwise the vocabulary does (a ``[TOOL_CALLS]`` special token, a whole ``<tool_call>`` token,
    Llama-3's ``<|python_tag|>``). Raises :class:`~stencil.errors.GrammarError` when neither tells.
    """
    template = _chat_template(tokenizer)
    if _HERMES_OPEN in template:
        return "hermes"
    if _MISTRAL_OPEN in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        return "llama3_json"
    specials, whole = _vocab_names(tokenizer)
    if _MISTRAL_OPEN in specials:
        return "mistral"
    if _HERMES_OPEN.encode() in whole or _HERMES_OPEN in specials:
        return "hermes"
    if "<|python_tag|>" in specials:
        return "llama3_json"
    raise GrammarError("cannot tell this tokenizer's tool-call format from its chat template or vocabulary; "
                       f"pass format= (one of {', '.join(TOOL_FORMATS)})")


# ----------------------------------------------------------------------------------------------
# Parsing the output
# ----------------------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()
_WS_CHARS = " \t\r\n"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS_CHARS:
        i += 1
    return i


def _json_at(text: str, i: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as e:
        raise ToolCallParseError(f"malformed JSON ({e.msg})", position=e.pos) from None


def _openai_call(obj: Any, key: str, pos: int) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or key not in obj:
        raise ToolCallParseError(f'a tool call must be an object with "name" and "{key}"', position=pos)
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(obj[key], ensure_ascii=False)},
    }


def parse_tool_calls(text: str, format: str) -> tuple[str, list[dict]]:
    """Split a model answer into ``(free_text, tool_calls)`` with OpenAI-shaped calls, in order.

    ``tool_calls[i]`` is ``{"id": "call_...", "type": "function", "function": {"name": ...,
    "arguments": <the arguments as a JSON string>}}``. The free text is returned exactly as
    generated (for hermes and mistral, everything before the first opener; for llama3_json, the
    whole answer when it is not a call). For mistral, decode the output with its special tokens
    (``skip_special_tokens=False``) so that ``[TOOL_CALLS]`` is in ``text``. Text after the calls
    other than whitespace (or a mis-shaped call) raises :class:`ToolCallParseError`; answers
    generated under :func:`build_tool_grammar` always parse.
    """
    fmt = _format_name(format)
    calls: list[dict] = []
    if fmt == "hermes":
        start = text.find(_HERMES_OPEN)
        if start < 0:
            return text, []
        i = start
        while i < len(text):
            if not text.startswith(_HERMES_OPEN, i):
                raise ToolCallParseError(f"expected {_HERMES_OPEN!r} or the end", position=i)
            obj, j = _json_at(text, _skip_ws(text, i + len(_HERMES_OPEN)))
            calls.append(_openai_call(obj, "arguments", i))
            j = _skip_ws(text, j)
            if not text.startswith(_HERMES_CLOSE, j):
                raise ToolCallParseError(f"expected {_HERMES_CLOSE!r}", position=j)
            i = _skip_ws(text, j + len(_HERMES_CLOSE))
        return text[:start], calls
    if fmt == "llama3_json":
        i = _skip_ws(text, 0)
        if i >= len(text) or text[i] != "{":
            return text, []
        while True:
            obj, j = _json_at(text, i)
            calls.append(_openai_call(obj, "parameters", i))
            j = _skip_ws(text, j)
            if j >= len(text):
                return "", calls
            if text[j] != ";":
                raise ToolCallParseError("expected ';' between calls or the end", position=j)
            i = _skip_ws(text, j + 1)
    start = text.find(_MISTRAL_OPEN)
    if start < 0:
        return text, []
    i = _skip_ws(text, start + len(_MISTRAL_OPEN))
    items, j = _json_at(text, i)
    if not isinstance(items, list) or not items:
        raise ToolCallParseError("expected a non-empty JSON list of calls", position=i)
    calls = [_openai_call(x, "arguments", i) for x in items]
    if _skip_ws(text, j) != len(text):
        raise ToolCallParseError("unexpected text after the calls", position=_skip_ws(text, j))
    return text[:start], calls
