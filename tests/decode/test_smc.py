"""SMC with AWRS weights on enumerable toys: its posterior and evidence against exact enumeration,
and against what plain locally constrained decoding (LCD) produces."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from stencil.decode.smc import effective_sample_size, resample_indices, smc

from .toy_constraints import AllowAll, RegexConstraint, ToyModel, chi2_pvalue, enumerate_sequences

# The toy: tokens "a", "b", "ab" and a stop token; outputs of at most 4 tokens. The language is
# b[ab]* | abab, but the constraint only checks the looser prefix language b[ab]* | a[ab]*, so
# every prefix starting with "a" other than the way to "abab" is a dead end.
TOKENS = ["a", "b", "ab"]
EOS = 3
VOCAB = 4
MAX_TOKENS = 4
LANGUAGE = r"b[ab]*|abab"
PREFIX = r"b[ab]*|a[ab]*"


def _toy_constraint() -> RegexConstraint:
    return RegexConstraint(TOKENS, LANGUAGE, PREFIX)


def _sequence_prob(model: ToyModel, y: tuple[int, ...]) -> float:
    prob = 1.0
    for i, t in enumerate(y):
        prob *= model.probs(y[:i])[t]
    return prob * model.probs(y)[EOS]


def exact_target(model: ToyModel) -> tuple[dict[tuple[int, ...], float], float]:
    """π(y) = p(y·eos) 1[y ∈ L] / Z and Z, by enumerating every output of at most 4 tokens."""
    mass = {
        y: _sequence_prob(model, y)
        for y in enumerate_sequences(VOCAB, EOS, MAX_TOKENS)
        if re.fullmatch(LANGUAGE, "".join(TOKENS[t] for t in y))
    }
    z = sum(mass.values())
    return {y: m / z for y, m in mass.items()}, z


def exact_lcd(model: ToyModel) -> dict[tuple[int, ...], float]:
    """The output law of locally constrained decoding, conditioned on not running into a dead end."""
    law: dict[tuple[int, ...], float] = {}

    def walk(y: tuple[int, ...], constraint: RegexConstraint, prob: float) -> None:
        p = model.probs(y)
        allowed = [t for t in range(VOCAB) if t != EOS and constraint.try_token(t)] if len(y) < MAX_TOKENS else []
        stop = constraint.is_completed()
        local = sum(p[t] for t in allowed) + (p[EOS] if stop else 0.0)
        if local == 0.0:
            return  # dead end: LCD has nowhere to go
        if stop:
            law[y] = law.get(y, 0.0) + prob * p[EOS] / local
        for t in allowed:
            nxt = constraint.fork()
            nxt.accept_token(t)
            walk(y + (t,), nxt, prob * p[t] / local)

    walk((), _toy_constraint(), 1.0)
    total = sum(law.values())
    return {y: q / total for y, q in law.items()}


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.mark.parametrize("estimator", ["recursive", "two_loop"])
def test_global_correctness_against_enumeration(estimator):
    model = ToyModel(VOCAB, seed=1)
    target, z = exact_target(model)
    lcd = exact_lcd(model)
    gap = total_variation(lcd, target)
    assert gap > 0.15, "the toy must make LCD measurably wrong"

    # The posterior: pooled over independent runs, it approaches π (and not LCD's law).
    pooled: dict[tuple[int, ...], float] = {}
    runs = 30
    for seed in range(runs):
        result = smc(model.next_logits, _toy_constraint(), eos_ids=[EOS], n_particles=100,
                     max_tokens=MAX_TOKENS, estimator=estimator, seed=seed)
        for y, w in result.posterior.items():
            assert re.fullmatch(LANGUAGE, "".join(TOKENS[t] for t in y))
            pooled[y] = pooled.get(y, 0.0) + w / runs
    assert total_variation(pooled, target) < 0.05
    assert total_variation(pooled, lcd) > 0.15

    # The evidence: exp(log_ml) is unbiased for Z at any number of particles.
    estimates = np.array([
        math.exp(smc(model.next_logits, _toy_constraint(), eos_ids=[EOS], n_particles=4,
                     max_tokens=MAX_TOKENS, estimator=estimator, seed=1000 + s).log_ml)
        for s in range(300)
    ])
    se = estimates.std() / math.sqrt(estimates.size)
    assert abs(estimates.mean() - z) < 4 * se


def test_multinomial_resampling_and_every_step_resampling_stay_correct():
    model = ToyModel(VOCAB, seed=1)
    target, z = exact_target(model)
    pooled: dict[tuple[int, ...], float] = {}
    estimates = []
    runs = 30
    for seed in range(runs):
        result = smc(model.next_logits, _toy_constraint(), eos_ids=[EOS], n_particles=100,
                     max_tokens=MAX_TOKENS, ess_threshold=1.0, resampling="multinomial", seed=seed)
        assert result.resamples >= 1
        estimates.append(math.exp(result.log_ml))
        for y, w in result.posterior.items():
            pooled[y] = pooled.get(y, 0.0) + w / runs
    assert total_variation(pooled, target) < 0.08  # multinomial at every step: noisier, still close
    estimates = np.array(estimates)
    assert abs(estimates.mean() - z) < 4 * estimates.std() / math.sqrt(runs)


class _Shaped:
    """The toy model with its stop probability pinned: 0 before ``no_stop_before`` tokens, and
    certain from ``certain_from`` tokens on (``None``: never forced)."""

    def __init__(self, model: ToyModel, *, no_stop_before: int = 0, certain_from: int | None = None):
        self.model = model
        self.no_stop_before = no_stop_before
        self.certain_from = certain_from

    def logits(self, prefix) -> np.ndarray:
        z = self.model.logits(prefix).copy()
        if len(prefix) < self.no_stop_before:
            z[EOS] = -math.inf
        if self.certain_from is not None and len(prefix) >= self.certain_from:
            z = np.where(np.arange(z.size) == EOS, 0.0, -math.inf)
        return z

    def probs(self, prefix) -> np.ndarray:
        z = self.logits(prefix)
        e = np.exp(z - z.max())
        return e / e.sum()

    def next_logits(self, prefixes):
        return torch.tensor(np.stack([self.logits(p) for p in prefixes]))


@pytest.mark.parametrize("estimator", ["recursive", "two_loop"])
def test_always_true_constraint_is_ancestral_sampling(estimator):
    model = _Shaped(ToyModel(VOCAB, seed=2), certain_from=MAX_TOKENS)
    outputs = enumerate_sequences(VOCAB, EOS, MAX_TOKENS)
    index = {y: i for i, y in enumerate(outputs)}
    counts = np.zeros(len(outputs))
    for seed in range(100):
        result = smc(model.next_logits, AllowAll(VOCAB), eos_ids=[EOS], n_particles=20,
                     max_tokens=MAX_TOKENS, estimator=estimator, seed=seed)
        # Every weight is exactly 1: no resampling, evidence exactly 1, particles i.i.d. ancestral.
        assert result.log_ml == 0.0 and result.resamples == 0
        assert all(p.log_weight == 0.0 and p.stop_token == EOS for p in result.particles)
        for p in result.particles:
            counts[index[tuple(p.tokens)]] += 1
    expected = np.array([_sequence_prob(model, y) for y in outputs])
    assert math.isclose(expected.sum(), 1.0)
    assert chi2_pvalue(counts, expected * counts.sum()) > 1e-4


def test_forced_stop_carries_its_weight_and_incomplete_particles_die():
    # The first step allows every token and the model cannot stop yet, so its weight is exactly 1;
    # then max_tokens = 1 forces the stop: "b" is in the language and keeps p(eos | b) as its
    # weight, "a" and "ab" are not and die.
    model = _Shaped(ToyModel(VOCAB, seed=7), no_stop_before=1)
    constraint = RegexConstraint(TOKENS, r"b", r"[ab]*")
    result = smc(model.next_logits, constraint, eos_ids=[EOS], n_particles=50, max_tokens=1,
                 ess_threshold=0.0, seed=4)
    assert {tuple(p.tokens) for p in result.particles} == {(0,), (1,), (2,)}
    for p in result.particles:
        if p.tokens == [1]:
            assert p.stop_token == EOS
            assert math.isclose(p.log_weight, math.log(model.probs((1,))[EOS]), rel_tol=1e-12)
        else:
            assert p.dead and p.stop_token is None
    assert result.posterior == {(1,): pytest.approx(1.0)}


def test_no_allowed_token_anywhere_kills_everything():
    model = ToyModel(VOCAB, seed=5)
    never = RegexConstraint(TOKENS, r"c", r"c?")  # nothing in the vocabulary starts "c", never complete
    result = smc(model.next_logits, never, eos_ids=[EOS], n_particles=8, max_tokens=3, seed=0)
    assert result.log_ml == -math.inf and result.posterior == {}
    assert all(p.dead for p in result.particles)


def test_same_seed_same_result():
    model = ToyModel(VOCAB, seed=1)

    def run(seed):
        r = smc(model.next_logits, _toy_constraint(), eos_ids=[EOS], n_particles=16,
                max_tokens=MAX_TOKENS, seed=seed)
        return [(tuple(p.tokens), p.log_weight, p.stop_token) for p in r.particles], r.log_ml, r.checks

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_resampling_schemes_are_unbiased():
    log_w = np.log(np.array([0.1, 0.0, 0.5, 0.25, 0.15]))
    rng = np.random.default_rng(0)
    for scheme in ("stratified", "multinomial"):
        counts = np.zeros(5)
        for _ in range(4000):
            counts += np.bincount(resample_indices(log_w, rng, scheme), minlength=5)
        assert counts[1] == 0
        assert chi2_pvalue(counts, np.exp(log_w) * counts.sum()) > 1e-4
    assert math.isclose(effective_sample_size(np.zeros(7)), 7.0)
    assert effective_sample_size(np.array([0.0, -math.inf, -math.inf])) == 1.0


def test_bad_arguments():
    model = ToyModel(VOCAB, seed=0)
    for kwargs in (dict(n_particles=0), dict(max_tokens=-1), dict(ess_threshold=1.5),
                   dict(resampling="systematic"), dict(eos_ids=[])):
        args = dict(eos_ids=[EOS], n_particles=4, max_tokens=3) | kwargs
        with pytest.raises(ValueError):
            smc(model.next_logits, _toy_constraint(), **args)
