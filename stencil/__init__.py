"""Stencil: structured generation and constrained decoding for LLMs.

Read from here down: a :class:`TokenizerInfo` describes a vocabulary as bytes; a
:class:`GrammarCompiler` turns JSON Schema, EBNF/Lark, regexes or choices into a
:class:`CompiledGrammar`; a :class:`GrammarMatcher` follows one sequence through it and fills
token bitmasks. :func:`generate` runs a transformers model under any of those constraints.
``docs/`` has one page per algorithm.
"""

from stencil.decode.bitmask import allocate_token_bitmask, apply_token_bitmask_inplace
from stencil.decode.matcher import GrammarMatcher
from stencil.errors import (
    GrammarError,
    ParserLimitError,
    RegexError,
    SchemaError,
    StencilError,
    TokenizerError,
)
from stencil.grammar.compiler import CompiledGrammar, GrammarCompiler
from stencil.grammar.ir import Grammar, GrammarBuilder
from stencil.grammar.vocab import TokenizerInfo, VocabType
from stencil.runtime.engine import Generation, GenerationStats
from stencil.runtime.generate import GenerationStream, generate, load_model

__version__ = "0.1.0"

__all__ = [
    "CompiledGrammar",
    "Generation",
    "GenerationStats",
    "GenerationStream",
    "Grammar",
    "GrammarBuilder",
    "GrammarCompiler",
    "GrammarError",
    "GrammarMatcher",
    "ParserLimitError",
    "RegexError",
    "SchemaError",
    "StencilError",
    "TokenizerError",
    "TokenizerInfo",
    "VocabType",
    "allocate_token_bitmask",
    "apply_token_bitmask_inplace",
    "generate",
    "load_model",
]
