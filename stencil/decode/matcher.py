"""GrammarMatcher: one request's position in a compiled grammar, advanced token by token.

A token is the bytes it spells (or, for a special token the grammar names, one special symbol).
Stop tokens are allowed exactly when the grammar is complete, and accepting one *terminates* the
matcher. Any other special token and every padding id is always rejected. A rejected token
returns False and leaves the state unchanged; ``rollback(n)`` undoes the last n accepted tokens.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from stencil.decode.parser import GROW, LIMIT, Recognizer, advance_many
from stencil.errors import StencilError
from stencil.grammar.compiler import CompiledGrammar
from stencil.grammar.vocab import TokenizerInfo

KIND_TEXT = TokenizerInfo.KIND_TEXT


class GrammarMatcher:
    """Incremental matcher for one sequence.

    >>> m = GrammarMatcher(compiler.compile_regex("yes|no"))
    >>> m.accept_string("ye"), m.try_token(tok_s), m.is_completed()
    """

    def __init__(self, compiled: CompiledGrammar, *, max_items_per_row: int = 50_000):
        self.compiled = compiled
        self.tokenizer_info = compiled.tokenizer_info
        self._stop = np.zeros(compiled.vocab_size, np.bool_)
        self._stop[self.tokenizer_info.stop_token_ids] = True
        self._rec = Recognizer(compiled.grammar, max_items_per_row=max_items_per_row)
        self._history: list[int] = []  # symbols consumed per accepted token (-1: a stop token)
        self._terminated = False

    # -- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self._rec.reset()
        self._history.clear()
        self._terminated = False

    def fork(self) -> "GrammarMatcher":
        """An independent copy in the same state (for beams, SMC particles, speculation)."""
        other = GrammarMatcher.__new__(GrammarMatcher)
        other.compiled = self.compiled
        other.tokenizer_info = self.tokenizer_info
        other._stop = self._stop
        other._rec = self._rec.fork()
        other._history = list(self._history)
        other._terminated = self._terminated
        return other

    def is_completed(self) -> bool:
        """The output so far is a complete sentence: a stop token (or stopping) is allowed now."""
        return self._terminated or self._rec.is_accepting()

    def is_terminated(self) -> bool:
        """A stop token has been accepted: nothing more can follow."""
        return self._terminated

    @property
    def num_accepted_tokens(self) -> int:
        return len(self._history)

    # -- tokens ----------------------------------------------------------------------------

    def _symbols(self, token_id: int) -> np.ndarray | None:
        """The grammar symbols token ``token_id`` spells, or None if it can never be accepted as text."""
        info = self.tokenizer_info
        sym = int(self.compiled.special_symbol_of_token[token_id])
        if sym >= 0:
            return np.array([sym], np.int32)
        if info.token_kind[token_id] != KIND_TEXT:
            return None
        lo, hi = info.token_offsets[token_id], info.token_offsets[token_id + 1]
        return info.token_bytes[lo:hi].astype(np.int32)

    def _check_id(self, token_id: int) -> int:
        t = int(token_id)
        if not 0 <= t < self.compiled.vocab_size:
            raise StencilError(f"token id {t} is outside the vocabulary (size {self.compiled.vocab_size})")
        return t

    def accept_token(self, token_id: int) -> bool:
        """Advance over one token; False (state unchanged) if the grammar does not allow it here."""
        t = self._check_id(token_id)
        if self._terminated:
            return False
        if self._stop[t] and self.compiled.special_symbol_of_token[t] < 0:
            if not self._rec.is_accepting():
                return False
            self._terminated = True
            self._history.append(-1)
            return True
        syms = self._symbols(t)
        if syms is None or not self._rec.accept_symbols(syms):
            return False
        self._history.append(int(syms.shape[0]))
        return True

    def try_token(self, token_id: int) -> bool:
        """Would ``accept_token`` succeed? The state does not change."""
        if not self.accept_token(token_id):
            return False
        self.rollback(1)
        return True

    def accept_bytes(self, data: bytes) -> bool:
        """Advance over raw bytes (not tokens); all or nothing. Counts as one step for rollback."""
        if self._terminated or not self._rec.accept_bytes(data):
            return False
        self._history.append(len(data))
        return True

    def accept_string(self, text: str | bytes) -> bool:
        """Advance over a string's UTF-8 bytes; all or nothing. Counts as one step for rollback."""
        return self.accept_bytes(text.encode("utf-8") if isinstance(text, str) else text)

    def validate_tokens(self, token_ids) -> int:
        """How many of ``token_ids`` the grammar accepts in a row from here (state unchanged)."""
        n = 0
        for t in token_ids:
            if not self.accept_token(t):
                break
            n += 1
        self.rollback(n)
        return n

    def rollback(self, num_tokens: int = 1) -> None:
        """Undo the last ``num_tokens`` accepted tokens (or accepted strings)."""
        if num_tokens < 0 or num_tokens > len(self._history):
            raise StencilError(f"cannot roll back {num_tokens} tokens: only {len(self._history)} accepted")
        for _ in range(num_tokens):
            n = self._history.pop()
            if n < 0:
                self._terminated = False
            else:
                self._rec.rollback_bytes(n)

    # -- masks -----------------------------------------------------------------------------

    def fill_next_token_bitmask(self, bitmask, index: int = 0) -> None:
        """Write the allowed next tokens into row ``index`` of an int32 bitmask (1 bit per token, 1 = allowed)."""
        words = pack_bool_mask(self.brute_force_mask())
        row = bitmask[index]
        if isinstance(row, torch.Tensor):
            row.copy_(torch.from_numpy(words))
        else:
            row[:] = words

    def brute_force_mask(self) -> np.ndarray:
        """bool[vocab_size]: every token tried with the parser. Slow and obviously correct: the oracle."""
        info = self.tokenizer_info
        mask = np.zeros(self.compiled.vocab_size, np.bool_)
        if self._terminated:
            return mask
        rec = self._rec
        start = 0
        while True:
            start = _try_all_tokens(rec.G, rec._st, rec._org, rec._row_ptr, rec._ht_key, rec._ht_gen, rec._meta,
                                    info.token_bytes, info.token_offsets, info.token_kind,
                                    self.compiled.special_symbol_of_token, rec.max_items_per_row, start, mask)
            if start >= self.compiled.vocab_size:
                break
            if rec._meta[2] == LIMIT:
                rec._check(LIMIT, rec.num_bytes)
            rec._grow()
        if rec.is_accepting():
            mask[self._stop & (self.compiled.special_symbol_of_token < 0)] = True
        return mask


def pack_bool_mask(allowed: np.ndarray) -> np.ndarray:
    """bool[V] -> int32[ceil(V/32)] in the bitmask layout (bit t % 32 of word t // 32)."""
    n = allowed.shape[0]
    padded = np.zeros(((n + 31) // 32) * 32, np.uint8)
    padded[:n] = allowed
    return np.packbits(padded.reshape(-1, 32), axis=1, bitorder="little").view(np.int32).reshape(-1)


@numba.njit(cache=True, nogil=True)
def _try_all_tokens(G, st, org, row_ptr, ht_key, ht_gen, meta, token_bytes, token_offsets, token_kind,
                    special_sym, max_items, start, out):
    """Set out[t] for tokens t >= start that the parser accepts; stop early (returning t) on GROW or LIMIT."""
    n0 = meta[0]
    one = np.zeros(1, np.int32)
    for t in range(start, out.shape[0]):
        if special_sym[t] >= 0:
            one[0] = special_sym[t]
            syms = one
        elif token_kind[t] == KIND_TEXT:
            syms = token_bytes[token_offsets[t]:token_offsets[t + 1]].astype(np.int32)
        else:
            continue
        done = advance_many(G, st, org, row_ptr, ht_key, ht_gen, meta, syms, max_items)
        status = meta[2]
        meta[0] = n0
        if status == GROW or status == LIMIT:
            return t
        out[t] = done == syms.shape[0]
    return out.shape[0]
