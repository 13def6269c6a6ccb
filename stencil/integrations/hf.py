"""HuggingFace ``transformers`` integration: a logits processor for ``model.generate``.

    from stencil.integrations.hf import LogitsProcessor
    cg = GrammarCompiler(TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size)).compile_regex(r"\\d+")
    out = model.generate(**inputs, logits_processor=[LogitsProcessor(cg)], max_new_tokens=16)

State is kept per *generated prefix*, not per batch row: ``transformers`` reorders rows between steps
(beam search) and repeats them (``num_return_sequences``), so a row's identity is the prompt it came
from plus the tokens generated after it. Each call finds the matcher of every row's prefix, deriving
new prefixes from their parent (one token shorter) by forking it and accepting the new token. The
processor recognises a new ``generate()`` call (the inputs are not the previous ones plus one token)
and starts over, so one instance can be reused; :meth:`LogitsProcessor.reset` forces that.

Rows of finished sequences (after their stop token, padded by ``transformers``) are left unmasked:
their scores are not used. Logits wider than the grammar's vocabulary (a padded ``vocab_size``) have
the extra ids masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor as _HFLogitsProcessor

from stencil.decode.bitmask import allocate_token_bitmask, apply_token_bitmask_inplace
from stencil.decode.matcher import GrammarMatcher, fill_next_token_bitmasks
from stencil.errors import StencilError
from stencil.grammar.compiler import CompiledGrammar

__all__ = ["LogitsProcessor"]


class LogitsProcessor(_HFLogitsProcessor):
    """Constrains ``model.generate`` to compiled grammars.

    Args:
        compiled_grammar: one :class:`~stencil.grammar.compiler.CompiledGrammar` for every prompt,
            or a list with one per prompt of the batch (rows expanded by ``num_return_sequences``
            or beams use their prompt's grammar).
    """

    def __init__(self, compiled_grammar: CompiledGrammar | Sequence[CompiledGrammar]):
        grammars = [compiled_grammar] if isinstance(compiled_grammar, CompiledGrammar) else list(compiled_grammar)
        if not grammars or not all(isinstance(g, CompiledGrammar) for g in grammars):
            raise StencilError("LogitsProcessor needs a CompiledGrammar or a non-empty list of them")
        self.grammars = grammars
        self.reset()

    def reset(self) -> None:
        """Forget all state: the next call starts a new generation."""
        self._prompts: torch.Tensor | None = None  # [rows, prompt_len] of the current generate() call
        self._last_len = -1
        self._states: dict[tuple, GrammarMatcher | None] = {}  # (prompt, generated...) -> matcher, None = finished

    def _is_continuation(self, input_ids: torch.Tensor) -> bool:
        p = self._prompts
        return (
            p is not None
            and input_ids.shape[1] == self._last_len + 1
            and input_ids.shape[0] == p.shape[0]
            and bool((input_ids[:, : p.shape[1]] == p).all())
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        if not self._is_continuation(input_ids):
            self.reset()
            self._prompts = input_ids.clone()
        self._last_len = input_ids.shape[1]
        prompt_len = self._prompts.shape[1]
        # Rows of one prompt are contiguous (transformers repeats each prompt k times, in place).
        n_prompts = self._n_prompts(rows)
        per_prompt = rows // n_prompts
        generated = input_ids[:, prompt_len:].tolist()
        keys = [(r // per_prompt, *gen) for r, gen in enumerate(generated)]

        children: dict[tuple, int] = {}
        for key in set(keys):
            if key not in self._states and len(key) > 1:
                children[key[:-1]] = children.get(key[:-1], 0) + 1
        states: dict[tuple, GrammarMatcher | None] = {}
        for key in set(keys):
            states[key] = self._state(key, children)
        self._states = states

        live = [k for k in dict.fromkeys(keys) if states[k] is not None]
        if not live:
            return scores
        filled = allocate_token_bitmask(len(live), scores.shape[1])
        fill_next_token_bitmasks([states[k] for k in live], filled)
        slot = {k: i for i, k in enumerate(live)}
        # Finished rows keep an all-ones row; every other row gets its prefix's mask.
        bitmask = allocate_token_bitmask(rows, scores.shape[1])
        masked_rows = [r for r, k in enumerate(keys) if k in slot]
        bitmask[masked_rows] = filled[[slot[keys[r]] for r in masked_rows]]
        apply_token_bitmask_inplace(scores, bitmask.to(scores.device))
        return scores

    def _n_prompts(self, rows: int) -> int:
        # With one grammar the state depends on the generated tokens alone, so every row is keyed
        # under prompt 0 and equal prefixes share one matcher.
        n = len(self.grammars)
        if rows % n:
            raise StencilError(f"{n} grammars do not divide a batch of {rows} rows")
        return n

    def _state(self, key: tuple, children: dict[tuple, int]) -> GrammarMatcher | None:
        """The matcher after ``key``'s tokens (None once the sequence has finished)."""
        hit = self._states.get(key)
        if hit is not None or key in self._states:
            return hit
        if len(key) == 1:
            return GrammarMatcher(self.grammars[key[0]])
        parent_key = key[:-1]
        parent = self._states.get(parent_key)
        if parent is None:
            if parent_key not in self._states:
                raise StencilError("LogitsProcessor lost track of a sequence: call reset() before a new generate()")
            return None
        # Several children share a parent (beams, sampled duplicates): each gets its own fork.
        if children.get(parent_key, 0) > 1:
            parent = parent.fork()
        token = key[-1]
        if parent.is_terminated() or not parent.accept_token(token):
            return None  # a stop token (or the padding after it): the sequence is over
        if parent.is_terminated():
            return None
        return parent
