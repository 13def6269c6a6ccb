"""Adaptive weighted rejection sampling (AWRS; Lipkin et al., COLM 2025).

Goal: a token from the constrained distribution ``g(t) = p(t) c(t) / Z`` with ``p = softmax(logits)``,
``c(t)`` the constraint's verdict and ``Z = sum_t p(t) c(t)``, plus an unbiased, *properly weighted*
estimate ``Ẑ`` of ``Z`` (``E[Ẑ 1{x = a}] = p(a) c(a)`` for every token ``a``) for sequential Monte
Carlo, while asking the constraint about as few tokens as possible.

Sampling. Keys ``logit + Gumbel noise`` ordered from the largest down are a draw of the whole
vocabulary without replacement from ``p`` (Gumbel-top-k). Walking that order and stopping at the
first token the constraint accepts gives an exact sample from ``g``: it is the first valid token of
a ``p``-random permutation. The order is generated lazily from the top (:class:`LazyOrder`: each
next key's token is an inverse-CDF draw among the tokens left), so a call costs one ``exp`` and one
cumulative sum over the vocabulary plus ``O(log V)`` per token drawn; no key is materialized and
nothing is sorted unless the full-mask fallback needs the rest of the order at once.

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
``constraint.is_completed()`` (asked at most once per call), and ``try_token`` is never called on it.

Greedy decoding is the same walk in plain logit order (ties: lowest id first; :class:`KeyOrder`,
partial selections in growing chunks): the first accepted token is the constrained argmax.

Numerics: probabilities are ``exp(logit - max)`` in float64, so a token counts as having
probability 0 only when its logit is ``-inf`` or more than ~745 nats below the top one. The lazy
order draws through a float64 cumulative sum, which resolves a token only if its probability is
above ~1e-16 of the mass still in play (it is rebuilt as mass is drawn); rarer tokens are reached
by the fallback's explicit keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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
    "Masses",
    "NumpyMasses",
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

    def __init__(self, check: Callable[[int], bool], full_mask: Callable[[], Any], max_rejections: int):
        self._check = check
        self._full_mask = full_mask
        self._max_rejections = max_rejections
        self.rejections = 0
        self.mask: Any = None

    def verdict(self, t: int, may_fall_back: bool = True) -> bool:
        if self.mask is not None:
            return bool(self.mask[t])
        ok = self._check(t)
        if not ok:
            self.rejections += 1
            if may_fall_back and self.rejections >= self._max_rejections:
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
) -> CoreOutcome:
    """One AWRS step, independent of where draws, probabilities and verdicts come from.

    ``check(t)`` asks the constraint about ``t``; ``full_mask()`` returns the verdicts of all tokens
    (indexable by id); ``order`` is the draw order of the first loop; ``second_order(excluded)`` a
    fresh independent order that never yields ``excluded`` (only the two-loop estimator uses it).
    The weight is ``masses.zero`` when no token is valid. Every token is checked at most once.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {_ESTIMATORS}")
    walk = _Walk(check, full_mask, max_rejections)
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
        if walk.verdict(y, may_fall_back=False):
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


class LazyOrder:
    """Successive sampling without replacement in proportion to ``weights``, generated lazily.

    This is the order of Gumbel-top-k keys ``log w + Gumbel`` built from the top down: the largest
    remaining key belongs to a token drawn in proportion to the weights of the tokens left, so each
    step is one inverse-CDF draw on a cumulative sum, redrawn when it lands on a token already
    produced (or ``excluded``). The cumulative sum is built once (it may be shared) and rebuilt
    without the produced tokens once they hold half of its mass, so a draw costs ``O(log V)`` and
    at most two tries on average. No key is materialized until :meth:`skip_to_valid` needs the rest
    of the order at once; then the remaining tokens get explicit Gumbel keys. Tokens of weight 0
    are never produced.
    """

    def __init__(
        self,
        weights: np.ndarray,
        rng: np.random.Generator,
        cumulative: np.ndarray | None = None,
        excluded: Sequence[int] = (),
    ):
        self._w = weights
        self._rng = rng
        self._cum = np.cumsum(weights) if cumulative is None else cumulative
        self._base = float(self._cum[-1])
        self._seen = {int(t) for t in excluded}
        self._seen_mass = float(weights[np.asarray(list(self._seen), dtype=np.int64)].sum())
        self._done = False

    def _rebuild(self) -> None:
        w = self._w.copy()
        w[np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))] = 0.0
        self._cum = np.cumsum(w)
        self._base = float(self._cum[-1])
        self._seen_mass = 0.0

    def next(self) -> int | None:
        if self._done:
            raise RuntimeError("LazyOrder.next() after skip_to_valid()")
        if self._seen_mass > 0.5 * self._base:
            self._rebuild()
        if self._base <= 0.0:
            return None
        size = self._w.size
        while True:
            t = int(np.searchsorted(self._cum, self._rng.random() * self._base, side="right"))
            if t < size and t not in self._seen:
                break
        self._seen.add(t)
        self._seen_mass += float(self._w[t])
        return t

    def skip_to_valid(self, valid: np.ndarray) -> tuple[int | None, list[int]]:
        if self._done:
            raise RuntimeError("LazyOrder.skip_to_valid() called twice")
        self._done = True
        with np.errstate(divide="ignore"):
            keys = np.log(self._w) - np.log(self._rng.standard_exponential(self._w.size))
        if self._seen:
            keys[np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))] = -math.inf
        return KeyOrder(keys).skip_to_valid(valid)


class NumpyMasses:
    """``Masses`` over float64 weights ``w`` with probabilities ``w / norm``.

    The weights may sum to less than ``norm`` when known-invalid ids (a model's padding) have been
    zeroed: their mass stays in the normalization as invalid mass and is never drawn; ``total`` is
    the mass of the rest. ``remaining`` sums the survivors directly once more than half of
    ``total`` is excluded, so a tiny remaining mass is not lost to cancellation in ``total - ψ0``.
    """

    zero = 0.0

    def __init__(self, weights: np.ndarray, norm: float, total: float = 1.0):
        self.weights = weights
        self.norm = norm
        self.total = total

    def p(self, token: int) -> float:
        return float(self.weights[token]) / self.norm

    def mass(self, tokens: Sequence[int]) -> float:
        return float(self.weights[np.asarray(tokens, dtype=np.int64)].sum()) / self.norm

    def remaining(self, excluded: Sequence[int], excluded_mass: float) -> float:
        if excluded_mass <= 0.5 * self.total:
            return self.total - float(excluded_mass)
        keep = np.ones(self.weights.size, dtype=bool)
        keep[np.asarray(excluded, dtype=np.int64)] = False
        return float(self.weights[keep].sum()) / self.norm

    def valid_mass(self, valid: Any) -> float:
        return float(self.weights[np.asarray(valid, dtype=bool)].sum()) / self.norm


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
    """Counting, caching access to one constraint state, with the end-of-sequence rule."""

    def __init__(
        self, constraint: TokenConstraint, eos_ids: frozenset[int], vocab_size: int, constraint_vocab_size: int
    ):
        self.constraint = constraint
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.constraint_vocab_size = constraint_vocab_size
        self.checks = 0
        self._completed: bool | None = None

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

    def full_mask(self) -> np.ndarray:
        allowed = constraint_allowed_tokens(
            self.constraint, self.vocab_size, (), constraint_vocab_size=self.constraint_vocab_size
        )
        eos = [e for e in self.eos_ids if e < min(self.vocab_size, self.constraint_vocab_size)]
        if eos:
            allowed[eos] = self.completed()
        return allowed


def logits_to_numpy(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Logits (a torch tensor on any device, or array-like) as a float64 numpy array on the CPU."""
    if isinstance(logits, torch.Tensor):
        return logits.detach().to("cpu", torch.float64).numpy()
    return np.asarray(logits, dtype=np.float64)


def _logits_row(logits: torch.Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """One row of logits as float64 numpy, and its maximum (one pass also validates it)."""
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
        weights = np.exp(row - top)  # float64: probabilities down to e^-745 of the top stay > 0
        if own < row.size:
            # Padding ids: invalid mass that stays in the normalization but is never drawn.
            norm = float(weights.sum())
            padding = float(weights[own:].sum())
            weights[own:] = 0.0
            cumulative = np.cumsum(weights)
            total = 1.0 - padding / norm if padding <= 0.5 * norm else float(cumulative[-1]) / norm
        else:
            cumulative = np.cumsum(weights)
            norm = float(cumulative[-1])
            total = 1.0
        verdicts = _Verdicts(constraint, self.eos_ids, row.size, own)
        out = awrs_core(
            NumpyMasses(weights, norm, total),
            verdicts.check,
            verdicts.full_mask,
            LazyOrder(weights, self.rng, cumulative),
            lambda excluded: LazyOrder(weights, self.rng, cumulative, excluded),
            estimator=self.estimator,
            max_rejections=self.max_rejections,
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
