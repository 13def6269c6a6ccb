"""Sequential Monte Carlo over token sequences, with AWRS proposals and weights.

Target: the model's distribution over complete outputs, restricted to the constraint's language,

    π(y) = p(y · eos) · 1[y ∈ L] / Z,    Z = Σ_{y ∈ L, |y| ≤ max_tokens} p(y · eos),

where ``p`` is the autoregressive model and ``|y|`` counts the tokens before the stop token.

Locally constrained decoding (sample each token from ``p(· | prefix)`` restricted to the allowed
tokens) samples ``Π_t p(y_t | y_<t) c_t / Z_t`` instead: the local normalizers ``Z_t`` are missing,
so it favours prefixes whose continuations the model mostly wanted to leave (few valid
continuations, or dead ends it then cannot escape). SMC runs ``N`` such proposals side by side as
particles, multiplies each particle's weight by the AWRS estimate ``Ẑ_t`` of ``Z_t`` at every step
(properly weighted, so the random weights keep SMC exact in the limit), and resamples when the
weights degenerate. The output is a weighted set of complete sequences approximating ``π`` and an
unbiased estimate of ``Z`` (``E[exp(log_ml)] = Z`` for any ``N``).

Stop tokens: a particle ends when AWRS draws a stop id (allowed exactly when the constraint is
complete). A particle holding ``max_tokens`` tokens is forced to stop: its weight is multiplied by
the model's total stop probability if the constraint is complete and by 0 otherwise (it dies), and
the stop id is drawn in proportion to its probability. A particle whose step finds no allowed token
dies too (weight 0); resampling replaces dead particles.

The model is a callable ``next_logits(prefixes) -> [len(prefixes), V]`` (torch or numpy), so a real
``transformers`` model plugs in by running one batched forward pass over the live particles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from stencil.decode.awrs import AWRS, Estimator, logits_to_numpy
from stencil.decode.sampling import TokenConstraint
from stencil.errors import StencilError

__all__ = ["NextLogits", "Particle", "SMCResult", "smc", "resample_indices", "effective_sample_size"]

NextLogits = Callable[[list[list[int]]], "torch.Tensor | np.ndarray"]
Resampling = Literal["stratified", "multinomial"]


@dataclass
class Particle:
    """One hypothesis: its tokens (without the stop token), log weight and constraint state."""

    tokens: list[int]
    log_weight: float
    constraint: TokenConstraint
    stop_token: int | None = None

    @property
    def dead(self) -> bool:
        return self.log_weight == -math.inf

    @property
    def finished(self) -> bool:
        return self.stop_token is not None or self.dead


@dataclass(frozen=True)
class SMCResult:
    """What :func:`smc` returns.

    ``posterior`` maps each complete output (token tuple, stop token excluded) to its normalized
    weight; it is empty when every particle died. ``log_ml`` estimates ``log Z`` (``-inf`` when
    every particle died). ``checks`` counts the constraint evaluations of all AWRS steps.
    """

    particles: list[Particle]
    posterior: dict[tuple[int, ...], float]
    log_ml: float
    steps: int
    resamples: int
    checks: int


def _logsumexp(values: np.ndarray) -> float:
    top = values.max()
    if top == -math.inf:
        return -math.inf
    return float(top + math.log(np.exp(values - top).sum()))


def effective_sample_size(log_weights: np.ndarray) -> float:
    """``(Σ w)^2 / Σ w^2`` of the weights; 0 when all are zero."""
    top = log_weights.max()
    if top == -math.inf:
        return 0.0
    w = np.exp(log_weights - top)
    return float(w.sum() ** 2 / (w * w).sum())


def resample_indices(log_weights: np.ndarray, rng: np.random.Generator, scheme: Resampling) -> np.ndarray:
    """Ancestor indices, ``N`` of them, drawn in proportion to the weights.

    ``"stratified"``: one uniform in each of the ``N`` strata of [0, 1) (lower variance);
    ``"multinomial"``: ``N`` independent draws.
    """
    n = log_weights.size
    w = np.exp(log_weights - log_weights.max())
    cdf = np.cumsum(w / w.sum())
    cdf[-1] = 1.0
    if scheme == "stratified":
        u = (np.arange(n) + rng.random(n)) / n
    elif scheme == "multinomial":
        u = rng.random(n)
    else:
        raise ValueError(f"unknown resampling scheme {scheme!r}; expected 'stratified' or 'multinomial'")
    return np.searchsorted(cdf, u, side="right").clip(max=n - 1)


def _rows(logits: torch.Tensor | np.ndarray, expected: int) -> np.ndarray:
    rows = logits_to_numpy(logits)
    if rows.ndim != 2 or rows.shape[0] != expected:
        raise ValueError(f"next_logits must return [{expected}, V] logits, got shape {rows.shape}")
    return rows


def smc(
    next_logits: NextLogits,
    constraint: TokenConstraint,
    *,
    eos_ids: Sequence[int],
    n_particles: int,
    max_tokens: int,
    ess_threshold: float = 0.5,
    resampling: Resampling = "stratified",
    estimator: Estimator = "recursive",
    max_rejections: int = 32,
    vocab_size: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> SMCResult:
    """Run SMC from ``constraint``'s current state (it is forked, never advanced).

    Resampling happens after a step when the effective sample size falls below
    ``ess_threshold * n_particles`` (0 never resamples, 1 always does). ``estimator``,
    ``max_rejections`` and ``vocab_size`` (the constraint's vocabulary when the logits are padded)
    go to :class:`~stencil.decode.awrs.AWRS`. Same seed, same result.
    """
    if n_particles < 1:
        raise ValueError(f"n_particles must be >= 1, got {n_particles}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    if resampling not in ("stratified", "multinomial"):
        raise ValueError(f"unknown resampling scheme {resampling!r}; expected 'stratified' or 'multinomial'")
    eos = sorted({int(e) for e in eos_ids})
    if not eos:
        raise ValueError("SMC needs at least one stop token id to end sequences")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sampler = AWRS(eos, vocab_size=vocab_size, estimator=estimator, max_rejections=max_rejections, seed=rng)
    eos_set = frozenset(eos)

    particles = [Particle([], 0.0, constraint.fork()) for _ in range(n_particles)]
    steps = resamples = checks = 0
    while True:
        live = [p for p in particles if not p.finished]
        if not live:
            break
        rows = _rows(next_logits([list(p.tokens) for p in live]), len(live))
        for particle, row in zip(live, rows):
            if len(particle.tokens) >= max_tokens:
                _force_stop(particle, row, eos, rng)
                continue
            step = sampler.sample(row, particle.constraint)
            checks += step.checks
            particle.log_weight += step.log_weight
            if particle.dead:
                continue
            if step.token in eos_set:
                particle.stop_token = step.token
            elif particle.constraint.accept_token(step.token):
                particle.tokens.append(step.token)
            else:
                raise StencilError(
                    f"the constraint refused token {step.token} after try_token accepted it "
                    f"(prefix {particle.tokens}): try_token and accept_token disagree"
                )
        steps += 1
        log_w = np.array([p.log_weight for p in particles])
        still_running = any(not p.finished for p in particles)
        if still_running and effective_sample_size(log_w) < ess_threshold * n_particles:
            particles = _resample(particles, log_w, rng, resampling)
            resamples += 1

    log_w = np.array([p.log_weight for p in particles])
    log_ml = _logsumexp(log_w) - math.log(n_particles)
    return SMCResult(particles, _posterior(particles), log_ml, steps, resamples, checks)


def _force_stop(particle: Particle, row: np.ndarray, eos: list[int], rng: np.random.Generator) -> None:
    if not particle.constraint.is_completed():
        particle.log_weight = -math.inf
        return
    ids = [e for e in eos if e < row.size]
    row = row.astype(np.float64)  # the logits may be float32
    top = row.max()
    shifted = np.exp(row - top)
    stop_mass = shifted[ids].sum() / shifted.sum() if ids else 0.0
    if stop_mass <= 0.0:
        particle.log_weight = -math.inf
        return
    particle.log_weight += math.log(stop_mass)
    particle.stop_token = int(ids[rng.choice(len(ids), p=shifted[ids] / shifted[ids].sum())])


def _resample(particles: list[Particle], log_w: np.ndarray, rng: np.random.Generator, scheme: Resampling) -> list[Particle]:
    mean = _logsumexp(log_w) - math.log(len(particles))
    out = []
    for a in resample_indices(log_w, rng, scheme):
        src = particles[int(a)]
        out.append(Particle(list(src.tokens), mean, src.constraint.fork(), src.stop_token))
    return out


def _posterior(particles: list[Particle]) -> dict[tuple[int, ...], float]:
    done = [p for p in particles if p.stop_token is not None and not p.dead]
    if not done:
        return {}
    log_w = np.array([p.log_weight for p in done])
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    out: dict[tuple[int, ...], float] = {}
    for p, wi in zip(done, w):
        key = tuple(p.tokens)
        out[key] = out.get(key, 0.0) + float(wi)
    return out
