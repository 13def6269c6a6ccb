"""Masked sampling and AWRS agree on a real grammar with a real tokenizer (GPT-2, 50,257 tokens).

At a few grammar states (inside a JSON string, in an enum, and where the grammar may stop), both
samplers draw from the same seeded random logits. The logits are tilted so the top of the
distribution mixes allowed and disallowed tokens, and AWRS really rejects. Checks:

* a χ² test of homogeneity between the two samplers' counts;
* a χ² goodness-of-fit test of each against the exact target ``p·c/Z``, with ``c`` the
  brute-force mask (every token tried with the parser);
* AWRS's mean weight against the exact ``Z``, within five standard errors.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from stencil.decode.awrs import AWRS
from stencil.decode.matcher import GrammarMatcher
from stencil.decode.bitmask import allocate_token_bitmask, unpack_bitmask
from stencil.decode.sampling import sample_tokens
from stencil.grammar.compiler import GrammarCompiler
from stencil.grammar.vocab import TokenizerInfo
from tests.conftest import tokenizer_dir

from .toy_constraints import chi2_pvalue, chi2_same_distribution

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma", "delta"]}},
    },
    "required": ["name", "tags"],
}
N_AWRS = 1500
N_MASK = 800  # a masked draw costs about three AWRS draws on this vocabulary (softmax + multinomial over 50k)
P_MIN = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Single-row torch ops on a shared, loaded CPU are many times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def gpt2():
    info = TokenizerInfo.from_file(tokenizer_dir("gpt2"))
    return info, GrammarCompiler(info, warm_up=False)


STATES = {
    # (grammar kind, source, text accepted before sampling)
    "in_string": ("schema", SCHEMA, '{"name": "Ad'),
    "enum": ("schema", SCHEMA, '{"name": "Ada", "tags": ["alpha", '),
    "may_stop": ("regex", r"(yes|no)( [a-z]+)*", "yes"),
}


def matcher_at(state: str) -> GrammarMatcher:
    info, compiler = gpt2()
    kind, src, text = STATES[state]
    cg = compiler.compile_json_schema(src) if kind == "schema" else compiler.compile_regex(src)
    m = GrammarMatcher(cg)
    assert m.accept_string(text)
    return m


def tilted_logits(allowed: np.ndarray, seed: int) -> torch.Tensor:
    """Gaussian logits with a few allowed and a few disallowed tokens lifted to the top together."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, allowed.size)
    ok, bad = np.flatnonzero(allowed), np.flatnonzero(~allowed)
    n_ok = min(25, ok.size)
    n_bad = max(2, (3 * n_ok) // 5)
    logits[rng.choice(ok, n_ok, replace=False)] += rng.uniform(7.0, 10.0, n_ok)
    logits[rng.choice(bad, n_bad, replace=False)] += rng.uniform(8.0, 10.0, n_bad)
    return torch.from_numpy(logits)


@pytest.mark.parametrize("state", sorted(STATES))
def test_masked_sampling_and_awrs_agree(state):
    info, _ = gpt2()
    m = matcher_at(state)
    eos = info.stop_token_ids
    allowed = m.brute_force_mask()
    assert allowed[eos].all() == m.is_completed()
    logits = tilted_logits(allowed, seed=sorted(STATES).index(state))
    p = torch.softmax(logits, 0).numpy()
    z = float(p[allowed].sum())
    target = np.where(allowed, p, 0.0) / z
    assert 0.05 < z < 0.95, z  # both accepted and rejected mass are large

    sampler = AWRS(eos_ids=eos, seed=11)
    by_awrs = np.zeros(info.vocab_size)
    weights = np.zeros(N_AWRS)
    checks = 0
    for i in range(N_AWRS):
        r = sampler.sample(logits, m)
        by_awrs[r.token] += 1
        weights[i] = math.exp(r.log_weight)
        checks += r.checks

    # The mask path as a decoder runs it: the matcher fills a bitmask row, sample_tokens applies it.
    bitmask = allocate_token_bitmask(1, info.vocab_size)
    m.fill_next_token_bitmask(bitmask, 0)
    # The χ² tests below only see a wrong mask by chance: compare it with the oracle outright.
    wrong = np.flatnonzero(unpack_bitmask(bitmask[0], info.vocab_size).numpy() != allowed)
    assert wrong.size == 0, f"cached mask differs from brute force on tokens {wrong[:20].tolist()}"
    gen = torch.Generator().manual_seed(12)
    row = logits.float()
    by_mask = np.zeros(info.vocab_size)
    for _ in range(N_MASK):
        by_mask[int(sample_tokens(row, bitmask=bitmask[0], generator=gen))] += 1

    assert by_awrs[~allowed].sum() == 0 and by_mask[~allowed].sum() == 0
    assert chi2_same_distribution(by_awrs, by_mask) > P_MIN
    assert chi2_pvalue(by_awrs[allowed], N_AWRS * target[allowed]) > P_MIN
    assert chi2_pvalue(by_mask[allowed], N_MASK * target[allowed]) > P_MIN
    assert abs(weights.mean() - z) < 5 * weights.std() / math.sqrt(N_AWRS) + 1e-12, (weights.mean(), z)
    assert checks / N_AWRS > 1.5  # AWRS did reject tokens: the test is not the trivial all-valid case
