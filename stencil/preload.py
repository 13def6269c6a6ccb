"""Load the numba kernels that compiling and decoding use, once per process, before the first request.

numba keeps compiled kernels on disk (``cache=True``), but a process still loads each one on its
first call, a few to tens of milliseconds each for the twenty-odd that compiling and decoding use.
Without this, the first grammar a process compiles pays all of it inside its first mask, and a
kernel first needed later (the structure table growing) pays it inside a decode step. :func:`load_kernels` runs a small workload that reaches them
instead: a regex, an EBNF grammar and a JSON Schema with the constructs that take distinct kernel
paths compiled, and an instance of the schema decoded token by token (fills, batch fill,
``try_token``, rollback), and the background warm-up's own kernels.

:class:`~stencil.grammar.compiler.GrammarCompiler` calls it when constructed (``load_kernels=True``,
the default). The workload's grammars go through a private compiler without a disk cache; their
mask entries stay in the process-wide store for the vocabulary, as any grammar's would.
"""

from __future__ import annotations

import threading

import numpy as np

from stencil.grammar.vocab import TokenizerInfo

# Reaches: string bounds and a pattern, integer and number, an enum array, a nested object, and an
# object with extra keys, whose "any name but these" states take donors; decoding an instance
# registers enough state structures to grow the grammar's structure table.
_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0},
        "x": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
        "p": {"type": "string", "pattern": "^[a-z]+$"},
        "o": {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]},
    },
    "required": ["name"],
    "additionalProperties": {"type": "boolean"},
}
_INSTANCE = '{"name": "ab", "n": 3, "x": -1.5e3, "tags": ["a"], "p": "q", "o": {"k": true}, "zz": false}'

_LOADED: set[tuple] = set()  # argument dtypes the kernels were loaded for
_LOCK = threading.Lock()


def load_kernels(tokenizer_info: TokenizerInfo) -> None:
    """Load the compile and decode kernels for this vocabulary's array types; a no-op once done."""
    kind = (tokenizer_info.token_bytes.dtype.str, tokenizer_info.token_offsets.dtype.str)
    with _LOCK:
        if kind in _LOADED:
            return
        _run(tokenizer_info)
        _LOADED.add(kind)


def _run(info: TokenizerInfo) -> None:
    from stencil.decode.bitmask import allocate_token_bitmask
    from stencil.decode.matcher import GrammarMatcher, fill_next_token_bitmasks
    from stencil.grammar.compiler import GrammarCompiler

    compiler = GrammarCompiler(info, warm_up=False, load_kernels=False)
    compiler.compile_regex(r"[a-c]+x?\d{2,3}")
    compiler.compile_grammar('root ::= "(" root ")" | [0-9]+')
    cg = compiler.compile_json_schema(_SCHEMA)
    bitmask = allocate_token_bitmask(2, info.vocab_size)
    m = GrammarMatcher(cg)
    m.fill_next_token_bitmask(bitmask, 0)
    # One-byte tokens spell the instance where the vocabulary has them all; otherwise its bytes go in raw.
    lengths = np.diff(info.token_offsets)
    single = np.flatnonzero(lengths == 1)
    by_byte = dict(zip(info.token_bytes[info.token_offsets[single]].tolist(), single.tolist()))
    data = _INSTANCE.encode()
    if all(b in by_byte for b in data):
        for b in data:
            m.try_token(by_byte[b])
            m.accept_token(by_byte[b])
            m.fill_next_token_bitmask(bitmask, 0)
        m.rollback(1)
    else:
        m.accept_bytes(data)
    fill_next_token_bitmasks([m, GrammarMatcher(cg)], bitmask)
    # What the background warm-up starts with. Loaded here, not on the warm-up thread: a load holds
    # the GIL (about 10 ms for _frontier), which would land in whatever decode step is running.
    cg.mask_cache.lookup_states()
    cg.mask_cache.frontier()
