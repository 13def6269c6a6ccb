"""AWRS: exactness and proper weighting, proven by exact enumeration and checked statistically.

The enumeration drives :func:`stencil.decode.awrs.awrs_core` itself (the function the sampler
runs) with scripted draw orders and exact rational probabilities, visiting every possible draw
sequence with its probability.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stencil.decode.awrs import AWRS, BLOCK, KeyOrder, LazyOrder, PrefetchOrder, awrs_core
from stencil.decode.sampling import constraint_allowed_tokens

from .toy_constraints import AllowAll, Recording, TokenDFA, chi2_pvalue, chi2_same_distribution, fixed_set

ESTIMATORS = ["recursive", "two_loop"]


# --------------------------------------------------------------------------- exact enumeration


class _NeedDraw(Exception):
    def __init__(self, loop: int, available: list[int]):
        self.loop = loop
        self.available = available


class _ScriptedOrder:
    """A draw order whose draws are dictated by the enumeration; asks for more when it runs out."""

    def __init__(self, script: list[int], support: list[int], loop: int):
        self.script = script
        self.support = support
        self.loop = loop
        self.pos = 0

    def next(self) -> int | None:
        if self.pos < len(self.script):
            self.pos += 1
            return self.script[self.pos - 1]
        available = [t for t in self.support if t not in self.script]
        if not available:
            return None
        raise _NeedDraw(self.loop, available)

    def skip_to_valid(self, valid):
        passed = []
        while True:
            t = self.next()
            if t is None or valid[t]:
                return t, passed
            passed.append(t)


class _FractionMasses:
    """Exact arithmetic; ``probs`` may sum to less than 1 (zeroed padding ids, as in the sampler)."""

    zero = Fraction(0)

    def __init__(self, probs: list[Fraction]):
        self.probs = probs
        self.total = sum(probs, Fraction(0))

    def p(self, token: int) -> Fraction:
        return self.probs[token]

    def mass(self, tokens) -> Fraction:
        return sum((self.probs[t] for t in tokens), Fraction(0))

    def remaining(self, excluded, excluded_mass: Fraction) -> Fraction:
        return self.total - excluded_mass

    def valid_mass(self, valid) -> Fraction:
        return sum((p for p, ok in zip(self.probs, valid) if ok), Fraction(0))


def enumerate_awrs(probs: list[Fraction], valid: set[int], estimator: str, max_rejections: int,
                   prefetch: bool = False):
    """Every run of the AWRS core: a list of (probability, draws1, draws2, outcome, checked).

    ``prefetch``: the first loop's order runs one draw ahead through :class:`PrefetchOrder`, whose
    judge answers for every token it is given (as ``GrammarMatcher.try_tokens`` does), as the
    sampler runs the recursive estimator on a matcher.
    """
    vocab = len(probs)
    support = [t for t in range(vocab) if probs[t] > 0]
    masses = _FractionMasses(probs)
    mask = [t in valid for t in range(vocab)]
    runs = []
    stack: list[tuple[list[int], list[int], Fraction]] = [([], [], Fraction(1))]
    while stack:
        d1, d2, prob = stack.pop()
        checked: list[int] = []

        def check(t: int) -> bool:
            checked.append(t)
            return t in valid

        order = _ScriptedOrder(d1, support, 1)
        if prefetch:
            order = PrefetchOrder(order, lambda tokens: [check(t) for t in tokens])
        try:
            out = awrs_core(
                masses,
                order.check if prefetch else check,
                lambda: mask,
                order,
                lambda excluded: _ScriptedOrder(d2, [t for t in support if t not in excluded], 2),
                estimator=estimator,
                max_rejections=max_rejections,
                final_check=order.check_final if prefetch else None,
            )
        except _NeedDraw as need:
            left = sum(probs[t] for t in need.available)
            for t in need.available:
                step = prob * probs[t] / left
                stack.append((d1 + [t], d2, step) if need.loop == 1 else (d1, d2 + [t], step))
            continue
        runs.append((prob, tuple(d1), tuple(d2), out, checked))
    return runs


@st.composite
def small_problems(draw):
    vocab = draw(st.integers(1, 5))
    weights = draw(st.lists(st.integers(0, 6), min_size=vocab, max_size=vocab).filter(lambda w: sum(w) > 0))
    total = sum(weights)
    probs = [Fraction(w, total) for w in weights]
    valid = set(draw(st.sets(st.integers(0, vocab - 1), max_size=vocab)))
    return probs, valid


def _swept_problems():
    """Every valid set over a few fixed distributions (uniform, skewed, with zeros), V = 1..5.

    ``padding`` is mass on ids that are never drawn (a model's padding past the constraint's
    vocabulary): the sampler zeroes it after normalizing, so the probabilities sum to less than 1.
    """
    cases = [((1,), 0), ((1, 1), 0), ((3, 1), 0), ((1, 1, 1), 0), ((4, 0, 1), 0), ((1, 2, 3, 4), 0),
             ((0, 1, 0, 3, 2), 0), ((6, 1, 1, 1, 1), 0), ((1, 2, 3, 4, 5), 0), ((2, 1, 1), 3), ((1, 3, 1, 2), 1)]
    for w, padding in cases:
        probs = [Fraction(x, sum(w) + padding) for x in w]
        for bits in range(2 ** len(w)):
            yield probs, {t for t in range(len(w)) if bits >> t & 1}


@pytest.mark.parametrize("problem", list(_swept_problems()), ids=lambda p: f"{p[0]}-{sorted(p[1])}")
def test_exact_enumeration_sweep(problem):
    check_exact_enumeration(*problem)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(small_problems())
def test_exact_enumeration_random(problem):
    check_exact_enumeration(*problem)


def check_exact_enumeration(probs: list[Fraction], valid: set[int]) -> None:
    """Exactness, proper weighting and unbiasedness of both estimators, for three budgets."""
    vocab = len(probs)
    z = sum((probs[t] for t in valid), Fraction(0))
    for estimator, prefetch in [("recursive", False), ("recursive", True), ("two_loop", False)]:
        by_script = {}
        for max_rejections in (1, 2, 64):
            runs = enumerate_awrs(probs, valid, estimator, max_rejections, prefetch)
            assert sum(r[0] for r in runs) == 1
            p_token = [Fraction(0)] * vocab
            weighted = [Fraction(0)] * vocab
            mean_z = Fraction(0)
            for prob, d1, d2, out, checked in runs:
                assert len(set(checked)) == len(checked), "a token was checked twice"
                assert all(probs[t] > 0 for t in checked), "a zero-probability token was checked"
                assert out.rejections <= max_rejections
                if prefetch and not out.fallback:
                    assert len(checked) <= out.rejections + 2  # nothing judged ahead goes unused
                mean_z += prob * out.weight
                if out.token is None:
                    assert z == 0 and out.weight == 0
                    continue
                assert out.token in valid
                p_token[out.token] += prob
                weighted[out.token] += prob * out.weight
            assert mean_z == z, (estimator, max_rejections)
            for a in range(vocab):
                target = probs[a] if a in valid else Fraction(0)
                assert weighted[a] == target, (estimator, max_rejections, a)  # E[ŵ 1{x=a}] = p(a) c(a)
                if z > 0:
                    assert p_token[a] == target / z  # the sample is exact
            if estimator == "two_loop":
                # Its fallback only replaces checks by mask lookups: same draws, same outcome.
                outcome = {(d1, d2): (out.token, out.weight) for _, d1, d2, out, _ in runs}
                for key, value in by_script.items():
                    if key in outcome:
                        assert outcome[key] == value
                by_script.update(outcome)


def test_enumeration_example_by_hand():
    """p = (1/2, 1/4, 1/4) with only token 2 valid (Z = 1/4), worked out on paper.

    Recursive: x = 2 always, and every token after it is invalid, so Ẑ = p(2) = 1/4 on every run.
    Two-loop, by the first loop's rejections before 2 (probability; ψ0; second loop over the rest):
      none (1/4; 0; n1 = 0, 1, 2 w.p. 1/4, 1/3, 5/12) -> Ẑ = 1, 1/2, 1/3
      {0}  (1/4; 1/2; 2 first w.p. 1/2)               -> Ẑ = 1/4 or 1/6
      {1}  (1/12; 1/4; 2 first w.p. 1/3)              -> Ẑ = 3/8 or 1/4
      {0,1} (5/12; 3/4; n1 = 0)                       -> Ẑ = 1/12
    """
    probs = [Fraction(1, 2), Fraction(1, 4), Fraction(1, 4)]
    F = Fraction
    for estimator, expected in [
        ("recursive", {F(1, 4): F(1)}),
        (
            "two_loop",
            {
                F(1): F(1, 16),
                F(1, 2): F(1, 12),
                F(1, 3): F(5, 48),
                F(1, 4): F(1, 8) + F(1, 18),
                F(1, 6): F(1, 8),
                F(3, 8): F(1, 36),
                F(1, 12): F(5, 12),
            },
        ),
    ]:
        law: dict[Fraction, Fraction] = {}
        for prob, _, _, out, _ in enumerate_awrs(probs, {2}, estimator, 64):
            assert out.token == 2
            law[out.weight] = law.get(out.weight, Fraction(0)) + prob
        assert law == expected
        assert sum(w * q for w, q in law.items()) == Fraction(1, 4)


# --------------------------------------------------------------------------- the draw order


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from([-math.inf, -1.0, 0.0, 0.5, 2.0, 3.0]) | st.floats(-5, 5), min_size=1, max_size=300))
def test_key_order_is_the_sorted_order(values):
    keys = np.array(values, dtype=np.float64)
    ids = np.arange(keys.size)
    expected = [int(i) for i in ids[np.lexsort((ids, -keys))] if keys[i] > -math.inf]
    order = KeyOrder(keys)
    got = []
    while (t := order.next()) is not None:
        got.append(t)
    assert got == expected


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    st.lists(st.sampled_from([-math.inf, 0.0, 1.0]) | st.floats(-5, 5), min_size=1, max_size=200),
    st.integers(0, 2**32 - 1),
    st.integers(0, 40),
)
def test_skip_to_valid_matches_stepping(values, seed, steps_first):
    keys = np.array(values, dtype=np.float64)
    valid = np.random.default_rng(seed).random(keys.size) < 0.2
    stepping = KeyOrder(keys)
    skipping = KeyOrder(keys)
    for _ in range(steps_first):
        t = stepping.next()
        assert t == skipping.next()
        if t is None or valid[t]:
            return
    passed = []
    while (t := stepping.next()) is not None and not valid[t]:
        passed.append(t)
    hit, skipped = skipping.skip_to_valid(valid)
    assert (hit, sorted(skipped)) == (t, sorted(passed))


def _plackett_luce(weights: list[float], prefix: tuple[int, ...], excluded: frozenset[int]) -> float:
    """Probability that sampling without replacement (excluded ids removed) starts with ``prefix``."""
    left = {t: w for t, w in enumerate(weights) if t not in excluded}
    prob = 1.0
    for t in prefix:
        prob *= left[t] / sum(left.values())
        del left[t]
    return prob


@pytest.mark.parametrize("excluded", [(), (0,), (3, 1)])
def test_lazy_order_is_sampling_without_replacement(excluded):
    # Token 0 holds most of the mass: drawing it leaves a remaining mass far below the drawn one.
    weights = [5.0, 1.0, 0.0, 2.0, 0.5, 1.5]
    with np.errstate(divide="ignore"):
        w = np.log(np.array(weights))  # the order takes logits
    rng = np.random.default_rng(31)
    counts: Counter = Counter()
    n = 6000
    for _ in range(n):
        order = LazyOrder(w, rng, excluded=excluded)
        seq = []
        while (t := order.next()) is not None:
            seq.append(t)
        assert sorted(seq) == sorted(t for t in range(6) if weights[t] > 0 and t not in excluded)
        counts[tuple(seq[:3])] += 1
    cells = sorted(counts)
    expected = [_plackett_luce(weights, c, frozenset(excluded)) * n for c in cells]
    assert math.isclose(sum(expected), n, rel_tol=1e-9), "an impossible prefix was drawn"
    assert chi2_pvalue([counts[c] for c in cells], expected) > 1e-4


@pytest.mark.parametrize("steps_first", [0, 1, 2])
def test_lazy_order_skip_to_valid_has_the_law_of_stepping(steps_first):
    with np.errstate(divide="ignore"):
        weights = np.log(np.array([3.0, 1.0, 0.0, 2.0, 0.5, 1.5, 0.7]))
    valid = np.array([False, False, True, False, True, False, True])
    rng = np.random.default_rng(41 + steps_first)

    def outcome(skip: bool):
        order = LazyOrder(weights, rng)
        for _ in range(steps_first):
            t = order.next()
            if valid[t]:
                return ("stopped early", t)
        if skip:
            hit, passed = order.skip_to_valid(valid)
            return hit, frozenset(passed)
        passed = []
        while not valid[t := order.next()]:
            passed.append(t)
        return t, frozenset(passed)

    stepped = Counter(outcome(False) for _ in range(5000))
    skipped = Counter(outcome(True) for _ in range(5000))
    cells = sorted(set(stepped) | set(skipped), key=repr)
    assert chi2_same_distribution([stepped[c] for c in cells], [skipped[c] for c in cells]) > 1e-4


def _spread_weights() -> np.ndarray:
    """Weights over three blocks and a partial fourth: six heavy tokens, a light rest, some zeros."""
    w = np.full(3 * BLOCK + 17, 0.002)
    w[[5, 40, 41, 100]] = 0.0
    for t, x in zip([3, BLOCK, BLOCK + 6, 2 * BLOCK - 1, 2 * BLOCK + 2, 3 * BLOCK + 16], [5, 1, 2, 0.5, 1.5, 3]):
        w[t] = x
    return w


@pytest.mark.parametrize("excluded", [(), (3, 2 * BLOCK + 2, 7)])
def test_lazy_order_across_blocks_is_sampling_without_replacement(excluded):
    """The law of the first two draws (light tokens lumped into one cell) and that a whole run
    produces every token of positive weight once, with a padded tail (``own``) never produced."""
    w = _spread_weights()
    own = w.size - 1  # the last (heavy) token is padding: never produced
    heavy = {t for t in range(own) if w[t] >= 0.5}
    rng = np.random.default_rng(7)
    counts: Counter = Counter()
    n = 6000
    with np.errstate(divide="ignore"):
        logits = np.log(w).astype(np.float32)  # float32 logits, as a model gives them
    for i in range(n):
        order = LazyOrder(logits, rng, own=own, excluded=excluded)
        if i < 20:
            seq = []
            while (t := order.next()) is not None:
                seq.append(t)
            expected = [t for t in range(own) if w[t] > 0 and t not in excluded]
            assert sorted(seq) == expected
        else:
            seq = [order.next(), order.next()]
        counts[tuple(t if t in heavy else -1 for t in seq[:2])] += 1
    p = np.exp(logits.astype(np.float64))
    p[own:] = 0.0
    p[list(excluded)] = 0.0
    expected: Counter = Counter()
    first = p / p.sum()
    for a in np.flatnonzero(p):
        rest = p.copy()
        rest[a] = 0.0
        second = rest / rest.sum()
        for b in np.flatnonzero(rest):
            expected[(a if a in heavy else -1, b if b in heavy else -1)] += first[a] * second[b] * n
    cells = sorted(set(expected) | set(counts))
    assert chi2_pvalue([counts[c] for c in cells], [expected[c] for c in cells]) > 1e-4


@pytest.mark.parametrize("steps_first", [0, 2])
def test_lazy_order_across_blocks_skip_to_valid_has_the_law_of_stepping(steps_first):
    w = _spread_weights()
    with np.errstate(divide="ignore"):
        logits = np.log(w)
    valid = np.zeros(w.size, dtype=bool)
    valid[[BLOCK + 6, 2 * BLOCK + 1, 2 * BLOCK + 9, 3 * BLOCK + 16]] = True  # heavy, light, light, heavy
    rng = np.random.default_rng(3 + steps_first)

    def outcome(skip: bool):
        order = LazyOrder(logits, rng)
        for _ in range(steps_first):
            t = order.next()
            if valid[t]:
                return ("stopped early", t)
        if skip:
            return order.skip_to_valid(valid)[0]
        while not valid[t := order.next()]:
            pass
        return t

    stepped = Counter(outcome(False) for _ in range(4000))
    skipped = Counter(outcome(True) for _ in range(4000))
    cells = sorted(set(stepped) | set(skipped), key=repr)
    assert chi2_same_distribution([stepped[c] for c in cells], [skipped[c] for c in cells]) > 1e-4


# --------------------------------------------------------------------------- statistical checks


class Batched(Recording):
    """A recorded constraint that also judges several tokens per call (``try_tokens``, as
    ``GrammarMatcher`` does), so the sampler takes its judge-ahead path."""

    def __init__(self, inner):
        super().__init__(inner)
        self.batches: list[list[int]] = []

    def try_tokens(self, token_ids) -> list[bool]:
        self.batches.append(list(token_ids))
        return [self.try_token(t) for t in token_ids]

    def fork(self) -> Batched:
        return Batched(self.inner.fork())


def _empirical(sampler: AWRS, logits, constraint, n: int):
    tokens, weights = [], []
    for _ in range(n):
        r = sampler.sample(logits, constraint)
        tokens.append(r.token)
        weights.append(r.log_weight)
    return np.array(tokens), np.array(weights)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_always_true_constraint_is_the_model(estimator):
    vocab = 40
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 1.5
    sampler = AWRS(eos_ids=[vocab - 1], estimator=estimator, seed=11)
    tokens, log_w = _empirical(sampler, logits, AllowAll(vocab), 8000)
    assert np.all(log_w == 0.0), "Z = 1 must come out exactly on every call"
    probs = logits.double().softmax(-1).numpy()
    assert chi2_pvalue(np.bincount(tokens, minlength=vocab), probs * tokens.size) > 1e-4


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_exactly_one_valid_token(estimator):
    vocab = 30
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2))
    probs = logits.double().softmax(-1).numpy()
    only = int(np.argsort(probs)[vocab // 3])  # a token of middling probability
    sampler = AWRS(estimator=estimator, seed=5)
    tokens, log_w = _empirical(sampler, logits, fixed_set(vocab, [only]), 3000)
    assert np.all(tokens == only)
    w = np.exp(log_w)
    se = w.std() / math.sqrt(w.size)
    assert abs(w.mean() - probs[only]) < 4 * se + 1e-12


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_no_valid_token_kills_the_particle(estimator):
    vocab = 50
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    for max_rejections in (3, 1000):
        sampler = AWRS(eos_ids=[7], estimator=estimator, max_rejections=max_rejections, seed=0)
        r = sampler.sample(logits, fixed_set(vocab, [], completed=False))
        assert r.token == -1 and r.log_weight == -math.inf


@pytest.mark.parametrize(
    ("estimator", "max_rejections", "wrap"),
    [("recursive", 2, Recording), ("recursive", 5, Batched), ("two_loop", 64, Recording)],
)
def test_conditional_exactness_mid_size_vocabulary(estimator, max_rejections, wrap):
    vocab = 1000
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(vocab, generator=gen) * 2.0
    allowed = torch.randperm(vocab, generator=gen)[:250].tolist()
    sampler = AWRS(estimator=estimator, max_rejections=max_rejections, seed=17)
    n = 6000
    tokens, log_w = _empirical(sampler, logits, wrap(fixed_set(vocab, allowed)), n)
    probs = logits.double().softmax(-1).numpy()
    valid = np.zeros(vocab, dtype=bool)
    valid[allowed] = True
    z = probs[valid].sum()
    assert valid[tokens].all()
    assert chi2_pvalue(np.bincount(tokens, minlength=vocab)[valid], probs[valid] / z * n) > 1e-4
    w = np.exp(log_w)
    assert abs(w.mean() - z) < 4 * w.std() / math.sqrt(n) + 1e-12


@pytest.mark.parametrize(("estimator", "max_rejections"), [("recursive", 64), ("two_loop", 1)])
def test_padded_logits_are_invalid_mass_never_checked(estimator, max_rejections):
    vocab, padded = 30, 40  # the model's logits are wider than the constraint's vocabulary
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(padded, generator=gen)
    logits[vocab:] += 1.0  # padding that the model likes: a lot of invalid mass
    allowed = [2, 9, 17, 29]
    sampler = AWRS(eos_ids=[29], vocab_size=vocab, estimator=estimator, max_rejections=max_rejections, seed=13)
    probs = logits.double().softmax(-1).numpy()
    z = probs[allowed].sum()  # the padding's mass stays in the normalization: it is invalid mass
    n = 4000
    counts = np.zeros(padded)
    weights = np.empty(n)
    for i in range(n):
        rec = Recording(fixed_set(vocab, allowed[:-1], completed=True))
        r = sampler.sample(logits, rec)
        assert all(t < vocab for t in rec.tried)
        counts[r.token] += 1
        weights[i] = math.exp(r.log_weight)
    assert counts[vocab:].sum() == 0
    assert chi2_pvalue(counts[allowed], probs[allowed] / z * n) > 1e-4
    assert abs(weights.mean() - z) < 4 * weights.std() / math.sqrt(n) + 1e-12


@pytest.mark.parametrize(("estimator", "wrap"), [("recursive", Recording), ("recursive", Batched),
                                                 ("two_loop", Recording)])
def test_eos_allowed_exactly_when_complete(estimator, wrap):
    vocab, eos = 12, [10, 11]
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(6))
    probs = logits.double().softmax(-1).numpy()
    allowed = [0, 3, 4]
    for completed in (False, True):
        inner = fixed_set(vocab, allowed, completed=completed)
        sampler = AWRS(eos_ids=eos, estimator=estimator, seed=8)
        counts = np.zeros(vocab)
        for _ in range(3000):
            rec = wrap(inner)
            r = sampler.sample(logits, rec)
            counts[r.token] += 1
            assert not set(rec.tried) & set(eos), "try_token must never see a stop id"
            assert rec.completed_calls <= 1
        valid = np.zeros(vocab, dtype=bool)
        valid[allowed] = True
        valid[eos] = completed
        assert counts[~valid].sum() == 0
        target = probs * valid / (probs * valid).sum()
        assert chi2_pvalue(counts[valid], target[valid] * counts.sum()) > 1e-4


@pytest.mark.parametrize(("estimator", "wrap"), [("recursive", Recording), ("recursive", Batched),
                                                 ("two_loop", Recording)])
def test_cost_bounds_and_reproducibility(estimator, wrap):
    vocab = 300
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(vocab, generator=gen) * 3.0
    zero = torch.randperm(vocab, generator=gen)[:100]
    logits[zero] = -math.inf
    allowed = torch.randperm(vocab, generator=gen)[:20].tolist()
    zero_set = set(zero.tolist())
    runs = []
    for seed in (21, 21, 22):
        sampler = AWRS(eos_ids=[0], estimator=estimator, max_rejections=16, seed=seed)
        trace = []
        for _ in range(200):
            rec = wrap(fixed_set(vocab, allowed, completed=True))
            r = sampler.sample(logits, rec)
            if wrap is Batched:
                assert len(rec.batches) <= (r.rejections + 2) // 2 + 1 and all(len(b) <= 2 for b in rec.batches)
                if not r.fallback:  # every token judged ahead was used: the candidates and the peek
                    assert len(rec.tried) <= r.rejections + 2
            assert not zero_set & set(rec.tried), "a zero-probability token was checked"
            assert len(set(rec.tried)) == len(rec.tried), "a token was checked twice"
            assert r.checks == len(rec.tried) + rec.completed_calls
            assert r.rejections <= 16 and rec.mask_fills == int(r.fallback)
            trace.append((tuple(rec.tried), r))
        runs.append(trace)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(-3, 3), min_size=2, max_size=80),
    st.integers(0, 2**32 - 1),
    st.integers(1, 6),
    st.booleans(),
)
def test_greedy_walk_is_the_constrained_argmax(int_logits, seed, max_rejections, completed):
    vocab = len(int_logits)
    logits = torch.tensor(int_logits, dtype=torch.float32)  # many ties
    rng = np.random.default_rng(seed)
    allowed = [t for t in range(vocab) if rng.random() < 0.3]
    constraint = fixed_set(vocab, allowed, completed=completed)
    eos = [vocab - 1]
    mask = torch.from_numpy(constraint_allowed_tokens(constraint, vocab, eos))
    r = AWRS(eos_ids=eos, max_rejections=max_rejections).argmax(logits, constraint)
    if not mask.any():
        assert r.token == -1 and r.log_weight == -math.inf
    else:
        assert r.token == int(logits.masked_fill(~mask, -math.inf).argmax())


def test_dead_end_state_gives_the_next_step_weight_minus_inf():
    """Walk a small automaton with dead ends: a token leading to a dead state is allowed now, and
    the next step then has no valid token, which AWRS reports as weight -inf (not a crash)."""
    delta = {0: {0: 1, 1: 2}, 1: {2: 0}, 2: {}}  # state 2 is a dead end
    constraint = TokenDFA(3, delta, accepting=[0])
    logits = torch.zeros(3)
    sampler = AWRS(seed=3)
    outcomes = Counter()
    for _ in range(400):
        c = constraint.fork()
        r = sampler.sample(logits, c)
        assert c.accept_token(r.token)
        outcomes[(r.token, math.isfinite(sampler.sample(logits, c).log_weight))] += 1
    assert set(outcomes) == {(0, True), (1, False)}
