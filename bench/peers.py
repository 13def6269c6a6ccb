"""One adapter per engine, so benchmarks drive Stencil and its peers through the same four calls.

Each adapter is built once per tokenizer and offers::

    m = adapter.compile_json_schema(schema_dict)   # -> an engine matcher (compile included)
    adapter.fill(m, bitmask)                        # the next-token mask into int32 bitmask row 0
    adapter.accept(m, token_id) -> bool             # advance; False = the engine rejected the token

Peers are imported lazily: a missing one is reported, not fatal. Install them with
``pip install -r bench/requirements.txt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ENGINES = ("stencil", "xgrammar", "llguidance", "outlines")


def load_hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class Stencil:
    name = "stencil"

    def __init__(self, tok_dir: Path, model_vocab_size: int, warm_up: bool = True):
        import stencil as st

        self.info = st.TokenizerInfo.from_file(tok_dir, vocab_size=model_vocab_size)
        self.compiler = st.GrammarCompiler(self.info, warm_up=warm_up)
        self._matcher = st.GrammarMatcher
        self.vocab_size = model_vocab_size

    def compile_json_schema(self, schema):
        return self._matcher(self.compiler.compile_json_schema(schema))

    def fill(self, m, bitmask):
        m.fill_next_token_bitmask(bitmask, 0)

    def accept(self, m, t):
        return m.accept_token(t)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok_dir: Path, model_vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        meta = json.loads((tok_dir / "meta.json").read_text())
        info = xgr.TokenizerInfo.from_huggingface(
            load_hf_tokenizer(tok_dir), vocab_size=model_vocab_size, stop_token_ids=meta["stop_token_ids"]
        )
        # One thread, like every other engine here: the machine has two cores and we time single requests.
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = model_vocab_size

    def compile_json_schema(self, schema):
        # strict_mode=False keeps JSON Schema's default of allowing additional properties, as Stencil does.
        cg = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=False)
        return self.xgr.GrammarMatcher(cg)

    def fill(self, m, bitmask):
        m.fill_next_token_bitmask(bitmask, 0)

    def accept(self, m, t):
        return m.accept_token(t)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok_dir: Path, model_vocab_size: int):
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        meta = json.loads((tok_dir / "meta.json").read_text())
        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(
            load_hf_tokenizer(tok_dir), n_vocab=model_vocab_size, eos_token=meta["stop_token_ids"]
        )
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self.vocab_size = model_vocab_size

    def compile_json_schema(self, schema):
        grm = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": True})
        m = self.ll.LLMatcher(self.tok, grm)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def fill(self, m, bitmask):
        self._fill(m, bitmask, 0)

    def accept(self, m, t):
        return m.consume_token(t) and not m.is_error()


class Outlines:
    name = "outlines"

    def __init__(self, tok_dir: Path, model_vocab_size: int):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        import stencil as st

        info = st.TokenizerInfo.from_file(tok_dir, vocab_size=model_vocab_size)
        eos = info.stop_token_ids[0]
        by_bytes: dict[bytes, list[int]] = {}
        for t, b in enumerate(info.decoded_vocab):
            if b and t not in info.special_token_ids:
                by_bytes.setdefault(b, []).append(t)
        self.oc = outlines_core
        self.vocab = outlines_core.Vocabulary(eos, by_bytes)
        self.build_regex = build_regex_from_schema
        self.vocab_size = model_vocab_size

    def compile_json_schema(self, schema):
        # outlines-core's default whitespace is a bounded run of spaces; json.dumps separators fit it.
        index = self.oc.Index(self.build_regex(json.dumps(schema)), self.vocab)
        return self.oc.Guide(index)

    def fill(self, m, bitmask):
        m.write_mask_into(bitmask.ctypes.data, bitmask.shape[1], 4)

    def accept(self, m, t):
        try:
            m.advance(t)
            return True
        except Exception:
            return False


ADAPTERS = {"stencil": Stencil, "xgrammar": XGrammar, "llguidance": LLGuidance, "outlines": Outlines}


def make_adapter(name: str, tok_dir: Path, model_vocab_size: int, warm_up: bool = True):
    """``warm_up=False`` turns off Stencil's background mask warm-up (the peers have none to turn off)."""
    if name == "stencil":
        return Stencil(tok_dir, model_vocab_size, warm_up)
    return ADAPTERS[name](tok_dir, model_vocab_size)


def new_bitmask(vocab_size: int) -> np.ndarray:
    return np.zeros((1, (vocab_size + 31) // 32), np.int32)
