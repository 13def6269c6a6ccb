"""Small, real constraints and models for the sampler tests (not mocks: each is a complete
implementation of ``TokenConstraint`` over a tiny language, small enough to enumerate)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from stencil.decode.bitmask import bool_to_bitmask


def _fill_from_bools(bitmask: torch.Tensor, index: int, allowed: Sequence[bool] | np.ndarray) -> None:
    row = bool_to_bitmask(torch.as_tensor(np.asarray(allowed, dtype=bool)))
    bitmask[index, : row.shape[0]] = row


class AllowAll:
    """Every id below ``vocab_size`` is allowed at every step; the sequence may always end."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def try_token(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size

    def accept_token(self, token_id: int) -> bool:
        return self.try_token(token_id)

    def fork(self) -> AllowAll:
        return AllowAll(self.vocab_size)

    def is_completed(self) -> bool:
        return True

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        _fill_from_bools(bitmask, index, [True] * self.vocab_size)


class TokenDFA:
    """A regular language over token ids given by an explicit (partial) automaton.

    ``delta[state][token] -> state``; a missing entry rejects. States need not reach an accepting
    state, so the automaton may have dead ends, as a locally checked constraint does.
    """

    def __init__(self, vocab_size: int, delta: dict[int, dict[int, int]], accepting: Iterable[int], state: int = 0):
        self.vocab_size = vocab_size
        self.delta = delta
        self.accepting = frozenset(accepting)
        self.state = state
        self._masks: dict[int, np.ndarray] = {}

    def try_token(self, token_id: int) -> bool:
        return token_id in self.delta.get(self.state, {})

    def accept_token(self, token_id: int) -> bool:
        nxt = self.delta.get(self.state, {}).get(token_id)
        if nxt is None:
            return False
        self.state = nxt
        return True

    def fork(self) -> TokenDFA:
        twin = TokenDFA(self.vocab_size, self.delta, self.accepting, self.state)
        twin._masks = self._masks
        return twin

    def is_completed(self) -> bool:
        return self.state in self.accepting

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        allowed = self._masks.get(self.state)
        if allowed is None:
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[list(self.delta.get(self.state, {}))] = True
            self._masks[self.state] = allowed
        _fill_from_bools(bitmask, index, allowed)


def fixed_set(vocab_size: int, allowed: Iterable[int], completed: bool = False) -> TokenDFA:
    """The same allowed set at every step (one state)."""
    state = {t: 0 for t in allowed}
    return TokenDFA(vocab_size, {0: state}, [0] if completed else [])


class RegexConstraint:
    """Token strings whose concatenation must fully match ``language``.

    ``try_token`` is only as good as ``prefix``: a regex that every prefix of a match satisfies, but
    that may admit more. Strings it admits that can never be completed are dead ends.
    """

    def __init__(self, tokens: Sequence[str], language: str, prefix: str, text: str = ""):
        self.tokens = list(tokens)
        self.language = re.compile(language)
        self.prefix = re.compile(prefix)
        self.text = text

    def try_token(self, token_id: int) -> bool:
        if not 0 <= token_id < len(self.tokens):
            return False
        return self.prefix.fullmatch(self.text + self.tokens[token_id]) is not None

    def accept_token(self, token_id: int) -> bool:
        if not self.try_token(token_id):
            return False
        self.text += self.tokens[token_id]
        return True

    def fork(self) -> RegexConstraint:
        return RegexConstraint(self.tokens, self.language.pattern, self.prefix.pattern, self.text)

    def is_completed(self) -> bool:
        return self.language.fullmatch(self.text) is not None

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        _fill_from_bools(bitmask, index, [self.try_token(t) for t in range(len(self.tokens))])


class Recording:
    """Wraps a constraint and records every question asked of it (for cost-bound tests)."""

    def __init__(self, inner):
        self.inner = inner
        self.tried: list[int] = []
        self.completed_calls = 0
        self.mask_fills = 0

    def try_token(self, token_id: int) -> bool:
        self.tried.append(token_id)
        return self.inner.try_token(token_id)

    def accept_token(self, token_id: int) -> bool:
        return self.inner.accept_token(token_id)

    def fork(self) -> Recording:
        return Recording(self.inner.fork())

    def is_completed(self) -> bool:
        self.completed_calls += 1
        return self.inner.is_completed()

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        self.mask_fills += 1
        self.inner.fill_next_token_bitmask(bitmask, index)


class ToyModel:
    """A deterministic autoregressive "language model" over a tiny vocabulary.

    The logits of a prefix are drawn from a generator seeded by the prefix, so the model is a fixed
    function that can be enumerated exactly; ``next_logits`` is the SMC model callable.
    """

    def __init__(self, vocab_size: int, seed: int, scale: float = 1.5):
        self.vocab_size = vocab_size
        self.seed = seed
        self.scale = scale
        self.calls = 0

    def logits(self, prefix: Sequence[int]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, len(prefix), *prefix])
        return rng.normal(size=self.vocab_size) * self.scale

    def probs(self, prefix: Sequence[int]) -> np.ndarray:
        z = self.logits(prefix)
        e = np.exp(z - z.max())
        return e / e.sum()

    def next_logits(self, prefixes: list[list[int]]) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(np.stack([self.logits(p) for p in prefixes]))


def _chi2_sf(stat: float, dof: int) -> float:
    """Survival function of χ²(dof): the regularized upper incomplete gamma Q(dof/2, stat/2)."""
    if dof < 1:
        return 1.0
    q = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return float(q)


def chi2_pvalue(observed: Sequence[float], expected: Sequence[float], min_expected: float = 5.0) -> float:
    """Pearson χ² goodness-of-fit p-value; cells expected below ``min_expected`` are pooled."""
    obs = np.asarray(observed, dtype=np.float64)
    exp = np.asarray(expected, dtype=np.float64)
    if not math.isclose(obs.sum(), exp.sum(), rel_tol=1e-6):
        raise ValueError(f"observed total {obs.sum()} differs from expected total {exp.sum()}")
    if np.any((exp == 0) & (obs > 0)):
        return 0.0
    small = exp < min_expected
    o = np.append(obs[~small], obs[small].sum())
    e = np.append(exp[~small], exp[small].sum())
    o, e = o[e > 0], e[e > 0]
    return _chi2_sf(float(((o - e) ** 2 / e).sum()), len(o) - 1)


def chi2_same_distribution(a: Sequence[float], b: Sequence[float], min_expected: float = 5.0) -> float:
    """χ² test of homogeneity of two count vectors over the same cells (p-value)."""
    ca = np.asarray(a, dtype=np.float64)
    cb = np.asarray(b, dtype=np.float64)
    total = ca + cb
    na, nb = ca.sum(), cb.sum()
    ea, eb = total * na / (na + nb), total * nb / (na + nb)
    small = np.minimum(ea, eb) < min_expected
    ca = np.append(ca[~small], ca[small].sum())
    cb = np.append(cb[~small], cb[small].sum())
    ea = np.append(ea[~small], ea[small].sum())
    eb = np.append(eb[~small], eb[small].sum())
    keep = (ea > 0) & (eb > 0)
    ca, cb, ea, eb = ca[keep], cb[keep], ea[keep], eb[keep]
    stat = float(((ca - ea) ** 2 / ea + (cb - eb) ** 2 / eb).sum())
    return _chi2_sf(stat, int(keep.sum()) - 1)


def enumerate_sequences(
    vocab_size: int,
    eos: int,
    max_tokens: int,
) -> list[tuple[int, ...]]:
    """Every token sequence of at most ``max_tokens`` non-EOS tokens (EOS implied at the end)."""
    out: list[tuple[int, ...]] = [()]
    frontier: list[tuple[int, ...]] = [()]
    for _ in range(max_tokens):
        frontier = [s + (t,) for s in frontier for t in range(vocab_size) if t != eos]
        out.extend(frontier)
    return out

