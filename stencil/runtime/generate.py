"""``stencil.generate``: constrained generation with any transformers causal LM, in one call.

    import stencil as st
    out = st.generate(None, "Give me a person as JSON.", schema=Person)     # the packaged default model
    out.text, out.value, out.finish_reason, out.stats.tokens_per_second

See :func:`generate` for the arguments and ``docs/runtime.md`` for the decode loop behind it.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from stencil.decode.sampling import SamplingParams
from stencil.errors import StencilError
from stencil.grammar.compiler import CompiledGrammar, GrammarCompiler, bind
from stencil.grammar.ir import Grammar
from stencil.runtime.engine import DecodeParams, Engine, Generation, Request, run_smc

__all__ = ["generate", "load_model", "load_tokenizer", "default_model_path", "get_engine", "GenerationStream", "SAMPLER_CHOICES"]

SAMPLER_CHOICES = ("auto", "mask", "awrs", "smc")

_MODELS: dict[str, tuple[Any, Any]] = {}
_ENGINES: dict[int, tuple[Any, Any, Engine]] = {}
_LOCK = threading.Lock()


def default_model_path() -> Path:
    """Where the packaged default model lives (``stencil/data/default_model``)."""
    return Path(str(importlib.resources.files("stencil"))) / "data" / "default_model"


def load_tokenizer(source: Any) -> Any:
    """A transformers tokenizer from a local folder or a cached hub name (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for a missing or broken tokenizer
        raise StencilError(f"cannot load a tokenizer from {str(source)!r} (local files only): {e}") from e


def load_model(model: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """Resolve ``model`` (object, local path, cached hub name, or None for the default) and its tokenizer.

    Nothing is downloaded: paths and hub names are loaded with ``local_files_only=True``. Models
    loaded from disk are kept for the life of the process, on the GPU when one is present.
    """
    if model is None or isinstance(model, (str, Path)):
        source = str(default_model_path() if model is None else model)
        with _LOCK:
            hit = _MODELS.get(source)
        if hit is None:
            hit = _load_from_disk(source, is_default=model is None)
            with _LOCK:
                _MODELS[source] = hit
        m, tok = hit
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        return m, tok
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise StencilError(f"model must be a transformers model, a local path, a hub name or None, got {type(model).__name__}")
    if tokenizer is None:
        name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        if not name:
            raise StencilError("this model does not say where it came from (no name_or_path): pass tokenizer=")
        tokenizer = name
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    return model, tokenizer


def _load_from_disk(source: str, *, is_default: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    if is_default and not (Path(source) / "model.safetensors").is_file():
        raise StencilError(f"the default model is missing from {source}: run `python scripts/train_default_model.py`")
    cuda = torch.cuda.is_available()
    try:
        # CPU inference in half precision is slow or unsupported: weights are widened on the CPU.
        m = AutoModelForCausalLM.from_pretrained(source, local_files_only=True,
                                                 dtype="auto" if cuda else torch.float32)
    except Exception as e:  # OSError for a missing path/cache entry, ValueError for an unknown architecture ...
        where = "the local Hugging Face cache" if not Path(source).exists() else source
        raise StencilError(f"cannot load model {source!r} from {where} (Stencil never downloads): {e}") from e
    if cuda:
        m = m.to("cuda")
    m.eval()
    return m, load_tokenizer(source)


def get_engine(model: Any, tokenizer: Any) -> Engine:
    """The (cached) :class:`Engine` of a model and tokenizer."""
    with _LOCK:
        hit = _ENGINES.get(id(model))
        if hit is not None and hit[0] is model and hit[1] is tokenizer:
            return hit[2]
    engine = Engine(model, tokenizer)
    with _LOCK:
        if len(_ENGINES) > 8:
            _ENGINES.clear()
        _ENGINES[id(model)] = (model, tokenizer, engine)  # strong refs: ids stay unique while cached
    return engine


# -- prompts ----------------------------------------------------------------------------------------


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def _split_prompts(prompt: Any) -> tuple[list[Any], bool]:
    """(prompts, is_batch): a string or a messages list is one prompt; a list of those is a batch."""
    if isinstance(prompt, str) or _is_messages(prompt):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) or _is_messages(p) for p in prompt):
        return list(prompt), True
    raise StencilError("prompt must be a string, a list of chat messages (dicts with role and content), "
                       "or a non-empty list of either")


def _encode(tokenizer: Any, prompt: Any, tools: Any) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise StencilError("this tokenizer has no chat template: pass the prompt as a string")
    kwargs = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- constraints ------------------------------------------------------------------------------------


def _per_row(value: Any, n: int, name: str, is_batch: bool) -> list[Any]:
    """Broadcast one constraint to every row, or check a per-row list."""
    if value is None:
        return [None] * n
    if is_batch and isinstance(value, (list, tuple)) and not (name == "choices" and all(isinstance(c, str) for c in value)):
        if name == "tools" and all(isinstance(t, dict) for t in value):
            return [value] * n
        if len(value) != n:
            raise StencilError(f"{name} is a list of {len(value)} but there are {n} prompts: give one per prompt or one for all")
        return list(value)
    return [value] * n


def _is_pydantic_class(schema: Any) -> bool:
    return isinstance(schema, type) and hasattr(schema, "model_validate_json")


class _RowSpec:
    """What constrains one row, compiled, and how to read its value back."""

    def __init__(self, grammar: CompiledGrammar | None, schema: Any = None, tools: Any = None, tool_format: Any = None):
        self.grammar = grammar
        self.schema = schema
        self.tools = tools
        self.tool_format = tool_format


def _compile_row(compiler: GrammarCompiler, tokenizer: Any, *, schema: Any, grammar: Any, regex: Any, choices: Any,
                 tools: Any, tool_choice: Any, tool_format: Any, parallel_tool_calls: bool,
                 compile_options: dict) -> _RowSpec:
    given = [k for k, v in (("schema", schema), ("grammar", grammar), ("regex", regex), ("choices", choices),
                            ("tools", tools)) if v is not None]
    if len(given) > 1:
        raise StencilError(f"give at most one constraint per prompt; got {', '.join(given)}")
    if schema is not None:
        if isinstance(schema, CompiledGrammar):
            return _RowSpec(schema, schema=None)
        return _RowSpec(_with_options(compiler.compile_json_schema, schema, compile_options, "schema"), schema=schema)
    if grammar is not None:
        if isinstance(grammar, CompiledGrammar):
            return _RowSpec(grammar)
        if isinstance(grammar, Grammar):
            return _RowSpec(bind(grammar, compiler.tokenizer_info))
        if not isinstance(grammar, str):
            raise StencilError(f"grammar must be EBNF/Lark text, a Grammar or a CompiledGrammar, got {type(grammar).__name__}")
        return _RowSpec(_with_options(compiler.compile_grammar, grammar, compile_options, "grammar"))
    if regex is not None:
        if not isinstance(regex, str):
            raise StencilError(f"regex must be a string, got {type(regex).__name__}")
        return _RowSpec(compiler.compile_regex(regex))
    if choices is not None:
        if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
            raise StencilError("choices must be a list of strings")
        return _RowSpec(compiler.compile_choice(list(choices)))
    if tools is not None:
        tools_mod = _tools_module()
        fmt = tool_format or tools_mod.detect_tool_format(tokenizer)
        g = _with_options(tools_mod.build_tool_grammar, tools, dict(compile_options, tool_choice=tool_choice,
                          parallel_tool_calls=parallel_tool_calls, format=fmt), "tools")
        return _RowSpec(bind(g, compiler.tokenizer_info), tools=tools, tool_format=fmt)
    return _RowSpec(None)


def _with_options(compile_fn, source: Any, options: dict, kind: str) -> Any:
    """``compile_fn(source, **options)``, with options it does not take reported as a user error."""
    try:
        return compile_fn(source, **options)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise StencilError(f"compile_options {sorted(options)} do not apply to {kind}: {e}") from e


def _tools_module():
    try:
        from stencil.integrations import tools as tools_mod
    except ImportError as e:
        raise StencilError(f"tool calling is not available in this build (stencil.integrations.tools: {e})") from e
    return tools_mod


def _finish(gen: Generation, spec: _RowSpec) -> Generation:
    """Fill ``value`` / ``tool_calls`` of a finished generation."""
    complete = gen.finish_reason == "stop"
    if spec.schema is not None and complete:
        if _is_pydantic_class(spec.schema):
            gen.value = spec.schema.model_validate_json(gen.text)
        else:
            gen.value = json.loads(gen.text)
    if spec.tools is not None and complete:
        gen.raw_text = gen.text
        gen.text, gen.tool_calls = _tools_module().parse_tool_calls(gen.text, spec.tool_format)
    return gen


# -- samplers ---------------------------------------------------------------------------------------


def _resolve_sampler(sampler: str, sp: SamplingParams) -> str:
    if sampler not in SAMPLER_CHOICES:
        raise StencilError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_CHOICES)}")
    # AWRS draws from softmax(logits / T) restricted to the grammar: exact unless a warper (top-k,
    # top-p, min-p) reshapes the distribution *after* masking, which only the full mask can do.
    exact_awrs = sp.top_k == 0 and sp.top_p == 1.0 and sp.min_p == 0.0
    if sampler == "auto":
        return "awrs" if exact_awrs else "mask"
    if sampler == "awrs" and not exact_awrs:
        raise StencilError("sampler='awrs' is exact only without top_k/top_p/min_p; use sampler='mask' (or 'auto')")
    return sampler


class GenerationStream:
    """Text pieces as they are generated.

    Iterating yields ``str`` pieces for a single prompt, ``(index, str)`` pairs for a batch. Once it
    is exhausted, :attr:`result` holds what :func:`generate` would have returned.
    """

    def __init__(self, events: Iterator[tuple[int, str]], finalize, is_batch: bool):
        self._events = events
        self._finalize = finalize
        self._is_batch = is_batch
        self.result: Generation | list[Generation] | None = None

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str | tuple[int, str]:
        try:
            i, piece = next(self._events)
        except StopIteration:
            if self.result is None:
                self.result = self._finalize()
            raise
        return (i, piece) if self._is_batch else piece


def generate(
    model: Any = None,
    prompt: Any = "",
    *,
    tokenizer: Any = None,
    schema: Any = None,
    grammar: Any = None,
    regex: Any = None,
    choices: Any = None,
    tools: Any = None,
    tool_choice: Any = "auto",
    tool_format: str | None = None,
    parallel_tool_calls: bool = True,
    sampler: str = "auto",
    max_new_tokens: int | Sequence[int] = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: bool = False,
    particles: int = 8,
    long_context: Any = None,
    jump_forward: bool = True,
    logit_bias: dict[int, float] | None = None,
    compile_options: dict | None = None,
) -> Generation | list[Generation] | GenerationStream:
    """Generate text with ``model``, constrained to a language when one is given.

    Args:
        model: a transformers causal LM (its tokenizer is loaded from ``model.name_or_path`` unless
            ``tokenizer`` is given), a local path, a hub name already in the local cache, or None for
            Stencil's packaged default model (small, CPU, offline).
        prompt: a string (used as is), a list of chat messages (the tokenizer's chat template is
            applied, with ``tools`` when given), or a list of either for a batch.
        schema / grammar / regex / choices / tools: at most one constraint: a JSON Schema (dict,
            JSON text, or pydantic model class), EBNF/GBNF or Lark text (or a compiled grammar),
            a regex, a list of strings, or tool definitions (OpenAI style). For a batch, each may be
            a list with one entry per prompt.
        tool_choice / tool_format / parallel_tool_calls: how tools are offered (see
            :mod:`stencil.integrations.tools`; the format is detected from the tokenizer when not
            given). ``tool_calls`` of the result holds the parsed, OpenAI-shaped calls (``[]`` when
            the model answered in text); ``text`` is the raw answer.
        sampler: ``"auto"`` (AWRS when it is exact for the request, i.e. no top-k/top-p; otherwise
            the full mask), ``"mask"``, ``"awrs"``, or ``"smc"`` (sequential Monte Carlo with
            ``particles`` particles: returns the best output with the whole ``posterior`` attached).
        max_new_tokens: per prompt (an int, or one per prompt).
        temperature / top_p / top_k: ``temperature=0`` is greedy decoding.
        seed: makes sampling reproducible.
        stop: stop strings; the text is cut before the first one (``finish_reason == "stop_string"``).
        stream: return a :class:`GenerationStream` of text pieces instead.
        long_context: a :class:`~stencil.runtime.tokenselect.TokenSelectConfig`: attend with
            token-level sparse KV selection during this call.
        jump_forward: feed the tokens the grammar forces without sampling them (when the matcher
            can tell).
        logit_bias: ``{token_id: bias}`` added to the logits before the constraint and the sampler.
        compile_options: keyword arguments for the grammar compiler (e.g. ``{"whitespace":
            "compact"}`` for JSON Schema, or for ``build_tool_grammar`` with tools).

    Returns:
        A :class:`Generation` (or a list of them for a batch): ``text``, ``value`` (parsed JSON, or
        the pydantic instance), ``token_ids``, ``finish_reason`` (``stop``, ``length`` or
        ``stop_string``), ``stats`` and ``tool_calls``.
    """
    model, tokenizer = load_model(model, tokenizer)
    engine = get_engine(model, tokenizer)
    prompts, is_batch = _split_prompts(prompt)
    n = len(prompts)
    try:
        sp = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    except ValueError as e:
        raise StencilError(str(e)) from e
    kind = _resolve_sampler(sampler, sp)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise StencilError("stop must be a non-empty string or a list of them")
    lengths = _per_row(max_new_tokens, n, "max_new_tokens", is_batch)
    options = dict(compile_options or {})
    cols = {name: _per_row(v, n, name, is_batch) for name, v in
            (("schema", schema), ("grammar", grammar), ("regex", regex), ("choices", choices), ("tools", tools))}
    specs = [_compile_row(engine.compiler, tokenizer, schema=cols["schema"][i], grammar=cols["grammar"][i],
                          regex=cols["regex"][i], choices=cols["choices"][i], tools=cols["tools"][i],
                          tool_choice=tool_choice, tool_format=tool_format,
                          parallel_tool_calls=parallel_tool_calls, compile_options=options) for i in range(n)]
    requests = [Request(_encode(tokenizer, p, cols["tools"][i]), specs[i].grammar, int(lengths[i]), stops)
                for i, p in enumerate(prompts)]

    if kind == "smc":
        if stream:
            raise StencilError("stream=True is not available with sampler='smc' (the posterior is known only at the end)")
        with _long_context(model, long_context):
            outs = [_finish(run_smc(engine, req, sp, particles=particles, seed=seed), spec)
                    for req, spec in zip(requests, specs)]
        for g, spec in zip(outs, specs):
            for alt in g.posterior or []:
                _finish(alt, spec)
        return outs if is_batch else outs[0]

    params = DecodeParams(sampling=sp, sampler=kind, seed=seed, jump_forward=jump_forward, logit_bias=logit_bias)

    def finalize(run) -> Generation | list[Generation]:
        outs = [_finish(g, spec) for g, spec in zip(run.generations, specs)]
        return outs if is_batch else outs[0]

    if stream:
        return _stream(engine, requests, params, model, long_context, finalize, is_batch)
    with _long_context(model, long_context):
        run = engine.decode_stream(requests, params)
        for _ in run:
            pass
    return finalize(run)


def _stream(engine, requests, params, model, long_context, finalize, is_batch) -> GenerationStream:
    holder: dict[str, Any] = {}

    def events() -> Iterator[tuple[int, str]]:
        with _long_context(model, long_context):
            run = engine.decode_stream(requests, params)
            holder["run"] = run
            yield from run

    return GenerationStream(events(), lambda: finalize(holder["run"]), is_batch)


@contextlib.contextmanager
def _long_context(model: Any, config: Any) -> Iterator[None]:
    if config is None:
        yield
        return
    from stencil.runtime.tokenselect import TokenSelectConfig, tokenselect

    if not isinstance(config, TokenSelectConfig):
        raise StencilError(f"long_context must be a TokenSelectConfig, got {type(config).__name__}")
    with tokenselect(model, config):
        yield

