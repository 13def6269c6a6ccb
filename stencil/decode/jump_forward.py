"""Jump-forward: the bytes a grammar forces next, and the tokens that are safe to force for them.

When the grammar leaves exactly one possible next byte (say after ``{"name`` in a grammar with
fixed keys, ``": "`` must follow), a decoder can append it without asking the model. Doing this
per byte is easy; doing it per *token* is where care is needed, because the model was trained on
the tokenizer's own (canonical) tokenization, and forcing tokens that split the text differently
shows it a sequence it has never seen.

Forced bytes
------------
:func:`jump_forward_bytes` walks the chart: while the grammar is not complete (an accepting state
means stopping is possible too, so nothing is forced) and the last row can scan exactly one
symbol, and that symbol is a byte (a special token the grammar names is not text), it takes that
byte. One numba call runs the whole walk; the matcher is left as it was.

Canonical-safe forced tokens
----------------------------
Let ``F`` be the forced bytes, cut to their longest prefix ``F'`` of complete UTF-8 characters
(text is what a tokenizer encodes). Whatever the model writes next, the output continues with
``F' + C`` for some continuation ``C`` the grammar allows. We want tokens ``t1..tk`` such that the
tokenizer's encoding of ``F' + C`` starts with ``t1..tk`` for *every* allowed ``C``.

Call a byte position ``j < |F'|`` *open* if some text token ``u`` spells ``F'[j:]`` followed by at
least one more byte and the grammar allows ``u`` there, i.e. it accepts ``u``'s extra bytes after
``F'``. In the encoding of ``F' + C`` a token that straddles the end of ``F'`` spells ``F'[j:] + w``
with ``w`` a prefix of ``C``, so it starts at an open position. With no straddling token, the
encoding has a boundary at ``|F'|``. Either way it has a boundary at some ``q`` in
``Q = {open positions} ∪ {|F'|}`` and no merge ever crossed ``q``. For BPE this means the part
before ``q`` is the encoding of ``F'[:q]`` alone: merges are applied highest priority first, and
while no pair crosses ``q`` the pairs on the left are the same ones, picked in the same order.
So the tokens that are certainly a prefix of the truth are the **longest common prefix of
encode(F'[:q]) over q ∈ Q**. That is what :func:`jump_forward_tokens` returns.

This is stricter than the usual back-off, "drop trailing tokens that a longer allowed token could
extend", which only looks at suffixes that start at token boundaries of ``encode(F')``. BPE is not
left-stable: a straddling token that starts *inside* the last token can change earlier merges.
With merges ``c d > b cd > a b > x a > ab c``, ``"xabc"`` encodes as ``x|abc`` but ``"xabcd"`` as
``xa|bcd``. Taking the common prefix over every candidate boundary covers that case.

The assumptions, and what happens when they fail:

* Encodings are *mid-text*: the forced bytes follow earlier output, so the tokenizer's
  start-of-text behaviour (SentencePiece's added leading ``▁``) must not apply. :class:`TextEncoder`
  encodes ``anchor + text`` with a few anchors (a newline, a letter, ...) and keeps the tokens after
  the anchor. It uses the result only when the anchor's tokens end exactly at the anchor and the
  rest spells ``text`` byte for byte. If no anchor splits cleanly, or the tokenizer rewrites the
  text (a normalizer such as NFC, or a special token spelled in the text), no token is forced.
* The pre-tokenizer splits ``F'[:q]`` as it splits that stretch of ``F' + C``. SentencePiece has
  no pre-tokenizer. For the GPT-2, Llama-3 and Qwen2 split patterns this is an empirical claim,
  and ``tests/decode/test_jump_forward.py`` checks it on the six tokenizers.
* The left boundary is given. Forced tokens start where the model's last token ended. If the
  model's own tokenization of the whole output would have merged across that point, no choice of
  forced tokens can undo it. The matcher remembers bytes, not token ids, so it cannot tell.
* Open positions inside a multi-byte character are rounded down to the character's start. The
  tokenizer encodes text, not byte strings, so the cut is made a little earlier.

Forcing fewer tokens is always safe: the decoder just samples the rest.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from stencil.decode.parser import GROW, LIMIT, advance, is_accepting, single_scan_symbol
from stencil.errors import StencilError
from stencil.grammar.vocab import TokenizerInfo, trie_find

__all__ = ["DEFAULT_MAX_FORCED_BYTES", "TextEncoder", "jump_forward_bytes", "jump_forward_tokens"]

DEFAULT_MAX_FORCED_BYTES = 4096

# Texts put before the one to encode, tried in order until one splits cleanly from it (see
# TextEncoder). A newline separates most texts from what precedes them in every pre-tokenizer
# we know; a letter or a digit covers texts that start with whitespace or a newline.
_ANCHORS = ("\n", "a", "0", ";")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _forced_run(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, out, start):
    """Advance over forced bytes into ``out[start:]`` until none is forced or ``out`` is full.

    Returns how many bytes ``out`` now holds. ``meta[2]`` is 1 when done, or GROW / LIMIT from the
    parser (the bytes before it stay consumed: grow and call again with ``start`` = the result).
    """
    n = start
    while n < out.shape[0]:
        if is_accepting(G, st, org, row_ptr, meta):
            break
        s = single_scan_symbol(G, st, row_ptr, meta)
        if s < 0 or s > 255:
            break
        r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, s, max_items)
        if r < 0:
            meta[2] = r
            return n
        if r == 0:
            break  # cannot happen: the row just said it scans s
        out[n] = s
        n += 1
    meta[2] = 1
    return n


@numba.njit(cache=True, nogil=True)
def _open_positions(G, st, org, row_ptr, ht_key, ht_gen, meta, max_items, forced, first,
                    trie_byte, trie_depth, trie_subtree, trie_tok_ptr, out):
    """Set ``out[j]`` for each ``j >= first`` at which a token extending ``forced[j:]`` is allowed.

    The chart's last row is the state after all of ``forced``. A token extends ``forced[j:]`` when
    it spells it plus at least one more byte; it is allowed when the parser accepts those extra
    bytes. Each check is a walk over the trie subtree below ``forced[j:]`` that skips rejected
    prefixes and stops at the first allowed token. Returns 0, or GROW / LIMIT with ``meta[0]``
    at the row that needed room (the caller grows, restores ``meta[0]`` and calls again).
    """
    n_end = meta[0]
    size = forced.shape[0]
    for j in range(first, size):
        node = trie_find(trie_byte, trie_subtree, forced[j:])
        if node < 0:
            continue
        base = trie_depth[node]
        i = node + 1
        stop = node + trie_subtree[node]
        found = False
        while i < stop:
            meta[0] = n_end + trie_depth[i] - base - 1
            r = advance(G, st, org, row_ptr, ht_key, ht_gen, meta, trie_byte[i], max_items)
            if r < 0:
                return r
            if r == 0:
                i += trie_subtree[i]
                continue
            if trie_tok_ptr[i] < trie_tok_ptr[i + 1]:
                found = True
                break
            i += 1
        meta[0] = n_end
        out[j] = found
    return 0


# ----------------------------------------------------------------------------------------------
# Forced bytes
# ----------------------------------------------------------------------------------------------


def jump_forward_bytes(matcher: Any, max_bytes: int = DEFAULT_MAX_FORCED_BYTES) -> bytes:
    """The bytes the grammar forces next from ``matcher``'s state (at most ``max_bytes``).

    Empty when the grammar is complete (stopping is allowed), when more than one symbol may come
    next, when the next symbol is a special token, or when the matcher is terminated. The matcher
    is not changed.
    """
    if max_bytes < 0:
        raise StencilError(f"max_bytes must be >= 0, got {max_bytes}")
    if matcher.is_terminated():
        return b""
    rec = matcher._rec
    n0 = int(rec._meta[0])
    try:
        return _run_forced(rec, max_bytes).tobytes()
    finally:
        rec._meta[0] = n0


def _run_forced(rec: Any, max_bytes: int) -> np.ndarray:
    """Consume the forced bytes on ``rec`` (the caller restores it) and return them."""
    out = np.empty(max_bytes, np.uint8)
    n = 0
    while True:
        n = _forced_run(rec.G, rec._st, rec._org, rec._row_ptr, rec._ht_key, rec._ht_gen, rec._meta,
                        rec.max_items_per_row, out, n)
        status = int(rec._meta[2])
        if status == GROW:
            rec._grow()
        elif status == LIMIT:
            rec._check(LIMIT, int(rec._meta[0]) - 1)
        else:
            return out[:n]


# ----------------------------------------------------------------------------------------------
# Mid-text tokenization
# ----------------------------------------------------------------------------------------------


class TextEncoder:
    """The tokens a tokenizer gives a text that continues earlier output (not the start of a text).

    ``tokenizer`` is a transformers fast tokenizer, a ``tokenizers.Tokenizer``, or a callable
    ``encode(text) -> list[int]`` that already encodes mid-text. For the first two, ``anchor + text``
    is encoded for each of a few anchors. The tokens after the anchor are the answer as soon as the
    anchor's tokens end exactly where the anchor does. This sheds SentencePiece's leading ``▁`` and
    any merge with a start-of-text token. Every answer is checked against ``info``: the tokens must
    be text tokens that spell ``text`` byte for byte. Otherwise the answer is ``None``, because the
    tokenizer cannot be trusted for this text (a normalizer rewrote it, or it spells a special token).
    """

    def __init__(self, tokenizer: Any, info: TokenizerInfo):
        self.info = info
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._backend = backend if _is_tokenizers_backend(backend) else None
        self._encode_fn = tokenizer if self._backend is None and callable(tokenizer) else None
        if self._backend is None and self._encode_fn is None:
            raise StencilError(
                f"cannot tokenize with a {type(tokenizer).__name__}: pass a transformers fast tokenizer, "
                "a tokenizers.Tokenizer, or a callable encode(text) -> list[int]"
            )

    def __call__(self, text: str) -> list[int] | None:
        if not text:
            return []
        data = text.encode("utf-8")
        if self._encode_fn is not None:
            ids = [int(t) for t in self._encode_fn(text)]
            return ids if self._spells(ids, 0) == data else None
        for anchor in _ANCHORS:
            ids = self._backend.encode(anchor + text, add_special_tokens=False).ids
            cut = self._split_after(ids, anchor.encode("utf-8"))
            if cut is not None and self._spells(ids, cut) == data:
                return ids[cut:]
        return None

    def _spells(self, ids: list[int], start: int) -> bytes | None:
        """The bytes of ``ids[start:]``, or None if one is not a text token."""
        info = self.info
        out = []
        for t in ids[start:]:
            if not 0 <= t < info.vocab_size or info.token_kind[t] != info.KIND_TEXT:
                return None
            out.append(info.decoded_vocab[t])
        return b"".join(out)

    def _split_after(self, ids: list[int], anchor: bytes) -> int | None:
        """How many leading tokens spell exactly ``anchor`` (or a space and ``anchor``); None if none do."""
        vocab = self.info.decoded_vocab
        seen = b""
        for k, t in enumerate(ids):
            if seen == anchor or seen == b" " + anchor:
                return k
            if len(seen) > len(anchor) + 1:
                return None
            seen += vocab[t] if 0 <= t < len(vocab) else b"\0" * (len(anchor) + 2)
        return None


def _is_tokenizers_backend(obj: Any) -> bool:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return False
    return isinstance(obj, Tokenizer)


# ----------------------------------------------------------------------------------------------
# Forced tokens
# ----------------------------------------------------------------------------------------------


def jump_forward_tokens(
    matcher: Any,
    tokenizer: Any,
    max_bytes: int = DEFAULT_MAX_FORCED_BYTES,
) -> list[int]:
    """Token ids that the grammar forces next and that are safe to append without the model.

    ``tokenizer`` is what :class:`TextEncoder` takes (or a ``TextEncoder``). The tokens spell a
    prefix of :func:`jump_forward_bytes`, the matcher accepts them in order, and the tokenizer's
    encoding of the forced text followed by any continuation the grammar allows starts with them
    (see the module docstring for the rule and its assumptions). The result is empty when nothing
    can be forced safely. The matcher is not changed. Append the tokens with ``accept_token``.
    """
    if max_bytes < 0:
        raise StencilError(f"max_bytes must be >= 0, got {max_bytes}")
    if matcher.is_terminated():
        return []
    info = matcher.tokenizer_info
    encode = tokenizer if isinstance(tokenizer, TextEncoder) else TextEncoder(tokenizer, info)
    rec = matcher._rec
    n0 = int(rec._meta[0])
    try:
        forced = _run_forced(rec, max_bytes).tobytes()
        usable = _complete_utf8_length(forced)
        if not usable:
            return []
        # Move the chart back to the end of the usable text: the open-position walk starts there.
        rec._meta[0] = n0 + usable
        boundaries = _candidate_boundaries(rec, info, np.frombuffer(forced[:usable], np.uint8))
    finally:
        rec._meta[0] = n0
    data = forced[:usable]
    kept: list[int] | None = None
    for q in boundaries:
        ids = encode(data[:q].decode("utf-8")) if q else []
        if ids is None:
            return []
        if kept is None:
            kept = ids
        else:
            k = 0
            while k < min(len(kept), len(ids)) and kept[k] == ids[k]:
                k += 1
            kept = kept[:k]
        if not kept:
            return []
    return kept or []


def _complete_utf8_length(data: bytes) -> int:
    """The length of the longest prefix of ``data`` made of whole UTF-8 characters."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return len(data)


def _candidate_boundaries(rec: Any, info: TokenizerInfo, forced: np.ndarray) -> list[int]:
    """Q: the open positions of ``forced`` (rounded down to character starts) and its end, ascending.

    The chart must stand at the end of ``forced``.
    """
    size = forced.shape[0]
    first = max(0, size - info.max_token_len)
    flags = np.zeros(size, np.bool_)
    n_end = int(rec._meta[0])
    while True:
        r = _open_positions(rec.G, rec._st, rec._org, rec._row_ptr, rec._ht_key, rec._ht_gen, rec._meta,
                            rec.max_items_per_row, forced, first, info.trie_byte, info.trie_depth,
                            info.trie_subtree, info.trie_tok_ptr, flags)
        if r == GROW:
            rec._grow()
            rec._meta[0] = n_end
            continue
        if r == LIMIT:
            at = int(rec._meta[0]) - 1
            rec._meta[0] = n_end
            rec._check(LIMIT, at)
        break
    out = {size}
    for j in np.flatnonzero(flags).tolist():
        while j > 0 and (forced[j] & 0xC0) == 0x80:  # inside a multi-byte character
            j -= 1
        out.add(j)
    return sorted(out)
