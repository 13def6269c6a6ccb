"""GrammarCompiler: user input -> Grammar IR -> a CompiledGrammar bound to one vocabulary.

Each ``compile_*`` method runs one frontend and binds the result to the compiler's
:class:`~stencil.grammar.vocab.TokenizerInfo`: special tokens the grammar names are resolved to
ids here, so a misspelt one fails at compile time, not at decode time. Compiled grammars are kept
in an LRU keyed by the request, so asking twice for the same schema costs nothing.

Each compiled grammar owns a token-mask cache (:class:`~stencil.grammar.masks.MaskCache`), made
on first use. Its per-state entries are shared process-wide with every grammar of the same
vocabulary that contains the same sub-grammar, and, with ``cache_dir``, across processes. By
default the compiler queues each new grammar for background warm-up, so states are classified on
a spare core before the decoder reaches them.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from stencil.errors import GrammarError
from stencil.grammar.ir import Grammar, GrammarBuilder, alt, lit
from stencil.grammar.vocab import TokenizerInfo

if TYPE_CHECKING:
    from stencil.grammar.masks import MaskCache


@dataclass
class CompiledGrammar:
    """A grammar bound to a vocabulary: what a :class:`~stencil.decode.matcher.GrammarMatcher` runs.

    ``special_symbol_of_token[t]`` is the grammar symbol (256 + k) that special token ``t`` stands
    for, or -1 when the grammar does not name it. ``cache_dir``: where the mask cache persists
    its entries (None: memory only).
    """

    grammar: Grammar
    tokenizer_info: TokenizerInfo
    special_symbol_of_token: np.ndarray
    source: str = ""
    stats: dict = field(default_factory=dict)
    cache_dir: Path | None = None
    _mask_cache: "MaskCache | None" = field(default=None, init=False, repr=False, compare=False)
    _mask_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer_info.vocab_size

    @property
    def mask_cache(self) -> "MaskCache":
        """The grammar's token-mask cache (made on first use; thread-safe)."""
        mc = self._mask_cache
        if mc is None:
            with self._mask_lock:
                if self._mask_cache is None:
                    from stencil.grammar.masks import MaskCache

                    self._mask_cache = MaskCache(self, cache_dir=self.cache_dir)
                mc = self._mask_cache
        return mc

    def warm_up(self, background: bool = True) -> None:
        """Classify every state's tokens now (``background=False``) or on the background worker thread."""
        self.mask_cache.warm_up(background)


def bind(grammar: Grammar, tokenizer_info: TokenizerInfo, source: str = "",
         cache_dir: str | os.PathLike | None = None) -> CompiledGrammar:
    """Bind ``grammar`` to ``tokenizer_info``, resolving the special tokens it names."""
    sym = np.full(tokenizer_info.vocab_size, -1, np.int32)
    for k, name in enumerate(grammar.special_tokens):
        if name not in tokenizer_info.special_token_names:
            known = ", ".join(sorted(tokenizer_info.special_token_names)[:20])
            raise GrammarError(f"the grammar names special token {name!r}, which this tokenizer lacks (it has: {known}, ...)")
        sym[tokenizer_info.special_token_names[name]] = 256 + k
    return CompiledGrammar(grammar, tokenizer_info, sym, source,
                           cache_dir=Path(cache_dir) if cache_dir is not None else None)


class GrammarCompiler:
    """Compiles grammars of every supported kind for one tokenizer, with an LRU of results.

    ``cache_size``: compiled grammars kept (least recently used dropped first). ``cache_dir``: a
    directory for the on-disk token-mask cache, shared by processes using the same vocabulary.
    ``warm_up``: queue each newly compiled grammar for background mask warm-up. ``load_kernels``:
    load the numba kernels now (once per process; see :mod:`stencil.preload`), so that the first
    request's mask does not pay for it.

    >>> compiler = GrammarCompiler(TokenizerInfo.from_file("tokenizer.json"))
    >>> cg = compiler.compile_regex(r"\\d{3}-\\d{4}")
    """

    def __init__(self, tokenizer_info: TokenizerInfo, *, cache_size: int = 128,
                 cache_dir: str | os.PathLike | None = None, warm_up: bool = True, load_kernels: bool = True):
        self.tokenizer_info = tokenizer_info
        self.cache_size = int(cache_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.warm_up = bool(warm_up)
        self._cache: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        if load_kernels:
            from stencil.preload import load_kernels as load

            load(tokenizer_info)

    def _cached(self, key: tuple, make: Callable[[], Grammar], source: str) -> CompiledGrammar:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        from stencil.grammar.masks import compiling

        with compiling():
            cg = bind(make(), self.tokenizer_info, source, self.cache_dir)
        with self._lock:
            self._cache[key] = cg
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if self.warm_up:
            cg.warm_up(background=True)
        return cg

    def compile_grammar(self, text: str, *, root: str | None = None, syntax: str = "auto") -> CompiledGrammar:
        """EBNF/GBNF (``name ::= ...``) or Lark (``name: ...``) text; ``syntax`` is auto, ebnf or lark."""
        if syntax == "auto":
            syntax = "ebnf" if "::=" in text else "lark"
        if syntax == "ebnf":
            from stencil.grammar.ebnf import ebnf_to_grammar

            return self._cached(("ebnf", text, root), lambda: ebnf_to_grammar(text, root=root or "root"), text)
        if syntax == "lark":
            from stencil.grammar.lark import lark_to_grammar

            return self._cached(("lark", text, root), lambda: lark_to_grammar(text, start=root or "start"), text)
        raise GrammarError(f"unknown grammar syntax {syntax!r}: use 'auto', 'ebnf' or 'lark'")

    def compile_regex(self, pattern: str) -> CompiledGrammar:
        """The strings that fully match ``pattern``."""
        from stencil.grammar.regex import regex_grammar

        return self._cached(("regex", pattern), lambda: regex_grammar(pattern), pattern)

    def compile_choice(self, choices: Sequence[str]) -> CompiledGrammar:
        """Exactly one of the given strings."""
        choices = list(choices)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise GrammarError("compile_choice needs a non-empty list of strings")

        def make() -> Grammar:
            b = GrammarBuilder()
            b.rule("root", alt(*(lit(c) for c in dict.fromkeys(choices))))
            return b.build("root")

        return self._cached(("choice", tuple(choices)), make, json.dumps(choices))

    def compile_builtin_json(self, **options: Any) -> CompiledGrammar:
        """Any JSON value (RFC 8259)."""
        from stencil.grammar.json_schema import builtin_json_grammar

        key = ("builtin_json", tuple(sorted(options.items())))
        return self._cached(key, lambda: builtin_json_grammar(**options), "json")

    def compile_json_schema(self, schema: Any, **options: Any) -> CompiledGrammar:
        """A JSON Schema (dict, JSON text, or pydantic model class); options go to the JSON Schema frontend."""
        from stencil.grammar.json_schema import json_schema_to_grammar

        if isinstance(schema, (dict, list, bool)):
            text = json.dumps(schema, sort_keys=True)
        elif isinstance(schema, str):
            text = schema
        else:
            text = f"{getattr(schema, '__module__', '')}.{getattr(schema, '__qualname__', repr(schema))}"
        key = ("json_schema", text, tuple(sorted(options.items())))
        return self._cached(key, lambda: json_schema_to_grammar(schema, **options), text)

    def compile_structural_tag(self, tag: Any) -> CompiledGrammar:
        """XGrammar's structural-tag JSON (dict or text); see :mod:`stencil.grammar.structural_tag`.

        Literal strings (const strings, tag begins and ends, triggers, separators) that spell one of
        this tokenizer's special tokens match that token's id.
        """
        from stencil.grammar.structural_tag import structural_tag_to_grammar

        text = tag if isinstance(tag, str) else json.dumps(tag, sort_keys=True)
        names = tuple(self.tokenizer_info.special_token_names)
        return self._cached(("structural_tag", text), lambda: structural_tag_to_grammar(tag, special_tokens=names), text)

    def compile_tools(
        self, tools: Sequence[dict], tool_choice: Any = "auto", parallel_tool_calls: bool = True, format: str | None = None
    ) -> CompiledGrammar:
        """OpenAI-style tools in the model's tool-call format; see :func:`stencil.integrations.tools.build_tool_grammar`."""
        from stencil.integrations.tools import build_tool_grammar

        text = json.dumps([tools, tool_choice, bool(parallel_tool_calls), format], sort_keys=True)
        return self._cached(
            ("tools", text),
            lambda: build_tool_grammar(tools, tool_choice, parallel_tool_calls, format=format, tokenizer=self.tokenizer_info),
            text,
        )

    def clear_cache(self) -> None:
        self._cache.clear()
