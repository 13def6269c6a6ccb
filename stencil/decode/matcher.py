"""GrammarMatcher: one request's position in a compiled grammar, advanced token by token.

A token is the bytes it spells (or, for a special token the grammar names, one special symbol).
Stop tokens are allowed exactly when the grammar is complete, and accepting one *terminates* the
matcher. Any other special token and every padding id is always rejected. A rejected token
returns False and leaves the state unchanged; ``rollback(n)`` undoes the last n accepted tokens.

Masks come from the compiled grammar's token-mask cache (:mod:`stencil.grammar.masks`): one kernel
call ORs the cached accepted sets of the row's states, walks their uncertain trie subtrees with the
real parser, and adds the named special tokens and (when complete) the stop tokens. States seen for
the first time are classified first, lazily.
"""

from __future__ import annotations

import operator
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, Sequence

import numba
import numpy as np
import torch
from numba._dispatcher import compute_fingerprint
from numba.core import cgutils, types
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

from stencil.decode import jump_forward as _jump_forward
from stencil.decode import speculative as _speculative
from stencil.decode.parser import (
    _KERNEL,
    GROW,
    LIMIT,
    Recognizer,
    _add,
    _close_row,
    _full,
    _row_cap,
    advance,
    is_accepting,
)
from stencil.errors import StencilError
from stencil.grammar.compiler import CompiledGrammar
from stencil.grammar.masks import ACC_BITS, ACC_COMPLEMENT, ACC_LIST, _first_at_least, decoder_active
from stencil.grammar.vocab import TokenizerInfo

__all__ = ["GrammarMatcher", "fill_next_token_bitmasks", "pack_bool_mask"]

KIND_TEXT = TokenizerInfo.KIND_TEXT

# _cache_verdict answers
_REJECTED = 0
_ACCEPTED = 1
_ASK_PARSER = 2

# The check kernel fails with -(4 * payload + code): the payload is the token's index for _BAD_ID
# (an id outside the vocabulary), the chart's row count before the call for _GROWS and _LIMITED
# (the parser needs more room, or hit max_items_per_row; meta[0] is left at the row that did);
# _STALE (payload 1): the packed arrays are not the chart's any more, nothing was read.
_STALE = 0
_BAD_ID = 1
_GROWS = 2
_LIMITED = 3
_CHUNK = 62  # tokens per check kernel call: verdict bits 0..61 of a non-negative int64
_NO_ENTRY = 1 << 62  # set with the verdicts when a row state had no entry in the bound pools snapshot

# The fill's memo of suffix-trie results (see _fill_row): slots, and tokens remembered per slot
_MEMO_SLOTS = 8
_MEMO_TOKENS = 1024

# _token_codes: what each token id is to the check kernel (a text token's code is its trie node + 1)
_CODE_OTHER = -1  # padding, or a special token the grammar does not name: always rejected
_CODE_STOP = -2  # allowed exactly when the grammar is complete
_CODE_SYMBOL = -3  # a special token the grammar names as symbol sym has code _CODE_SYMBOL - sym

# _accept_token's answers besides the number of symbols consumed (GROW and LIMIT are the parser's)
_TOKEN_REJECTED = -3
_TOKEN_STOP = -4  # a stop token, accepted: the matcher terminates

_codes_of_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_codes_of_store: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # the codes of a grammar naming no special token
_overloads: dict[tuple, object] = {}  # (kernel, argument fingerprints, extra types) -> _overload
_scalar_entries: list = []  # the check for one token and for two, taking scalars only (see _check_entry_points)
_UNBOUND: np.ndarray  # the pack of a matcher that has not bound its arrays yet (defined below)
_UNBOUND_AT: int  # its address


def _token_codes(cache) -> np.ndarray:
    """int32[vocab]: each token's role and trie node in one array (see _CODE_*), so the check kernel
    reads one array (one cache line per token) instead of four.

    Made once per vocabulary and shared by the grammars that name no special token (most of them:
    building it is a few passes over the vocabulary, about 0.4 ms at 128k, which a grammar's first
    accepted token would otherwise pay); a grammar that names some gets its own copy with their codes.
    """
    codes = _codes_of_cache.get(cache)
    if codes is None:
        base = _codes_of_store.get(cache.store)
        if base is None:
            info = cache.info
            base = np.where(info.token_kind == KIND_TEXT, cache.forest.token_node + 1, _CODE_OTHER).astype(np.int32)
            base[info.stop_token_ids] = _CODE_STOP
            _codes_of_store[cache.store] = base
        codes = base
        if cache.special_ids.shape[0]:
            # A named special token is a grammar symbol, even a stop token (see MaskCache.is_stop).
            codes = base.copy()
            codes[cache.special_ids] = _CODE_SYMBOL - cache.special_syms
        _codes_of_cache[cache] = codes
    return codes


class GrammarMatcher:
    """Incremental matcher for one sequence.

    >>> m = GrammarMatcher(compiler.compile_regex("yes|no"))
    >>> m.accept_string("ye"), m.try_token(tok_s), m.is_completed()
    """

    def __init__(self, compiled: CompiledGrammar, *, max_items_per_row: int = 50_000):
        self.compiled = compiled
        self.tokenizer_info = compiled.tokenizer_info
        self._cache = compiled.mask_cache
        self._vocab_size = compiled.vocab_size
        self._rec = Recognizer(compiled.grammar, max_items_per_row=max_items_per_row)
        self._cache.track(self._rec)
        self._history: list[int] = []  # symbols consumed per accepted token (-1: a stop token)
        self._terminated = False
        self._unbind()
        if not _scalar_entries:
            _scalar_entries.extend(_check_entry_points())

    def _unbind(self) -> None:
        """Forget the kernels' bound arguments and scratch (a new matcher, or a fork's own copy)."""
        self._scratch: tuple | None = None  # scratch of the mask kernels, made on first use
        # The kernels' arguments are gathered once into tuples and called through their compiled
        # overloads directly (see _overload), gathered again when the chart's arrays or the cache's
        # pools are replaced: (chart, pools, bitmask fingerprint, arguments, overload) for the fill,
        # (chart, arguments, overload) for accept_token. The check path packs its arrays' addresses
        # into one array instead (see _pack_bound): _check_pack, its address _check_at (what the one- and
        # two-token entry points take), with _check = (pools, arguments), which keeps the packed arrays alive.
        self._check: tuple | None = None
        self._check_pack = _UNBOUND
        self._check_at = _UNBOUND_AT
        self._fill: tuple | None = None
        self._accept: tuple | None = None
        self._memo: tuple | None = None  # _fill_row's memo of uncertain tokens found, made on the first fill
        # The last torch bitmask filled (held, so the identity test is sound) and its numpy view:
        # (tensor, data_ptr, shape, view, fingerprint).
        self._rows: tuple | None = None

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
        other._cache = self._cache
        other._vocab_size = self._vocab_size
        other._rec = self._rec.fork()
        other._cache.track(other._rec)
        other._history = list(self._history)
        other._terminated = self._terminated
        other._unbind()
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

    def _check_id(self, token_id: int) -> int:
        t = int(token_id)
        if not 0 <= t < self._vocab_size:
            raise StencilError(f"token id {t} is outside the vocabulary (size {self._vocab_size})")
        return t

    def _bad_ids(self, token_ids: Sequence[int]) -> NoReturn:
        """After an OverflowError from converting ``token_ids`` to int64: the StencilError for the one
        outside the vocabulary (an id that does not fit in int64 is outside it)."""
        for t in token_ids:
            self._check_id(t)
        raise StencilError(f"token ids {list(token_ids)!r} do not fit in int64")

    def accept_token(self, token_id: int) -> bool:
        """Advance over one token; False (state unchanged) if the grammar does not allow it here.

        One call of :func:`_accept_token` through its bound arguments: half of a decode step whose
        mask entries exist, so the Python around it is kept to the id check and the answer.
        """
        t = int(token_id)
        if not 0 <= t < self._vocab_size:
            self._check_id(t)  # raises
        if self._terminated:
            return False
        rec = self._rec
        while True:
            a = self._accept
            if a is None or a[0] is not rec.chart:
                a = self._bind_accept()
            r = a[2](*a[1], t)
            if r >= 0:
                self._history.append(r)
                return True
            if r == _TOKEN_REJECTED:
                return False
            if r == _TOKEN_STOP:
                self._terminated = True
                self._history.append(-1)
                return True
            self._recover(r)

    def _bind_accept(self) -> tuple:
        """Gather _accept_token's arguments from the chart as it is now."""
        rec, info = self._rec, self.tokenizer_info
        b = (rec.G, *rec.chart, rec.max_items_per_row, _token_codes(self._cache), info.token_bytes, info.token_offsets)
        self._accept = (rec.chart, b, _overload(_accept_token, (*b, 0)))
        return self._accept

    def try_token(self, token_id: int) -> bool:
        """Would ``accept_token`` succeed? The state does not change.

        The mask cache answers for tokens its states accept or reject outright; only uncertain
        tokens (and states not classified yet) run the parser, in the same kernel call.
        """
        t = int(token_id)
        if self._terminated:
            self._check_id(t)
            return False
        try:
            r = _scalar_entries[0](self._check_at, t)
        except OverflowError:
            self._bad_ids((t,))
        if r < 0 or r >= _NO_ENTRY:
            r = self._settle((t,), 0, r)
        return r == 1

    def try_tokens(self, token_ids: Sequence[int] | np.ndarray) -> list[bool]:
        """Would ``accept_token`` succeed for each of ``token_ids``, on its own, from here?

        The state does not change. One kernel call answers up to 62 tokens (what a sampler that
        checks a few candidates at once wants): the cache states are looked up once, and uncertain
        tokens run the parser in the same call.
        """
        if len(token_ids) == 2 and not self._terminated:
            # AWRS's candidate and peek: the leanest path, as it runs right after the logits pass
            # with the CPU caches cold (the entry point converts the ids as int() would).
            try:
                r = _scalar_entries[1](self._check_at, token_ids[0], token_ids[1])
            except OverflowError:
                self._bad_ids(token_ids)
            if r >> 62:  # negative (see _settle) or with _NO_ENTRY set
                r = self._settle((int(token_ids[0]), int(token_ids[1])), 0, r)
            return [r & 1 == 1, r & 2 == 2]
        if len(token_ids) == 1:  # AWRS's peek on its own: the scalar entry point too
            return [self.try_token(token_ids[0])]
        try:
            toks = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        except OverflowError:
            self._bad_ids(token_ids)
        n = len(toks)
        if self._terminated:
            for t in toks:
                self._check_id(t)
            return [False] * n
        out: list[bool] = []
        for start in range(0, n, _CHUNK):
            bits = self._check_tokens(toks, start)
            out.extend(bits >> i & 1 == 1 for i in range(min(_CHUNK, n - start)))
        return out

    def _check_tokens(self, toks: np.ndarray, start: int) -> int:
        """Verdicts on ``toks[start:start + _CHUNK]`` (not terminated) as bits; raises on a bad id.

        The hot path of AWRS and check-first sampling, so it is one kernel call when nothing changed:
        the kernel gets one packed array of the bound arrays' addresses (see :func:`_pack_bound`),
        finds out itself whether the chart's arrays were replaced since, and answers with one int.
        ``try_token`` and the two-token case of ``try_tokens`` make the same call with scalars only.
        """
        r = _check_bound(self._check_pack, toks, start)
        if r < 0 or r >= _NO_ENTRY:
            r = self._settle(toks, start, r)
        return r

    def _settle(self, toks: tuple[int, ...] | np.ndarray, start: int, r: int) -> int:
        """The verdict bits after the check kernel answered ``r``: rebind, grow, raise or call again."""
        rec = self._rec
        while r < 0:
            code, payload = -r & 3, -r >> 2
            if code == _BAD_ID:
                self._check_id(int(toks[payload]))  # raises: the kernel's vocabulary is the compiled one
            if code != _STALE:
                if code == _LIMITED:
                    at = int(rec._meta[0]) - 1
                    rec._meta[0] = payload
                    rec._check(LIMIT, at)
                rec._grow()
                rec._meta[0] = payload
            self._bind_check()
            r = _check_bound(self._check_pack, toks, start) if type(toks) is np.ndarray else \
                _scalar_entries[len(toks) - 1](self._check_at, *toks)
        if r >= _NO_ENTRY:
            # The verdicts are exact (an older snapshot is a consistent, smaller cache; the parser
            # answered for the states it lacks), but the cache may have the entries by now.
            if self._check[0] is not self._cache.pools:
                self._bind_check()
            r -= _NO_ENTRY
        return r

    def _bind_check(self) -> None:
        """Gather the check kernel's arrays from the chart and the cache as they are now, and pack them."""
        rec, cache, info = self._rec, self._cache, self.tokenizer_info
        states, seen, _, _ = self._scratch_arrays()
        pools = cache.pools
        bound = (rec.G, cache.flags, *rec.chart, rec.max_items_per_row, *pools, cache.forest.trie_subtree,
                 info.token_bytes, info.token_offsets, _token_codes(cache), states, seen, int(rec._meta[4]))
        self._check = (pools, bound)
        self._check_pack = _pack_bound(bound)
        self._check_at = self._check_pack.ctypes.data

    def _recover(self, r: int) -> None:
        """After a kernel answered GROW or LIMIT with ``meta[2]`` = the row count before the call and
        ``meta[0]`` at the row that needed room: grow the chart (the caller calls again) or raise."""
        rec = self._rec
        n0 = int(rec._meta[2])
        if r == LIMIT:
            at = int(rec._meta[0]) - 1
            rec._meta[0] = n0
            rec._check(LIMIT, at)
        rec._grow()
        rec._meta[0] = n0

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

    def _scratch_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-matcher scratch of the mask kernels, made on first use: row states, seen stamps,
        a work stack and a byte set for :func:`_context_first`."""
        if self._scratch is None:
            n = self.compiled.grammar.n_states
            self._scratch = (np.empty(max(n, 1), np.int32), np.zeros(n + 1, np.int64), np.zeros(128, np.int64),
                             np.zeros(4, np.uint64))
        return self._scratch

    def fill_next_token_bitmask(self, bitmask, index: int = 0) -> None:
        """Write the allowed next tokens into row ``index`` of an int32 bitmask (1 bit per token, 1 = allowed).

        ``bitmask`` is a CPU ``torch.int32`` tensor or a numpy ``int32`` array, ``[batch, words]``
        or ``[words]``, with ``words >= ceil(vocab_size / 32)``; words past the vocabulary are zeroed.
        """
        decoder_active()
        c = self._rows  # the last torch bitmask's view, if this is the same tensor unchanged
        if (c is not None and c[0] is bitmask and bitmask.data_ptr() == c[1] and bitmask.shape == c[2]
                and bitmask.dtype is torch.int32):
            arr, fp = c[3], c[4]
        else:
            arr, fp = self._bitmask_rows(bitmask)
        n = arr.shape[0]
        index = operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"bitmask row {index} is out of range for a batch of {n}")
        if index < 0:
            index += n
        if self._terminated:
            arr[index] = 0
            return
        rec, cache = self._rec, self._cache
        while True:
            f = self._fill
            if f is None or f[0] is not rec.chart or f[1] is not cache.pools or f[2] != fp:
                f = self._bind_fill(arr, fp)
            r = f[4](*f[3], arr, index)
            if r == 0:
                return
            if r > 0:
                cache.ensure(self._scratch[0][:r].tolist())
            else:
                self._recover(r)

    def _bind_fill(self, arr: np.ndarray, fp: bytes) -> tuple:
        """Gather _fill_row's arguments from the chart and the cache as they are now, for rows like ``arr``."""
        rec, cache, info = self._rec, self._cache, self.tokenizer_info
        forest = cache.forest
        pools = cache.pools
        if self._memo is None:  # kept across bindings: its keys say when an entry is stale
            self._memo = (np.full((_MEMO_SLOTS, 5), -1, np.int64), np.zeros((_MEMO_SLOTS, _MEMO_TOKENS), np.int32))
        b = (rec.G, cache.flags, cache.first, cache.end_null, *rec.chart, rec.max_items_per_row, *pools,
             cache.text_bits, forest.trie_byte, forest.trie_depth, forest.trie_subtree, forest.trie_tok_ptr,
             forest.trie_tok_ids, info.token_bytes, info.token_offsets, cache.stop_ids, cache.special_ids,
             cache.special_syms, *self._scratch_arrays(), *self._memo)
        self._fill = (rec.chart, pools, fp, b, _overload(_fill_row, (*b, arr, 0)))
        return self._fill

    def _bitmask_rows(self, bitmask) -> tuple[np.ndarray, bytes]:
        """The bitmask as a 2-D int32 numpy array sharing its memory (checked), and its numba fingerprint.

        A torch tensor's view is kept for the next call, which uses it while the tensor is the same
        object with the same memory, shape and dtype: converting and checking it costs more than a
        cached fill.
        """
        arr = _bitmask_rows(bitmask, self._cache.words)
        fp = compute_fingerprint(arr)
        if isinstance(bitmask, torch.Tensor):
            self._rows = (bitmask, bitmask.data_ptr(), bitmask.shape, arr, fp)
        return arr, fp

    def brute_force_mask(self) -> np.ndarray:
        """bool[vocab_size]: every token tried with the parser. Slow and obviously correct: the oracle."""
        cache = self._cache
        mask = np.zeros(self.compiled.vocab_size, np.bool_)
        if self._terminated:
            return mask
        info = self.tokenizer_info
        rec = self._rec
        n0 = int(rec._meta[0])
        start = 0
        while start < self.compiled.vocab_size:
            start = _try_all_tokens(rec.G, rec._st, rec._org, rec._row_ptr, rec._ht_key, rec._ht_gen, rec._meta,
                                    info.token_bytes, info.token_offsets, info.token_kind,
                                    cache.special_symbol_of_token, rec.max_items_per_row, start, mask)
            status = int(rec._meta[2])
            if start < self.compiled.vocab_size:
                if status == LIMIT:
                    at = int(rec._meta[0]) - 1
                    rec._meta[0] = n0
                    rec._check(LIMIT, at)
                rec._grow()
                rec._meta[0] = n0
        if rec.is_accepting():
            mask[cache.stop_ids] = True
        return mask

    # -- jump-forward and speculative decoding (thin wrappers) -----------------------------

    def jump_forward_bytes(self, max_bytes: int = _jump_forward.DEFAULT_MAX_FORCED_BYTES) -> bytes:
        """The bytes the grammar forces next; see :func:`stencil.decode.jump_forward.jump_forward_bytes`."""
        return _jump_forward.jump_forward_bytes(self, max_bytes)

    def jump_forward_tokens(self, tokenizer, max_bytes: int = _jump_forward.DEFAULT_MAX_FORCED_BYTES) -> list[int]:
        """Canonical-safe forced tokens; see :func:`stencil.decode.jump_forward.jump_forward_tokens`."""
        return _jump_forward.jump_forward_tokens(self, tokenizer, max_bytes)

    def fill_draft_bitmasks(self, draft_ids: Sequence[int], bitmask, start_index: int = 0) -> int:
        """One mask row per draft prefix; see :func:`stencil.decode.speculative.fill_draft_bitmasks`."""
        return _speculative.fill_draft_bitmasks(self, draft_ids, bitmask, start_index)


def _bitmask_rows(bitmask, words: int) -> np.ndarray:
    """The bitmask as a 2-D int32 numpy array sharing its memory (checked)."""
    if isinstance(bitmask, torch.Tensor):
        if bitmask.device.type != "cpu":
            raise StencilError(f"fill the bitmask on the CPU and move it afterwards (got a {bitmask.device} tensor)")
        if bitmask.dtype != torch.int32:
            raise StencilError(f"a token bitmask must be int32, got {bitmask.dtype}")
        arr = bitmask.numpy()
    elif isinstance(bitmask, np.ndarray):
        if bitmask.dtype != np.int32:
            raise StencilError(f"a token bitmask must be int32, got {bitmask.dtype}")
        arr = bitmask
    else:
        raise StencilError(f"a token bitmask must be a torch.Tensor or numpy array, got {type(bitmask).__name__}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] < words:
        raise StencilError(f"bitmask of shape {tuple(arr.shape)} is too narrow: this vocabulary needs {words} words per row")
    if not arr.flags.c_contiguous:
        raise StencilError("the bitmask must be C-contiguous")
    if not arr.flags.writeable:
        raise StencilError("the bitmask must be writable")
    return arr


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_THREADS = 0


def fill_next_token_bitmasks(matchers: Sequence[GrammarMatcher], bitmask, indices: Sequence[int] | None = None,
                             threads: int | None = None) -> None:
    """Fill row ``indices[i]`` (default ``i``) of ``bitmask`` for each of ``matchers``, on parallel threads.

    The mask kernels release the GIL, so rows fill in parallel. Matchers must be distinct objects
    (a matcher's scratch space is its own); several may share a compiled grammar. ``threads``
    defaults to the number of CPUs; 1 fills in the calling thread.
    """
    global _EXECUTOR, _EXECUTOR_THREADS
    matchers = list(matchers)
    rows = list(range(len(matchers))) if indices is None else [int(i) for i in indices]
    if len(rows) != len(matchers):
        raise StencilError(f"{len(matchers)} matchers but {len(rows)} indices")
    if len({id(m) for m in matchers}) != len(matchers):
        raise StencilError("fill_next_token_bitmasks needs distinct matchers (fork() one per row)")
    n = max(1, min(threads or os.cpu_count() or 1, len(matchers)))
    if n == 1:
        for m, i in zip(matchers, rows):
            m.fill_next_token_bitmask(bitmask, i)
        return
    if _EXECUTOR is None or _EXECUTOR_THREADS < n:
        _EXECUTOR = ThreadPoolExecutor(max_workers=n, thread_name_prefix="stencil-mask")
        _EXECUTOR_THREADS = n
    for f in [_EXECUTOR.submit(m.fill_next_token_bitmask, bitmask, i) for m, i in zip(matchers, rows)]:
        f.result()


def pack_bool_mask(allowed: np.ndarray) -> np.ndarray:
    """bool[V] -> int32[ceil(V/32)] in the bitmask layout (bit t % 32 of word t // 32)."""
    n = allowed.shape[0]
    padded = np.zeros(((n + 31) // 32) * 32, np.uint8)
    padded[:n] = allowed
    return np.packbits(padded.reshape(-1, 32), axis=1, bitorder="little").view(np.int32).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@numba.njit(**_KERNEL, inline="always")
def _set_bit(out, t):
    """Allow token ``t`` in the uint32 row ``out``. Unsigned, so indexing needs no negative-index
    fix-up: a third faster on a list of a thousand ids, the bulk of a fill whose entries exist."""
    u = np.uint32(t)
    out[u >> np.uint32(5)] |= np.uint32(1) << (u & np.uint32(31))


@numba.njit(**_KERNEL, inline="always")
def _set_node_tokens(out, trie_tok_ptr, trie_tok_ids, node, got, count):
    """Set the tokens ending at trie ``node``, also into ``got[count:]`` while it has room; the new count."""
    for k in range(trie_tok_ptr[node], trie_tok_ptr[node + 1]):
        t = trie_tok_ids[k]
        _set_bit(out, t)
        if count < got.shape[0]:
            got[count] = t
        count += 1
    return count


@numba.njit(**_KERNEL)
def _or_accepted(out, mode, off, n, ids, bits, text_bits):
    """OR one state's accepted set into ``out``."""
    if mode == ACC_LIST:
        for j in range(off, off + n):
            t = ids[j]
            _set_bit(out, t)
    elif mode == ACC_BITS:
        row = bits[off]
        for w in range(row.shape[0]):
            out[w] |= row[w]
    elif mode == ACC_COMPLEMENT:
        p = off
        end = off + n
        for w in range(text_bits.shape[0]):
            m = text_bits[w]
            while p < end and (ids[p] >> 5) == w:
                m &= ~(np.uint32(1) << np.uint32(ids[p] & 31))
                p += 1
            out[w] |= m


@numba.njit(**_KERNEL)
def _walk_uncertain(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, pairs, cf, trie_byte, trie_depth,
                    trie_subtree, trie_tok_ptr, trie_tok_ids, token_bytes, token_offsets, out, got):
    """Set in ``out`` the tokens of the uncertain subtrees that the parser accepts from the last row.

    ``pairs`` = (node, after-end bytes) as stored by the mask cache, nodes in preorder; ``cf`` =
    the bytes that can follow the state's rule in this chart: a subtree none of whose after-end
    bytes is in it cannot be read, so it is skipped unwalked. Consecutive subtrees share their path
    prefix; a prefix that failed is never retried. The first tokens set go into ``got`` too. Returns
    how many it set, more than ``got`` holds if it skipped a subtree because ``out`` had it already
    (then ``got`` does not hold all the tokens accepted), or GROW / LIMIT with ``meta[0]`` left at
    the row that needed room.
    """
    n0 = meta[0]
    count = 0
    prev_tok = -1
    prev_len = 0
    applied = 0  # path bytes of the previous subtree whose rows are in place
    fail = 1 << 30  # index of the previous path's first rejected byte
    for j in range(pairs.shape[0] // 2):
        node = pairs[2 * j]
        after = pairs[2 * j + 1]
        if after != 0:
            ok = False
            for k in range(after >> 24):
                c = (after >> (8 * k)) & 0xFF
                if (cf[c >> 6] >> np.uint64(c & 63)) & np.uint64(1):
                    ok = True
                    break
            if not ok:
                continue  # no after-end byte can follow the rule here
        if _all_set(out, trie_tok_ptr, trie_tok_ids, node, trie_subtree):
            count = max(count, got.shape[0]) + 1
            continue  # another state already accepts the whole subtree
        depth = trie_depth[node]
        t0 = trie_tok_ids[trie_tok_ptr[node]]  # any token of the subtree spells the node's path
        p0 = token_offsets[t0]
        lcp = 0
        if prev_tok >= 0:
            q0 = token_offsets[prev_tok]
            lim = min(depth, prev_len)
            while lcp < lim and token_bytes[p0 + lcp] == token_bytes[q0 + lcp]:
                lcp += 1
        if lcp > fail:
            continue  # the path goes through the byte the previous one failed on
        keep = min(lcp, applied)
        meta[0] = n0 + keep
        prev_tok = t0
        prev_len = depth
        ok = True
        for k in range(keep, depth):
            r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, token_bytes[p0 + k], max_items)
            if r < 0:
                return r
            if r == 0:
                applied = k
                fail = k
                ok = False
                break
        if not ok:
            continue
        applied = depth
        fail = 1 << 30
        count = _set_node_tokens(out, trie_tok_ptr, trie_tok_ids, node, got, count)
        i = node + 1
        end = node + trie_subtree[node]
        while i < end:
            meta[0] = n0 + trie_depth[i] - 1
            r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, trie_byte[i], max_items)
            if r < 0:
                return r
            if r == 0:
                i += trie_subtree[i]
                continue
            count = _set_node_tokens(out, trie_tok_ptr, trie_tok_ids, i, got, count)
            i += 1
    meta[0] = n0
    return count


@numba.njit(**_KERNEL)
def _lookup_states(G, flags, st, org, row_ptr, meta, state_entry, states, seen):
    """The distinct states whose cache entries decide the mask at the last row, into ``states``.

    These are the *kernel* items' states (origin before the current row: scanned or completed
    here), or the root's start on row 0: every item predicted on this row is re-derived inside
    its kernel ancestor's own sub-chart (see :mod:`stencil.grammar.masks`). Items without edges
    contribute nothing, and neither do items another kernel item subsumes (:func:`_drop_subsumed`).
    Returns (count, how many have no entry yet).
    """
    n0 = meta[0]
    cur = n0 - 1
    seen[-1] += 1
    stamp = seen[-1]
    if cur == 0:
        states[0] = G[0][G[9]]
        return 1, 1 if state_entry[states[0]] < 0 else 0
    ns = 0
    for k in range(row_ptr[cur], row_ptr[n0]):
        s = st[k]
        if org[k] < cur and flags[s] != 0 and seen[s] != stamp:
            seen[s] = stamp
            states[ns] = s
            ns += 1
    if 2 <= ns <= _SUBSUME_MAX and 2 * ns <= states.shape[0]:
        ns = _drop_subsumed(G, st, org, row_ptr[cur], row_ptr[n0], cur, flags, states, ns)
    missing = 0
    for j in range(ns):
        if state_entry[states[j]] < 0:
            missing += 1
    return ns, missing


_SUBSUME_MAX = 16  # rows with more kernel states skip the subsumption test (its cost is quadratic)


@numba.njit(**_KERNEL, inline="always")
def _calls_nullable_into(G, p, t):
    """Has state p a call edge over a nullable rule whose return lands in state t?"""
    rule_nullable, edge_ptr, edge_rule, edge_target = G[1], G[4], G[7], G[8]
    for e in range(edge_ptr[p], edge_ptr[p + 1]):
        r = edge_rule[e]
        if r >= 0 and rule_nullable[r] != 0 and edge_target[e] == t:
            return True
    return False


@numba.njit(**_KERNEL)
def _drop_subsumed(G, st, org, lo, hi, cur, flags, states, ns):
    """Drop from ``states[:ns]`` each state t whose one kernel item (t, o) another kept kernel item
    (p, o) subsumes: p has a call edge to t over a nullable rule (the whitespace before a JSON
    value, an optional part). The closure of (p, o) holds (t, o), so p's sub-chart derives every
    token t's does and p's cache entry accepts (or leaves uncertain, for the same check) every
    token t's does: the mask needs no entry for t, and t is not classified on this visit. A state
    with several kernel items, or covered only by a dropped state, is kept. Returns the new count.

    ``states[len - ns:]`` is scratch: each listed state's kernel origin (-3 before its first
    kernel item is seen, -1 when it has several), then -2 once dropped.
    """
    base = states.shape[0] - ns
    for j in range(ns):
        states[base + j] = -3  # no kernel item seen yet
    for k in range(lo, hi):
        s = st[k]
        if org[k] >= cur or flags[s] == 0:
            continue
        for j in range(ns):
            if states[j] == s:
                o = states[base + j]
                states[base + j] = org[k] if o == -3 else (o if o == org[k] else -1)
                break
    dropped = False
    for j in range(ns):
        t, o = states[j], states[base + j]
        if o < 0:
            continue
        for i in range(ns):
            p = states[i]
            # a cover is kept and of the same one origin (not -2 dropped, not -1 several)
            if i != j and states[base + i] == o and _calls_nullable_into(G, p, t):
                states[base + j] = -2
                dropped = True
                break
    if not dropped:
        return ns
    m = 0
    for j in range(ns):
        if states[base + j] != -2:
            states[m] = states[j]
            m += 1
    return m


@numba.njit(**_KERNEL, inline="always")
def _all_set(out, trie_tok_ptr, trie_tok_ids, node, trie_subtree):
    """Are all tokens of the subtree at ``node`` already allowed in ``out``?"""
    for k in range(trie_tok_ptr[node], trie_tok_ptr[node + trie_subtree[node]]):
        t = trie_tok_ids[k]
        if (out[t >> 5] >> np.uint32(t & 31)) & np.uint32(1) == 0:
            return False
    return True


@numba.njit(**_KERNEL)
def _completion_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, rule, origin):
    """Make row ``meta[0]`` the chart's state right after the instance of ``rule`` begun at row ``origin`` ends.

    That is Earley completion into a fresh row: every item of row ``origin`` waiting on the rule,
    stepped over it, then closed. Returns the row's end (``meta[0]`` then counts it), or GROW/LIMIT.
    """
    edge_ptr, edge_rule, edge_target = G[4], G[7], G[8]
    row = meta[0]
    if row + 1 >= row_ptr.shape[0]:
        return GROW
    meta[1] += 1
    gen = meta[1]
    begin = row_ptr[row]
    cap = _row_cap(st, ht_key, begin, max_items)
    end = begin
    for k in range(row_ptr[origin], row_ptr[origin + 1]):
        c = st[k]
        for e in range(edge_ptr[c], edge_ptr[c + 1]):
            if edge_rule[e] == rule:
                new = _add(st, org, ht_key, ht_gen, gen, end, cap, edge_target[e], org[k])
                if new < 0:
                    return _full(end, begin, max_items)
                end = new
    return _close_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, row, begin, end, gen)


@numba.njit(**_KERNEL)
def _seed_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, s, origin):
    """Make row ``meta[0]`` the closure of the single item ``(s, origin)``: what that item alone reads next.

    Returns the row's end (``meta[0]`` then counts it), or GROW/LIMIT.
    """
    row = meta[0]
    if row + 1 >= row_ptr.shape[0]:
        return GROW
    meta[1] += 1
    gen = meta[1]
    begin = row_ptr[row]
    cap = _row_cap(st, ht_key, begin, max_items)
    end = _add(st, org, ht_key, ht_gen, gen, begin, cap, s, origin)
    if end < 0:
        return _full(begin, begin, max_items)
    return _close_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, row, begin, end, gen)


@numba.njit(**_KERNEL)
def _walk_suffixes(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, ids, off, out, got):
    """Set the tokens of the suffix trie at ``ids[off:]`` whose suffix the chart reads from its last row.

    (The last row being a completion row, see :func:`_completion_row` and
    :func:`stencil.grammar.masks._suffix_block`.) The first of them go into ``got`` too. Returns how
    many it set, or GROW / LIMIT.
    """
    n = ids[off]
    base = off + 2
    n0 = meta[0]
    count = 0
    i = 1
    while i < n:
        depth = ids[base + n + i]
        meta[0] = n0 + depth - 1
        r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, ids[base + i], max_items)
        if r < 0:
            return r
        if r == 0:
            i += ids[base + 2 * n + i]
            continue
        tp = base + 3 * n
        tid = base + 4 * n + 1
        for k in range(ids[tp + i], ids[tp + i + 1]):
            t = ids[tid + k]
            _set_bit(out, t)
            if count < got.shape[0]:
                got[count] = t
            count += 1
        i += 1
    return count


@numba.njit(**_KERNEL)
def _context_first(G, first, end_null, st, org, row_ptr, rule, origin, work, cf):
    """OR into ``cf`` the bytes that can come right after the instance of ``rule`` begun at row ``origin`` ends.

    Those are the FIRST bytes of its callers' continuations (items of row ``origin`` waiting on
    the rule), and, where a continuation can end empty, of the callers' callers, through the
    chart. Too deep a chain sets every byte (conservative).
    """
    state_rule, edge_ptr, edge_rule, edge_target = G[2], G[4], G[7], G[8]
    work[0] = rule
    work[1] = origin
    n = 1
    expansions = 0
    while n > 0:
        n -= 1
        r = work[2 * n]
        o = work[2 * n + 1]
        expansions += 1
        if expansions > 64:
            for w in range(4):
                cf[w] = ~np.uint64(0)
            return
        for k in range(row_ptr[o], row_ptr[o + 1]):
            c = st[k]
            for e in range(edge_ptr[c], edge_ptr[c + 1]):
                if edge_rule[e] != r:
                    continue
                q = edge_target[e]
                for w in range(4):
                    cf[w] |= first[q, w]
                if end_null[q]:
                    if 2 * n + 2 > work.shape[0]:
                        for w in range(4):
                            cf[w] = ~np.uint64(0)
                        return
                    work[2 * n] = state_rule[c]
                    work[2 * n + 1] = org[k]
                    n += 1


@numba.njit(**_KERNEL)
def _fill_row(G, flags, first, end_null, st, org, row_ptr, ht_key, ht_gen, meta, max_items, state_entry, ent, ids,
              bits, text_bits, trie_byte, trie_depth, trie_subtree, trie_tok_ptr, trie_tok_ids, token_bytes,
              token_offsets, stop_ids, special_ids, special_syms, states, seen, work, cf, memo, memo_tok, bitmask,
              index):
    """Fill ``bitmask[index]`` from the chart's last row.

    Which of a kernel item's uncertain tokens a suffix trie finds depends only on its entry, its
    rule and the rows up to its origin (the completion row is built from them), so the tokens
    found are remembered in ``memo`` / ``memo_tok`` under (state, entry, origin, ``meta[3]``): the
    next fills inside the same string or number, whose kernel item keeps its origin, set them
    directly. ``meta[3]`` changes whenever rows could have been rewritten (rollback, reset). A
    subtree walk starts from a fresh row holding the item's closure alone (:func:`_seed_row`),
    not from the current row, so it too depends only on the item and the rows up to its origin,
    and is remembered the same way: a token the current row reads through another kernel item
    derives inside that item's own sub-chart, so that item's entry accepts it or its uncertain
    check finds it (the exactness argument of :mod:`stencil.grammar.masks`).

    Returns 0 when done; k > 0 when k row states have no cache entry yet (they are in
    ``states[:k]``: compute them and call again); GROW or LIMIT from the parser (``meta[0]`` then
    points at the row that needed room, ``meta[2]`` is the row count to restore).
    """
    out = bitmask[index].view(np.uint32)
    n0 = meta[0]
    meta[2] = n0
    ns, missing = _lookup_states(G, flags, st, org, row_ptr, meta, state_entry, states, seen)
    if missing > 0:
        m = 0
        for j in range(ns):
            if state_entry[states[j]] < 0:
                states[m] = states[j]
                m += 1
        return m
    out[:] = 0
    for j in range(ns):
        e = state_entry[states[j]]
        _or_accepted(out, ent[e, 0], ent[e, 1], ent[e, 2], ids, bits, text_bits)
    cur = n0 - 1
    for j in range(ns):
        s = states[j]
        e = state_entry[s]
        if ent[e, 4] == 0:
            continue
        # The kernel items in this state: (rule, origin) of their instances.
        for k in range(row_ptr[cur], row_ptr[n0] if cur > 0 else row_ptr[cur] + 1):
            if cur > 0 and (st[k] != s or org[k] >= cur):
                continue
            rule = G[9] if cur == 0 else G[2][s]
            origin = 0 if cur == 0 else org[k]
            slot = (s * 31 + origin) & (memo.shape[0] - 1)
            if memo[slot, 0] == s and memo[slot, 1] == e and memo[slot, 2] == origin and memo[slot, 3] == meta[3]:
                for i in range(memo[slot, 4]):
                    t = memo_tok[slot, i]
                    _set_bit(out, t)
                continue
            memo[slot, 0] = -1
            meta[0] = n0
            if ent[e, 5] >= 0:
                # Suffix trie: complete the rule into a fresh row once, read the distinct suffixes.
                r = _completion_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, rule, origin)
                if r < 0:
                    return r
                r = _walk_suffixes(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, ids, ent[e, 5], out,
                                   memo_tok[slot])
            else:
                for w in range(4):
                    cf[w] = np.uint64(0)
                _context_first(G, first, end_null, st, org, row_ptr, rule, origin, work, cf)
                if cur > 0:  # (row 0 is the closure of its one kernel item already)
                    r = _seed_row(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, s, origin)
                    if r < 0:
                        return r
                r = _walk_uncertain(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items,
                                    ids[ent[e, 3]:ent[e, 3] + 2 * ent[e, 4]], cf, trie_byte, trie_depth, trie_subtree,
                                    trie_tok_ptr, trie_tok_ids, token_bytes, token_offsets, out, memo_tok[slot])
            if r < 0:
                return r
            if r <= memo_tok.shape[1]:
                memo[slot, 0], memo[slot, 1], memo[slot, 2], memo[slot, 3], memo[slot, 4] = s, e, origin, meta[3], r
    meta[0] = n0
    for j in range(special_ids.shape[0]):
        meta[0] = n0
        r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, special_syms[j], max_items)
        if r < 0:
            return r
        if r > 0:
            t = special_ids[j]
            _set_bit(out, t)
    meta[0] = n0
    if is_accepting(G, st, org, row_ptr, meta):
        for t in stop_ids:
            _set_bit(out, t)
    return 0


@numba.njit(**_KERNEL)
def _in_sorted(a, lo, hi, x):
    """Is x in the sorted slice a[lo:hi]?"""
    i = _first_at_least(a, lo, hi, x)
    return i < hi and a[i] == x


@numba.njit(**_KERNEL, inline="always")
def _cache_verdict(state_entry, ent, ids, bits, trie_subtree, states, ns, node, t):
    """The cache's verdict on text token t (trie node ``node``) from the row's ``ns`` looked-up
    states: _ACCEPTED, _REJECTED or _ASK_PARSER."""
    uncertain = False
    for j in range(ns):
        e = state_entry[states[j]]
        mode, off, n = ent[e, 0], ent[e, 1], ent[e, 2]
        if mode == ACC_LIST:
            if _in_sorted(ids, off, off + n, t):
                return _ACCEPTED
        elif mode == ACC_BITS:
            if (bits[off, t >> 5] >> np.uint32(t & 31)) & np.uint32(1):
                return _ACCEPTED
        elif mode == ACC_COMPLEMENT:
            if not _in_sorted(ids, off, off + n, t):
                return _ACCEPTED
        if not uncertain:
            # The last uncertain subtree starting at or before the token's node: does it contain it?
            base = ent[e, 3]
            lo, hi = 0, ent[e, 4]
            while lo < hi:
                mid = (lo + hi) >> 1
                if ids[base + 2 * mid] <= node:
                    lo = mid + 1
                else:
                    hi = mid
            if lo > 0:
                top = ids[base + 2 * (lo - 1)]
                if node < top + trie_subtree[top]:
                    uncertain = True
    return _ASK_PARSER if uncertain else _REJECTED


def _overload(kernel, args: tuple, extra: tuple = ()):
    """``kernel`` compiled for the types of ``args`` followed by the numba types ``extra``, as a plain callable.

    Calling a compiled overload directly skips the dispatcher's typing of every argument. With
    twenty to thirty arrays that costs a few µs hot and about 10 µs when the CPU caches are cold
    (in a decode loop, right after the model wrote its logits): most of a check, or of a cached
    mask fill. The types are the ones numba gives these very arguments, so the overload is the
    one the dispatcher would pick; callers look it up again whenever they gather new arguments.
    The key is numba's own type fingerprint of each argument (what its dispatcher keys its type
    cache on; a few µs), because typing thirty arguments with ``numba.typeof`` costs a few hundred
    µs, which a new matcher (every SMC fork) and every growth of the chart would pay.
    """
    key = (kernel, tuple(map(compute_fingerprint, args)), extra)
    f = _overloads.get(key)
    if f is None:
        types = [numba.typeof(a, numba.core.typing.typeof.Purpose.argument) for a in args]
        f = _overloads[key] = kernel.compile((*types, *extra))
    return f


@numba.njit(**_KERNEL)
def _accept_token(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, token_code, token_bytes, token_offsets, t):
    """Advance the chart over token ``t`` (an id in the vocabulary; ``token_code`` is :func:`_token_codes`).

    Returns how many symbols it consumed, _TOKEN_REJECTED (nothing changes), _TOKEN_STOP (a stop
    token the grammar allows now; the chart does not change), or GROW / LIMIT with ``meta[2]`` = the
    row count before the call and ``meta[0]`` at the row that needed room.
    """
    n0 = meta[0]
    meta[2] = n0
    code = token_code[t]
    if code <= _CODE_SYMBOL:
        r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, np.int32(_CODE_SYMBOL - code), max_items)
        return 1 if r > 0 else (_TOKEN_REJECTED if r == 0 else r)
    if code == _CODE_STOP:
        return _TOKEN_STOP if is_accepting(G, st, org, row_ptr, meta) else _TOKEN_REJECTED
    if code == _CODE_OTHER:
        return _TOKEN_REJECTED
    for j in range(token_offsets[t], token_offsets[t + 1]):
        r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, np.int32(token_bytes[j]), max_items)
        if r < 0:
            return r
        if r == 0:
            meta[0] = n0
            return _TOKEN_REJECTED
    return token_offsets[t + 1] - token_offsets[t]


@numba.njit(**_KERNEL)
def _check_tokens(G, flags, st, org, row_ptr, ht_key, ht_gen, meta, max_items, state_entry, ent, ids, bits,
                  trie_subtree, token_bytes, token_offsets, token_code, states, seen, toks, start):
    """Would each token of ``toks[start:start + _CHUNK]`` be accepted from the chart's last row?

    ``toks`` is an int64 array or a tuple of ints (no array to build for a pair); ``token_code`` is
    :func:`_token_codes`. Each token on its own; the chart is left as it was. Text tokens the cache
    decides cost a lookup; uncertain ones (or all, while a row state has no cache entry) are parsed
    byte by byte in scratch rows past the last one. Returns the verdicts as bits (bit i - start set
    for an accepted ``toks[i]``), plus _NO_ENTRY if a row state has no cache entry, or -(4 * payload
    + code) on failure (see _BAD_ID).
    """
    n0 = meta[0]
    ns, missing = _lookup_states(G, flags, st, org, row_ptr, meta, state_entry, states, seen)
    vocab = token_code.shape[0]
    verdicts = np.int64(0)
    for i in range(start, min(len(toks), start + _CHUNK)):
        t = toks[i]
        if t < 0 or t >= vocab:
            return -(4 * np.int64(i) + _BAD_ID)
        bit = np.int64(1) << np.int64(i - start)
        code = token_code[t]
        if code <= _CODE_SYMBOL:
            r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, np.int32(_CODE_SYMBOL - code), max_items)
            if r < 0:
                return -(4 * n0 + (_GROWS if r == GROW else _LIMITED))
            meta[0] = n0
            if r > 0:
                verdicts |= bit
            continue
        if code == _CODE_STOP:
            if is_accepting(G, st, org, row_ptr, meta):
                verdicts |= bit
            continue
        if code == _CODE_OTHER:
            continue
        if missing == 0:
            c = _cache_verdict(state_entry, ent, ids, bits, trie_subtree, states, ns, code - 1, t)
            if c != _ASK_PARSER:
                if c == _ACCEPTED:
                    verdicts |= bit
                continue
        ok = True
        for j in range(token_offsets[t], token_offsets[t + 1]):
            r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, np.int32(token_bytes[j]), max_items)
            if r < 0:
                return -(4 * n0 + (_GROWS if r == GROW else _LIMITED))
            if r == 0:
                ok = False
                break
        meta[0] = n0
        if ok:
            verdicts |= bit
    return verdicts | _NO_ENTRY if missing > 0 else verdicts


def _array_type(dtype, ndim: int = 1) -> types.Array:
    return types.Array(dtype, ndim, "C")


# The check kernel's arguments (those of _check_tokens but the tokens), and the count of the chart's
# array replacements when they were bound (meta[4], see Recognizer._new_chart): the types _pack_into
# accepts, nothing else.
_BOUND_TYPES = (
    types.Tuple([_array_type(types.int32), _array_type(types.uint8), _array_type(types.int32),
                 _array_type(types.uint8)] + [_array_type(types.int32)] * 5 + [types.int32]),  # the grammar
    _array_type(types.uint8),  # state flags
    *[_array_type(types.int32)] * 3, *[_array_type(types.int64)] * 3, types.int64,  # st .. meta, max_items
    _array_type(types.int32), _array_type(types.int32, 2), _array_type(types.int32), _array_type(types.uint32, 2),
    _array_type(types.int32), _array_type(types.uint8), _array_type(types.int64), _array_type(types.int32),
    _array_type(types.int32), _array_type(types.int64),  # trie_subtree .. seen
    types.int64,  # replacements
)
_PACK_SLOTS = 29  # the grammar's nine arrays and root, then one slot per other argument
_UNBOUND = np.zeros(3 * _PACK_SLOTS, np.int64)  # meta's address 0: the kernel asks to bind first
_UNBOUND_AT = _UNBOUND.ctypes.data


@numba.njit(**_KERNEL, inline="always")
def _put(out, slot, a):
    out[3 * slot] = a.ctypes.data
    for d in range(a.ndim):
        out[3 * slot + 1 + d] = a.shape[d]


@numba.njit(**_KERNEL)
def _pack_into(out, G, flags, st, org, row_ptr, ht_key, ht_gen, meta, max_items, state_entry, ent, ids, bits,
               trie_subtree, token_bytes, token_offsets, token_code, states, seen, replacements):
    """Write :func:`_pack_bound`'s pack into ``out``."""
    _put(out, 0, G[0])
    _put(out, 1, G[1])
    _put(out, 2, G[2])
    _put(out, 3, G[3])
    _put(out, 4, G[4])
    _put(out, 5, G[5])
    _put(out, 6, G[6])
    _put(out, 7, G[7])
    _put(out, 8, G[8])
    out[27] = G[9]
    _put(out, 10, flags)
    _put(out, 11, st)
    _put(out, 12, org)
    _put(out, 13, row_ptr)
    _put(out, 14, ht_key)
    _put(out, 15, ht_gen)
    _put(out, 16, meta)
    out[51] = max_items
    _put(out, 18, state_entry)
    _put(out, 19, ent)
    _put(out, 20, ids)
    _put(out, 21, bits)
    _put(out, 22, trie_subtree)
    _put(out, 23, token_bytes)
    _put(out, 24, token_offsets)
    _put(out, 25, token_code)
    _put(out, 26, states)
    _put(out, 27, seen)
    out[84] = replacements


def _pack_bound(bound: tuple) -> np.ndarray:
    """int64[3 * _PACK_SLOTS]: per slot (data address, shape[0], shape[1]) of an array, or (value, 0, 0).

    Unboxing an array argument reads its Python object, shape and dtype: with about thirty arrays
    and the CPU caches cold (right after the model wrote its logits) that cost about 3 µs a check,
    as much as the kernel's own work. One packed array costs one unboxing; :func:`_check_bound`
    rebuilds the views from it. The kernel trusts these addresses, so :func:`_pack_into` is
    compiled for exactly :data:`_BOUND_TYPES` and nothing else (an array of another dtype, rank or
    layout raises TypeError), and the caller keeps ``bound`` alive as long as the pack is used. The
    chart may replace its arrays at any time (when it grows); the kernel compares the count of
    replacements packed here with meta[4] (meta itself is never replaced) before it reads anything else.
    """
    out = np.zeros(3 * _PACK_SLOTS, np.int64)
    _pack_into(out, *bound)
    return out


@intrinsic
def _array_at(typingctx, address, shape, dtype):
    """A C-contiguous array view of ``shape`` (an int, or a pair for 2-D) over memory at ``address``.

    The view owns nothing (no meminfo, no parent), as the kernels' arguments need nothing else when
    they run without reference counting."""
    ndim = 1 if isinstance(shape, types.Integer) else len(shape)
    aryty = types.Array(dtype.instance_type, ndim, "C")

    def codegen(context, builder, signature, args):
        addr, shp, _ = args
        intp = context.get_value_type(types.intp)
        dims = [shp] if ndim == 1 else cgutils.unpack_tuple(builder, shp)
        itemsize = intp(context.get_abi_sizeof(context.get_data_type(aryty.dtype)))
        strides = [itemsize] if ndim == 1 else [builder.mul(dims[1], itemsize), itemsize]
        ary = make_array(aryty)(context, builder)
        data = builder.inttoptr(addr, context.get_value_type(types.CPointer(aryty.dtype)))
        populate_array(ary, data=data, shape=cgutils.pack_array(builder, dims),
                       strides=cgutils.pack_array(builder, strides), itemsize=itemsize, meminfo=None)
        return ary._getvalue()

    return aryty(address, shape, dtype), codegen


@numba.njit(**_KERNEL, inline="always")
def _check_packed(b, toks, start):
    """:func:`_check_tokens` on the arrays packed into ``b`` by :func:`_pack_bound`, or -(4 + _STALE)
    if the chart's arrays were replaced since they were packed (or nothing was packed yet)."""
    if b[48] == 0 or _array_at(b[48], b[49], np.int64)[4] != b[84]:
        return -(4 + _STALE)
    G = (_array_at(b[0], b[1], np.int32), _array_at(b[3], b[4], np.uint8), _array_at(b[6], b[7], np.int32),
         _array_at(b[9], b[10], np.uint8), _array_at(b[12], b[13], np.int32), _array_at(b[15], b[16], np.int32),
         _array_at(b[18], b[19], np.int32), _array_at(b[21], b[22], np.int32), _array_at(b[24], b[25], np.int32),
         np.int32(b[27]))
    return _check_tokens(
        G, _array_at(b[30], b[31], np.uint8), _array_at(b[33], b[34], np.int32), _array_at(b[36], b[37], np.int32),
        _array_at(b[39], b[40], np.int32), _array_at(b[42], b[43], np.int64), _array_at(b[45], b[46], np.int64),
        _array_at(b[48], b[49], np.int64), b[51], _array_at(b[54], b[55], np.int32),
        _array_at(b[57], (b[58], b[59]), np.int32), _array_at(b[60], b[61], np.int32),
        _array_at(b[63], (b[64], b[65]), np.uint32), _array_at(b[66], b[67], np.int32),
        _array_at(b[69], b[70], np.uint8), _array_at(b[72], b[73], np.int64), _array_at(b[75], b[76], np.int32),
        _array_at(b[78], b[79], np.int32), _array_at(b[81], b[82], np.int64), toks, start)


@numba.njit(**_KERNEL)
def _check_bound(b, toks, start):
    """:func:`_check_packed` for an array of tokens (``try_tokens``)."""
    return _check_packed(b, toks, start)


@numba.njit(**_KERNEL)
def _check_one(at, t):
    """:func:`_check_packed` for token ``t``, the pack at address ``at``."""
    return _check_packed(_array_at(at, 3 * _PACK_SLOTS, np.int64), (t,), 0)


@numba.njit(**_KERNEL)
def _check_two(at, t, u):
    """:func:`_check_packed` for tokens ``t`` and ``u``, the pack at address ``at``."""
    return _check_packed(_array_at(at, 3 * _PACK_SLOTS, np.int64), (t, u), 0)


def _check_entry_points() -> tuple:
    """:func:`_check_one` and :func:`_check_two` compiled for int64 scalars, as plain callables; and
    :func:`_pack_into` compiled for :data:`_BOUND_TYPES` only.

    Calling a compiled overload directly skips the dispatcher's typing of the arguments, and
    unboxing scalars is cheaper than unboxing an array and a tuple: with the CPU caches cold (right
    after the logits pass) the call costs about 2.4 µs instead of 3.8 on this machine. The argument
    types never change, so they are compiled (or loaded from numba's cache) once per process.
    """
    _pack_into.compile((_array_type(types.int64), *_BOUND_TYPES))
    _pack_into.disable_compile()
    return _check_one.compile((types.int64,) * 2), _check_two.compile((types.int64,) * 3)


@numba.njit(**_KERNEL)
def _try_all_tokens(G, st, org, row_ptr, ht_key, ht_gen, meta, token_bytes, token_offsets, token_kind,
                    special_sym, max_items, start, out):
    """Set out[t] for tokens t >= start that the parser accepts, one token at a time from the last row.

    Stops early on GROW or LIMIT, returning that token (status in ``meta[2]``, ``meta[0]`` at the
    row that needed room); returns ``out.shape[0]`` when done.
    """
    n0 = meta[0]
    for t in range(start, out.shape[0]):
        meta[0] = n0
        if special_sym[t] >= 0:
            a, b = 0, 1
        elif token_kind[t] == KIND_TEXT:
            a, b = token_offsets[t], token_offsets[t + 1]
        else:
            continue
        ok = True
        for j in range(a, b):
            sym = special_sym[t] if special_sym[t] >= 0 else np.int32(token_bytes[j])
            r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, sym, max_items)
            if r < 0:
                meta[2] = r
                return t
            if r == 0:
                ok = False
                break
        out[t] = ok
    meta[0] = n0
    return out.shape[0]
