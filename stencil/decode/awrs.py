"""Adaptive weighted rejection sampling (AWRS; Lipkin et al., COLM 2025).

Goal: a token from the constrained distribution ``g(t) = p(t) c(t) / Z`` with ``p = softmax(logits)``,
``c(t)`` the constraint's verdict and ``Z = sum_t p(t) c(t)``, plus an unbiased, *properly weighted*
estimate ``Ẑ`` of ``Z`` (``E[Ẑ 1{x = a}] = p(a) c(a)`` for every token ``a``) for sequential Monte
Carlo, while asking the constraint about as few tokens as possible.

Sampling. Keys ``logit + Gumbel noise`` ordered from the largest down are a draw of the whole
vocabulary without replacement from ``p`` (Gumbel-top-k). Walking that order and stopping at the
first token the constraint accepts gives an exact sample from ``g``: it is the first valid token of
a ``p``-random permutation. The order is generated lazily from the top (:class:`LazyOrder`: each
next key's token is an inverse-CDF draw among the tokens left, over block totals), so a call costs
one read of the logits (one ``exp`` per token, one float written per block of 64) plus a block scan
per token drawn; no key is materialized and nothing is sorted unless the full-mask fallback needs
the rest of the order at once. With the recursive estimator and a constraint that judges several
tokens per call (``try_tokens``), the order runs one draw ahead (:class:`PrefetchOrder`), so the
usual step (candidate accepted, peek judged) is one call into the constraint.

Weights (``estimator=``):

* ``"recursive"`` (default, lower variance, one extra check): let ``S`` be the tokens left when
  ``x`` was drawn (everything but the rejected ones, mass ``m = 1 - ψ0``). Peek at the next token
  ``y`` of the same order and return ``Ẑ = p(x) + (m - p(x)) c(y)``, i.e. ``m`` if ``y`` is valid and
  ``p(x)`` otherwise. Given ``S`` and ``x``, ``y`` is a draw from ``p`` on ``S \\ {x}``, so
  ``E[Ẑ | S, x] = p(x) + Σ_{v∈S\\{x}} p(v) c(v) = Z``: unbiased conditionally on the history up to
  ``x``, which is why the exact ``Z`` may replace it whenever that history (never the peek's
  verdict) says so; the full-mask fallback does.
* ``"two_loop"`` (the paper's estimator): after the first loop (``n0`` rejections of total mass
  ``ψ0``), run a second, independent adaptive loop over the tokens not rejected in the first (``x``
  included, known valid, not re-checked) until it meets a valid token, counting its ``n1``
  rejections; ``Ẑ = (1 - ψ0) / (n0 + n1 + 1)``. Proper weighting: the probability of the first
  loop's rejections, ``x``, and the second loop's rejections and stop is ``p(x) / (1 - ψ0)`` times
  the probability of a *single* adaptive walk that makes all ``L = n0 + n1`` rejections in a row;
  so the weight cancels the ``1 - ψ0`` and each single walk is counted once per split point
  ``n0 ∈ {0..L}`` with weight ``1/(L+1)``: ``E[Ẑ 1{x=a}] = p(a)``. It is unbiased given ``x`` only,
  not given the history, so its fallback finishes both loops exactly from the full mask: the
  sample and the weight have the same law as without the fallback (for the same draws, the same
  values).

Both are checked in exact rational arithmetic by enumerating every draw order
(``tests/decode/test_awrs.py``), through the very function the sampler runs (:func:`awrs_core`).

Fallback. After ``max_rejections`` rejected checks in one call the full mask is computed once and the
rest of the walk reads it instead of checking tokens one by one: the sample stays exact and the
weight properly weighted (exact ``Z`` for the recursive estimator).

End of sequence. The sampler is told the stop ids; a stop id is valid exactly when
``constraint.is_completed()`` (asked at most once per call), and neither ``try_token`` nor
``try_tokens`` is ever asked about it.

Greedy decoding is the same walk in plain logit order (ties: lowest id first; :class:`KeyOrder`,
partial selections in growing chunks): the first accepted token is the constrained argmax.

Numerics: probabilities are ``exp(logit - max)`` in float64 (from float32 or float64 logits, read
in place), so a token counts as having probability 0 only when its logit is ``-inf`` or more than
~745 nats below the top one. The lazy order draws through float64 block totals and their
cumulative sum; a block total is recomputed from its tokens whenever one is drawn, so the order
resolves a token if its probability is above ~1e-16 of the mass still in play; rarer tokens are
reached by the fallback's explicit keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numba
import numpy as np
import torch

from stencil.decode.sampling import TokenConstraint, constraint_allowed_tokens

__all__ = [
    "TokenConstraint",
    "Estimator",
    "AWRSResult",
    "AWRS",
    "DrawOrder",
    "KeyOrder",
    "LazyOrder",
    "PrefetchOrder",
    "Masses",
    "LogitMasses",
    "CoreOutcome",
    "awrs_core",
    "logits_to_numpy",
]

Estimator = Literal["recursive", "two_loop"]
_ESTIMATORS = ("recursive", "two_loop")


class DrawOrder(Protocol):
    """Successive draws without replacement (tokens with probability 0 are never produced)."""

    def next(self) -> int | None:
        """The next token of the order, or ``None`` when no token with probability > 0 is left."""
        ...

    def skip_to_valid(self, valid: Any) -> tuple[int | None, list[int]]:
        """Consume the order up to its first token with ``valid[t]``; return it (``None`` if none)
        and the invalid tokens passed over, in no particular order. Ends the order: ``next`` may not
        be called afterwards."""
        ...


class Masses(Protocol):
    """Probability arithmetic, so one core runs on floats (the sampler) and fractions (the proofs)."""

    zero: Any

    def p(self, token: int) -> Any:
        """Probability of ``token``."""
        ...

    def mass(self, tokens: Sequence[int]) -> Any:
        """Σ p(t) over ``tokens``."""
        ...

    def remaining(self, excluded: Sequence[int], excluded_mass: Any) -> Any:
        """Mass of all tokens but ``excluded`` (whose total is ``excluded_mass``)."""
        ...

    def valid_mass(self, valid: Any) -> Any:
        """Σ p(t) over the tokens with ``valid[t]`` (the exact Z)."""
        ...


@dataclass(frozen=True)
class CoreOutcome:
    """What :func:`awrs_core` found. ``weight`` is Ẑ in the arithmetic of the ``Masses`` given."""

    token: int | None
    weight: Any
    rejections: int
    fallback: bool


class _Walk:
    """Verdicts for one call: asks ``check`` until ``max_rejections`` rejections, then the full mask."""

    def __init__(self, check: Callable[[int], bool], full_mask: Callable[[], Any], max_rejections: int,
                 final_check: Callable[[int], bool] | None = None):
        self._check = check
        self._final_check = check if final_check is None else final_check
        self._full_mask = full_mask
        self._max_rejections = max_rejections
        self.rejections = 0
        self.mask: Any = None

    def verdict(self, t: int, final: bool = False) -> bool:
        """The verdict on ``t``; ``final``: the last one asked in this call (it never triggers the
        fallback, and goes to ``final_check``)."""
        if self.mask is not None:
            return bool(self.mask[t])
        ok = (self._final_check if final else self._check)(t)
        if not ok:
            self.rejections += 1
            if not final and self.rejections >= self._max_rejections:
                self.mask = self._full_mask()
        return ok

    def first_valid(self, order: DrawOrder, known_valid: int | None = None) -> tuple[int | None, list[int]]:
        """Walk ``order`` to its first valid token (``known_valid`` is not re-checked); return it and
        the rejected tokens passed over, switching to the full mask once the budget is spent."""
        passed: list[int] = []
        while True:
            if self.mask is not None:
                hit, skipped = order.skip_to_valid(self.mask)
                passed.extend(skipped)
                return hit, passed
            t = order.next()
            if t is None:
                return None, passed
            if t == known_valid or self.verdict(t):
                return t, passed
            passed.append(t)


def awrs_core(
    masses: Masses,
    check: Callable[[int], bool],
    full_mask: Callable[[], Any],
    order: DrawOrder,
    second_order: Callable[[Sequence[int]], DrawOrder],
    *,
    estimator: Estimator,
    max_rejections: int,
    final_check: Callable[[int], bool] | None = None,
) -> CoreOutcome:
    """One AWRS step, independent of where draws, probabilities and verdicts come from.

    ``check(t)`` asks the constraint about ``t``; ``final_check(t)`` (default ``check``) asks about
    the recursive estimator's peek, after which nothing more is asked; ``full_mask()`` returns the verdicts of all tokens
    (indexable by id); ``order`` is the draw order of the first loop; ``second_order(excluded)`` a
    fresh independent order that never yields ``excluded`` (only the two-loop estimator uses it).
    The weight is ``masses.zero`` when no token is valid. Every token is checked at most once.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {_ESTIMATORS}")
    walk = _Walk(check, full_mask, max_rejections, final_check)
    x, rejected = walk.first_valid(order)
    psi0 = masses.mass(rejected)
    if x is None:
        return CoreOutcome(None, masses.zero, walk.rejections, walk.mask is not None)

    if estimator == "recursive":
        if walk.mask is not None:
            return CoreOutcome(x, masses.valid_mass(walk.mask), walk.rejections, True)
        left = masses.remaining(rejected, psi0)
        y = order.next()
        if y is None:
            return CoreOutcome(x, left, walk.rejections, False)
        # The peek never triggers the fallback: swapping in the exact Z only on a rejected peek
        # would bias the estimate (the choice must not depend on the peek's verdict).
        if walk.verdict(y, final=True):
            return CoreOutcome(x, left, walk.rejections, False)
        return CoreOutcome(x, masses.p(x), walk.rejections, False)

    # Two-loop: a second adaptive loop over everything the first did not reject (x included).
    hit, second_rejected = walk.first_valid(second_order(rejected), known_valid=x)
    if hit is None:
        raise RuntimeError("the second AWRS loop ran out of tokens before reaching a valid one")
    weight = masses.remaining(rejected, psi0) / (len(rejected) + len(second_rejected) + 1)
    return CoreOutcome(x, weight, walk.rejections, walk.mask is not None)


class KeyOrder:
    """Token ids by decreasing key (ties: lower id first), materialized in growing chunks.

    Keys equal to ``-inf`` are never produced. Each chunk costs one ``argpartition`` over the ids
    not yet produced; chunk sizes grow 8x, so a walk of ``k`` tokens costs ``O(V log_8 k)`` and the
    usual one- or two-token walk a single partial selection. Used for the greedy walk (keys =
    logits) and, with explicit Gumbel keys, to finish a :class:`LazyOrder` against a full mask.
    """

    _FIRST_CHUNK = 8
    _GROWTH = 8

    def __init__(self, keys: np.ndarray):
        self._keys = keys
        self._buf = np.empty(0, dtype=np.int64)
        self._pos = 0
        self._below = math.inf  # every id with key >= this has been put into a chunk
        self._chunk = self._FIRST_CHUNK
        self._done = False

    def _refill(self) -> None:
        keys = self._keys
        if self._below == math.inf:
            cand = None
            sub = keys
        else:
            cand = np.flatnonzero(keys < self._below)
            sub = keys[cand]
        n = sub.size
        if n == 0:
            self._buf = np.empty(0, dtype=np.int64)
            self._below = -math.inf
            return
        k = min(self._chunk, n)
        self._chunk *= self._GROWTH
        if k < n:
            top = np.argpartition(sub, n - k)[n - k :]
            threshold = sub[top].min()
            sel = np.flatnonzero(sub >= threshold)  # takes every tie of the boundary key
        else:
            threshold = sub.min()
            sel = np.arange(n)
        ids = sel if cand is None else cand[sel]
        vals = keys[ids]
        finite = vals > -math.inf
        ids, vals = ids[finite], vals[finite]
        self._buf = ids[np.lexsort((ids, -vals))]
        self._pos = 0
        self._below = threshold

    def next(self) -> int | None:
        if self._done:
            raise RuntimeError("KeyOrder.next() after skip_to_valid()")
        while self._pos >= self._buf.size:
            if self._below == -math.inf:
                return None
            self._refill()
        t = int(self._buf[self._pos])
        self._pos += 1
        return t

    def skip_to_valid(self, valid: np.ndarray) -> tuple[int | None, list[int]]:
        if self._done:
            raise RuntimeError("KeyOrder.skip_to_valid() called twice")
        self._done = True
        keys = self._keys
        rest = [self._buf[self._pos :]]
        if self._below > -math.inf:
            rest.append(np.flatnonzero((keys < self._below) & (keys > -math.inf)))
        ids = np.concatenate(rest)
        ok = valid[ids]
        good, bad = ids[ok], ids[~ok]
        if good.size == 0:
            return None, bad.tolist()
        gk = keys[good]
        best = gk.max()
        x = int(good[gk == best].min())
        bk = keys[bad]
        passed = bad[(bk > best) | ((bk == best) & (bad < x))]
        return x, passed.tolist()


BLOCK = 64
"""Tokens per block of :class:`LazyOrder`: a block's drawn tokens fit one ``uint64`` of flags."""

# _draw answers besides a token
_EXHAUSTED = -1  # no token of positive weight is left
_REDRAW = -2  # rounding put the draw past the last token of its block (probability ~1e-16): draw again


@numba.njit(cache=True, nogil=True, inline="always")
def _weight(x, top):
    """The unnormalized probability ``exp(logit - top)`` of a token, the one formula every pass uses."""
    return math.exp(np.float64(x) - top)


@numba.njit(cache=True, nogil=True)
def _block_sums(row, top, own, sums):
    """``sums[b]`` = weight of block b of the tokens below ``own``; returns the weight of the rest
    (a model's padding ids). The only pass over the whole vocabulary: it reads the logits once and
    writes one float per block, so little of what the constraint needs next is evicted."""
    for b in range(sums.shape[0]):
        s = 0.0
        for t in range(b * BLOCK, min(own, (b + 1) * BLOCK)):
            s += _weight(row[t], top)
        sums[b] = s
    padding = 0.0
    for t in range(own, row.shape[0]):
        padding += _weight(row[t], top)
    return padding


@numba.njit(cache=True, nogil=True, inline="always")
def _block_sum(row, top, own, flags, b):
    """Weight of block b without its flagged tokens, summed in the order :func:`_draw` scans it."""
    s = 0.0
    for t in range(b * BLOCK, min(own, (b + 1) * BLOCK)):
        if not (flags >> np.uint64(t - b * BLOCK)) & np.uint64(1):
            s += _weight(row[t], top)
    return s


@numba.njit(cache=True, nogil=True)
def _exclude(row, top, own, sums, drawn, tokens):
    """Flag ``tokens`` (those below ``own``) as drawn and recompute the sums of their blocks."""
    for t in tokens:
        if 0 <= t < own:
            drawn[t // BLOCK] |= np.uint64(1) << np.uint64(t % BLOCK)
    for t in tokens:
        if 0 <= t < own:
            b = t // BLOCK
            sums[b] = _block_sum(row, top, own, drawn[b], b)


@numba.njit(cache=True, nogil=True)
def _cumulate(sums, cum, start):
    """``cum[b]`` = sums[0] + ... + sums[b] for b >= start."""
    acc = cum[start - 1] if start > 0 else 0.0
    for b in range(start, sums.shape[0]):
        acc += sums[b]
        cum[b] = acc


@numba.njit(cache=True, nogil=True)
def _draw(row, top, own, sums, cum, drawn, u):
    """One token in proportion to the weights of those not drawn yet, by inverse CDF at ``u`` in [0, 1).

    A binary search over the block totals, then a scan of one block. The drawn token is flagged and
    its block's total recomputed from scratch (never decremented: a remaining mass far below the
    drawn one does not drown in rounding). Returns the token, _EXHAUSTED or _REDRAW.
    """
    nb = sums.shape[0]
    if nb == 0 or not cum[nb - 1] > 0.0:
        return _EXHAUSTED
    x = u * cum[nb - 1]
    lo, hi = 0, nb
    while lo < hi:
        mid = (lo + hi) >> 1
        if cum[mid] > x:
            hi = mid
        else:
            lo = mid + 1
    if lo >= nb:
        return _REDRAW
    b = lo
    r = x - cum[b - 1] if b > 0 else x
    flags = drawn[b]
    acc = 0.0
    for t in range(b * BLOCK, min(own, (b + 1) * BLOCK)):
        bit = np.uint64(1) << np.uint64(t - b * BLOCK)
        if flags & bit:
            continue
        acc += _weight(row[t], top)
        if acc > r:  # a token of weight 0 never gets here: acc was already <= r
            drawn[b] = flags | bit
            sums[b] = _block_sum(row, top, own, drawn[b], b)
            _cumulate(sums, cum, b)
            return t
    return _REDRAW


@numba.njit(cache=True, nogil=True)
def _mass(row, top, tokens):
    """Σ weight over ``tokens``."""
    s = 0.0
    for t in tokens:
        s += _weight(row[t], top)
    return s


@numba.njit(cache=True, nogil=True)
def _masked_mass(row, top, own, valid):
    """Σ weight over the tokens below ``own`` with ``valid[t]``."""
    s = 0.0
    for t in range(own):
        if valid[t]:
            s += _weight(row[t], top)
    return s


@numba.njit(cache=True, nogil=True)
def _survivor_mass(row, top, own, sums, tokens):
    """Σ weight over the tokens below ``own`` but ``tokens``, from the block totals ``sums``."""
    excluded = np.zeros(sums.shape[0], np.uint64)
    for t in tokens:
        if 0 <= t < own:
            excluded[t // BLOCK] |= np.uint64(1) << np.uint64(t % BLOCK)
    s = 0.0
    for b in range(sums.shape[0]):
        s += sums[b] if excluded[b] == 0 else _block_sum(row, top, own, excluded[b], b)
    return s


@numba.njit(cache=True, nogil=True)
def _gumbel_keys(row, top, own, drawn, exponentials, keys):
    """Gumbel-top-k keys ``log w - log E`` of the tokens below ``own`` not drawn yet; -inf for the
    rest and for tokens of weight 0."""
    for t in range(keys.shape[0]):
        keys[t] = -np.inf
        if t < own and not (drawn[t // BLOCK] >> np.uint64(t % BLOCK)) & np.uint64(1):
            w = _weight(row[t], top)
            if w > 0.0:
                keys[t] = math.log(w) - math.log(exponentials[t])


class LazyOrder:
    """Successive sampling without replacement in proportion to ``exp(logits)``, generated lazily.

    This is the order of Gumbel-top-k keys ``logit + Gumbel`` built from the top down: the largest
    remaining key belongs to a token drawn in proportion to the weights of the tokens left, so each
    step is one inverse-CDF draw among them. The vocabulary is cut into blocks of :data:`BLOCK`
    tokens whose totals (``sums``, one pass over the logits; may be shared, it is copied) and their
    cumulative sum are all that is stored: a draw is a binary search over the blocks and a scan of
    one, and removes the token exactly (its block's total is recomputed), so no draw is wasted and
    nothing of size ``V`` is written. Tokens of weight 0, ids at or past ``own`` and ``excluded``
    ones are never produced. :meth:`skip_to_valid` gives the remaining tokens explicit Gumbel keys.

    ``top`` is the maximum logit (computed when not given); weights are ``exp(logit - top)`` in
    float64 whatever the logits' dtype.
    """

    def __init__(
        self,
        logits: np.ndarray,
        rng: np.random.Generator,
        *,
        top: float | None = None,
        own: int | None = None,
        sums: np.ndarray | None = None,
        excluded: Sequence[int] = (),
    ):
        self._row = logits
        self._rng = rng
        self._top = float(logits.max()) if top is None else top
        self._own = logits.size if own is None else own
        nb = -(-self._own // BLOCK)
        if sums is None:
            sums = np.empty(nb, np.float64)
            _block_sums(logits, self._top, self._own, sums)
        else:
            sums = sums.copy()
        self._sums = sums
        self._drawn = np.zeros(nb, np.uint64)
        if len(excluded):
            _exclude(logits, self._top, self._own, sums, self._drawn, np.asarray(excluded, dtype=np.int64))
        self._cum = np.empty(nb, np.float64)
        _cumulate(sums, self._cum, 0)
        self._done = False

    def next(self) -> int | None:
        if self._done:
            raise RuntimeError("LazyOrder.next() after skip_to_valid()")
        while True:
            t = _draw(self._row, self._top, self._own, self._sums, self._cum, self._drawn, self._rng.random())
            if t != _REDRAW:
                return None if t == _EXHAUSTED else int(t)

    def skip_to_valid(self, valid: np.ndarray) -> tuple[int | None, list[int]]:
        if self._done:
            raise RuntimeError("LazyOrder.skip_to_valid() called twice")
        self._done = True
        keys = np.empty(self._own, np.float64)
        _gumbel_keys(self._row, self._top, self._own, self._drawn, self._rng.standard_exponential(self._own), keys)
        return KeyOrder(keys).skip_to_valid(valid)


class PrefetchOrder:
    """A draw order that runs one token ahead of the walk, so that the constraint judges a candidate
    and the token after it in one call (``judge(tokens) -> verdicts``).

    The tokens and their order are exactly those of the wrapped order; only *when* the next token
    is drawn changes. The walk asks verdicts through :meth:`check` (and :meth:`check_final` for the
    recursive estimator's peek); a token judged ahead is answered from memory. The token after an
    accepted candidate is its peek and the one after a rejected candidate the next candidate, so a
    verdict judged ahead is always used, unless the full-mask fallback takes over first.
    """

    _EMPTY = object()

    def __init__(self, order: DrawOrder, judge: Callable[[list[int]], Sequence[bool]]):
        self._order = order
        self._judge = judge
        self._ahead: Any = self._EMPTY
        self._known: dict[int, bool] = {}

    def next(self) -> int | None:
        if self._ahead is not self._EMPTY:
            t, self._ahead = self._ahead, self._EMPTY
            return t
        return self._order.next()

    def check(self, token: int) -> bool:
        """The constraint's verdict on ``token`` (the last one :meth:`next` returned)."""
        known = self._known.pop(token, None)
        if known is not None:
            return known
        if self._ahead is self._EMPTY:
            self._ahead = self._order.next()
        if self._ahead is None:
            return bool(self._judge([token])[0])
        verdicts = self._judge([token, self._ahead])
        if len(verdicts) > 1:
            self._known[self._ahead] = bool(verdicts[1])
        return bool(verdicts[0])

    def check_final(self, token: int) -> bool:
        """:meth:`check` for the last token the walk asks about: nothing is judged ahead of it."""
        known = self._known.pop(token, None)
        return known if known is not None else bool(self._judge([token])[0])

    def skip_to_valid(self, valid: Any) -> tuple[int | None, list[int]]:
        if self._ahead is self._EMPTY:
            return self._order.skip_to_valid(valid)
        t, self._ahead = self._ahead, self._EMPTY
        if t is None:
            return None, []
        if valid[t]:
            return t, []
        hit, passed = self._order.skip_to_valid(valid)
        return hit, [t, *passed]


class LogitMasses:
    """``Masses`` over weights ``exp(logit - top)`` with probabilities ``weight / norm``.

    Ids at or past ``own`` (a model's padding) are never drawn; their mass stays in ``norm`` as
    invalid mass, and ``total`` is the probability of the rest. ``sums`` are the block totals of
    :class:`LazyOrder`. ``remaining`` sums the survivors directly once more than half of ``total``
    is excluded, so a tiny remaining mass is not lost to cancellation in ``total - ψ0``.
    """

    zero = 0.0

    def __init__(self, logits: np.ndarray, top: float, own: int, sums: np.ndarray, norm: float, total: float):
        self.logits = logits
        self.top = top
        self.own = own
        self.sums = sums
        self.norm = norm
        self.total = total

    def p(self, token: int) -> float:
        return _weight(self.logits[token], self.top) / self.norm

    def mass(self, tokens: Sequence[int]) -> float:
        return _mass(self.logits, self.top, np.asarray(tokens, dtype=np.int64)) / self.norm

    def remaining(self, excluded: Sequence[int], excluded_mass: float) -> float:
        if excluded_mass <= 0.5 * self.total:
            return self.total - float(excluded_mass)
        tokens = np.asarray(excluded, dtype=np.int64)
        return _survivor_mass(self.logits, self.top, self.own, self.sums, tokens) / self.norm

    def valid_mass(self, valid: Any) -> float:
        return _masked_mass(self.logits, self.top, self.own, np.asarray(valid, dtype=np.bool_)) / self.norm


@dataclass(frozen=True)
class AWRSResult:
    """One AWRS step.

    ``token`` is ``-1`` and ``log_weight`` ``-inf`` when no token is allowed (the particle dies).
    ``log_weight`` is ``log Ẑ`` for :meth:`AWRS.sample`, ``0.0`` for :meth:`AWRS.argmax` (greedy has
    no importance weight). ``checks`` counts constraint evaluations (``try_token`` calls plus at
    most one ``is_completed``), ``rejections`` the rejected ones, ``fallback`` whether the full mask
    was computed.
    """

    token: int
    log_weight: float
    checks: int
    rejections: int
    fallback: bool


class _Verdicts:
    """Counting access to one constraint state, with the end-of-sequence rule.

    ``checks`` counts the tokens put to the constraint (judged ahead or not) plus at most one
    ``is_completed``. A constraint with ``try_tokens`` (``GrammarMatcher``) judges several tokens
    in one call.
    """

    def __init__(
        self, constraint: TokenConstraint, eos_ids: frozenset[int], vocab_size: int, constraint_vocab_size: int
    ):
        self.constraint = constraint
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.constraint_vocab_size = constraint_vocab_size
        self.checks = 0
        self._completed: bool | None = None
        self._many = getattr(constraint, "try_tokens", None)
        self.batched = self._many is not None

    def completed(self) -> bool:
        if self._completed is None:
            self.checks += 1
            self._completed = bool(self.constraint.is_completed())
        return self._completed

    def check(self, token: int) -> bool:
        if token in self.eos_ids:
            return self.completed()
        self.checks += 1
        return bool(self.constraint.try_token(token))

    def judge(self, tokens: list[int]) -> Sequence[bool]:
        """Verdicts on ``tokens``: the first always; the others (tokens judged ahead) only where
        that costs no extra call, so the list may be shorter."""
        eos = self.eos_ids
        first = tokens[0]
        if first in eos:
            return [self.completed()]
        if self._many is None or any(t in eos for t in tokens[1:]):
            return [self.check(first)]
        self.checks += len(tokens)
        return self._many(tokens)  # PrefetchOrder makes each verdict a bool

    def full_mask(self) -> np.ndarray:
        allowed = constraint_allowed_tokens(
            self.constraint, self.vocab_size, (), constraint_vocab_size=self.constraint_vocab_size
        )
        eos = [e for e in self.eos_ids if e < min(self.vocab_size, self.constraint_vocab_size)]
        if eos:
            allowed[eos] = self.completed()
        return allowed


def logits_to_numpy(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Logits (a torch tensor on any device, or array-like) as a C-contiguous numpy array on the CPU.

    float32 and float64 are kept as they are (a CPU float32 tensor is not copied); other dtypes
    (bfloat16, float16, integers) are widened to float32, which holds them exactly. The samplers
    compute in float64 from there.
    """
    if isinstance(logits, torch.Tensor):
        t = logits.detach()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)
        return np.ascontiguousarray(t.to("cpu").numpy())
    arr = np.asarray(logits)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    return np.ascontiguousarray(arr)


def _logits_row(logits: torch.Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """One row of logits as float32/float64 numpy, and its maximum (one pass also validates it)."""
    row = logits_to_numpy(logits)
    if row.ndim != 1 or row.size == 0:
        raise ValueError(f"AWRS works on one non-empty row of logits [V], got shape {row.shape}")
    top = float(row.max())
    if math.isnan(top) or top == math.inf:
        raise ValueError("logits contain NaN or +inf")
    if top == -math.inf:
        raise ValueError("every logit is -inf: the model gives no token positive probability")
    return row, top


class AWRS:
    """Adaptive weighted rejection sampler for one constraint state per call.

    Args:
        eos_ids: the end-of-sequence / stop token ids; valid exactly when ``is_completed()``.
        vocab_size: the constraint's vocabulary size when the logits are wider (a model's padded
            vocabulary): ids at or past it are invalid and are never drawn nor checked; their
            probability still counts as invalid mass, so the target stays ``p · c``.
        estimator: ``"recursive"`` (default) or ``"two_loop"``; see the module docstring.
        max_rejections: rejected checks in one call after which the full mask is used instead.
        seed: seed (or ``numpy.random.Generator``) of the Gumbel noise; same seed, same checks,
            same results.

    The target is ``softmax(logits)`` restricted to the constraint: apply temperature to the
    logits beforehand if wanted. Top-k/top-p/min-p depend on the masked distribution and belong to
    the mask path (:func:`stencil.decode.sampling.sample_tokens`).
    """

    def __init__(
        self,
        eos_ids: Sequence[int] = (),
        *,
        vocab_size: int | None = None,
        estimator: Estimator = "recursive",
        max_rejections: int = 32,
        seed: int | np.random.Generator | None = None,
    ):
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; expected one of {_ESTIMATORS}")
        if max_rejections < 1:
            raise ValueError(f"max_rejections must be >= 1, got {max_rejections}")
        if any(int(e) < 0 for e in eos_ids):
            raise ValueError(f"eos ids must be >= 0, got {list(eos_ids)}")
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.vocab_size = vocab_size
        self.estimator: Estimator = estimator
        self.max_rejections = int(max_rejections)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def _own(self, width: int) -> int:
        return width if self.vocab_size is None else min(self.vocab_size, width)

    def sample(self, logits: torch.Tensor | np.ndarray, constraint: TokenConstraint) -> AWRSResult:
        """An exact sample of ``softmax(logits) · c`` and its properly weighted ``log Ẑ``."""
        row, top = _logits_row(logits)
        own = self._own(row.size)
        sums = np.empty(-(-own // BLOCK), np.float64)
        padding = _block_sums(row, top, own, sums)
        kept = float(sums.sum())
        norm = kept + padding
        # Padding ids: invalid mass that stays in the normalization but is never drawn.
        total = 1.0 if padding == 0.0 else (1.0 - padding / norm if padding <= 0.5 * norm else kept / norm)
        verdicts = _Verdicts(constraint, self.eos_ids, row.size, own)
        order: Any = LazyOrder(row, self.rng, top=top, own=own, sums=sums)
        check = final_check = verdicts.check
        if self.estimator == "recursive" and verdicts.batched:
            # Candidate and peek (or next candidate) judged in one call; see PrefetchOrder.
            order = PrefetchOrder(order, verdicts.judge)
            check, final_check = order.check, order.check_final
        out = awrs_core(
            LogitMasses(row, top, own, sums, norm, total),
            check,
            verdicts.full_mask,
            order,
            lambda excluded: LazyOrder(row, self.rng, top=top, own=own, sums=sums, excluded=excluded),
            estimator=self.estimator,
            max_rejections=self.max_rejections,
            final_check=final_check,
        )
        if out.token is None or out.weight <= 0.0:
            token = -1 if out.token is None else out.token
            return AWRSResult(token, -math.inf, verdicts.checks, out.rejections, out.fallback)
        return AWRSResult(out.token, math.log(out.weight), verdicts.checks, out.rejections, out.fallback)

    def argmax(self, logits: torch.Tensor | np.ndarray, constraint: TokenConstraint) -> AWRSResult:
        """The constrained argmax (lowest id on ties), walking tokens in logit order."""
        row, _ = _logits_row(logits)
        own = self._own(row.size)
        if own < row.size:
            row = row.copy()
            row[own:] = -math.inf
        verdicts = _Verdicts(constraint, self.eos_ids, row.size, own)
        walk = _Walk(verdicts.check, verdicts.full_mask, self.max_rejections)
        token, _ = walk.first_valid(KeyOrder(row))
        if token is None:
            return AWRSResult(-1, -math.inf, verdicts.checks, walk.rejections, walk.mask is not None)
        return AWRSResult(token, 0.0, verdicts.checks, walk.rejections, walk.mask is not None)

    def sample_batch(
        self, logits: torch.Tensor | np.ndarray, constraints: Sequence[TokenConstraint]
    ) -> list[AWRSResult]:
        """:meth:`sample` for each row of ``[B, V]`` logits with its own constraint state."""
        rows = logits_to_numpy(logits)
        if rows.ndim != 2 or len(rows) != len(constraints):
            raise ValueError(f"{len(rows)} rows of logits for {len(constraints)} constraints")
        return [self.sample(row, c) for row, c in zip(rows, constraints)]
