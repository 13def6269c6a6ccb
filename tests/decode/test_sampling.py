"""Bitmasks and masked sampling: against brute force, against transformers' own warpers, and
against AWRS (same distribution through the full mask and through rejection)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stencil.decode.awrs import AWRS
from stencil.decode.bitmask import (
    allocate_token_bitmask,
    apply_token_bitmask_inplace,
    bool_to_bitmask,
    unpack_bitmask,
)
from stencil.decode.sampling import (
    SamplingParams,
    constraint_allowed_tokens,
    sample_constrained,
    sample_tokens,
    warp_logits,
)
from stencil.errors import StencilError

from .toy_constraints import RegexConstraint, chi2_pvalue, chi2_same_distribution, fixed_set

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_bitmask(rng: np.random.Generator, batch: int, words: int) -> torch.Tensor:
    raw = rng.integers(-(2**31), 2**31, size=(batch, words), dtype=np.int64)
    return torch.from_numpy(raw.astype(np.int32))


def _brute_allowed(bitmask: torch.Tensor, vocab: int) -> np.ndarray:
    words = bitmask.numpy().astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((bitmask.shape[0], vocab), dtype=bool)
    for b in range(bitmask.shape[0]):
        for t in range(min(vocab, 32 * bitmask.shape[1])):
            out[b, t] = (words[b, t // 32] >> (t % 32)) & 1 == 1
    return out


# --------------------------------------------------------------------------- bitmasks


def test_allocated_bitmask_allows_everything():
    mask = allocate_token_bitmask(3, 70)
    assert mask.dtype == torch.int32 and mask.shape == (3, 3)
    assert unpack_bitmask(mask, 70).all()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 200), st.integers(0, 2**32 - 1))
def test_unpack_matches_bit_by_bit(batch, words, vocab, seed):
    mask = _random_bitmask(np.random.default_rng(seed), batch, words)
    assert np.array_equal(unpack_bitmask(mask, vocab).numpy(), _brute_allowed(mask, vocab))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 130), st.integers(0, 2**32 - 1))
def test_bool_to_bitmask_round_trip(batch, vocab, seed):
    allowed = np.random.default_rng(seed).random((batch, vocab)) < 0.5
    packed = bool_to_bitmask(allowed)
    assert packed.shape == (batch, (vocab + 31) // 32)
    assert np.array_equal(unpack_bitmask(packed, vocab).numpy(), allowed)
    assert np.array_equal(_brute_allowed(packed, vocab), allowed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [50, 64, 100])  # narrower than, equal to, wider than 64 mask bits
def test_apply_bitmask_widths_and_dtypes(device, dtype, vocab):
    rng = np.random.default_rng(vocab)
    mask = _random_bitmask(rng, 4, 2)
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    before = logits.clone()
    apply_token_bitmask_inplace(logits, mask)
    allowed = _brute_allowed(mask, vocab)  # ids >= 64 are not allowed: past the mask
    got = logits.float().cpu().numpy()
    assert np.all(np.isneginf(got[~allowed]))
    assert np.array_equal(got[allowed], before.float().cpu().numpy()[allowed])


@pytest.mark.parametrize("device", DEVICES)
def test_apply_bitmask_selected_rows(device):
    rng = np.random.default_rng(1)
    mask = _random_bitmask(rng, 5, 3)
    logits = torch.randn(5, 90).to(device)
    before = logits.clone()
    apply_token_bitmask_inplace(logits, mask, indices=[3, 1])
    allowed = _brute_allowed(mask, 90)
    got, ref = logits.cpu().numpy(), before.cpu().numpy()
    for row in range(5):
        if row in (1, 3):
            assert np.all(np.isneginf(got[row][~allowed[row]]))
            assert np.array_equal(got[row][allowed[row]], ref[row][allowed[row]])
        else:
            assert np.array_equal(got[row], ref[row])


def test_apply_bitmask_rejects_bad_input():
    logits = torch.zeros(2, 40)
    with pytest.raises(TypeError):
        apply_token_bitmask_inplace(logits, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError):
        apply_token_bitmask_inplace(logits, allocate_token_bitmask(3, 40))
    with pytest.raises(IndexError):
        apply_token_bitmask_inplace(logits, allocate_token_bitmask(2, 40), indices=[2])
    with pytest.raises(TypeError):
        apply_token_bitmask_inplace(torch.zeros(2, 40, dtype=torch.int64), allocate_token_bitmask(2, 40))


# --------------------------------------------------------------------------- warpers


def _transformers_warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    out = logits.clone()
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    if p.temperature not in (0.0, 1.0):
        out = TemperatureLogitsWarper(p.temperature)(ids, out)
    if p.top_k:
        out = TopKLogitsWarper(top_k=p.top_k)(ids, out)
    if p.top_p < 1.0:
        out = TopPLogitsWarper(top_p=p.top_p)(ids, out)
    if p.min_p > 0.0:
        out = MinPLogitsWarper(min_p=p.min_p)(ids, out)
    return out


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.5, 1.0, 1.7]),
    st.sampled_from([0, 1, 5, 40]),
    st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    st.sampled_from([0.0, 0.05, 0.3]),
    st.booleans(),
)
def test_warpers_match_transformers(seed, temperature, top_k, top_p, min_p, masked):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 60, generator=gen) * 2
    if masked:
        logits[torch.rand(3, 60, generator=gen) < 0.5] = -math.inf
        logits[:, 0] = 0.0  # keep every row alive
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = warp_logits(logits, params)
    ref = _transformers_warp(logits, params)
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
    finite = ~torch.isneginf(ref)
    assert torch.allclose(ours[finite], ref[finite])


def test_sampling_params_validation():
    for bad in (dict(temperature=-1.0), dict(temperature=math.nan), dict(top_k=-1), dict(top_k=1.5),
                dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=2.0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("device", DEVICES)
def test_mask_first_then_warpers(device):
    vocab = 64
    logits = torch.arange(vocab, dtype=torch.float32).flip(0).repeat(2, 1).to(device)  # token 0 is best
    allowed = torch.zeros(2, vocab, dtype=torch.bool)
    allowed[:, 10:20] = True
    mask = bool_to_bitmask(allowed)
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(20):
        # top-k = 1 after the mask is the best *allowed* token, never the unmasked argmax.
        assert sample_tokens(logits, SamplingParams(top_k=1), bitmask=mask, generator=gen).tolist() == [10, 10]
    assert sample_tokens(logits, SamplingParams(temperature=0.0), bitmask=mask).tolist() == [10, 10]
    assert logits[0, 0] == vocab - 1, "the input logits must not be modified"


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible(device):
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(3)).to(device)
    mask = bool_to_bitmask(torch.rand(8, 500, generator=torch.Generator().manual_seed(4)) < 0.3)
    params = SamplingParams(temperature=0.8, top_p=0.9)

    def run(seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return [sample_tokens(logits, params, bitmask=mask, generator=gen).tolist() for _ in range(5)]

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(temperature=0.7, top_k=12), SamplingParams(top_p=0.8, min_p=0.02)],
)
def test_masked_sampling_distribution(params):
    vocab, n = 40, 20000
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(vocab, generator=gen) * 1.5
    allowed = torch.rand(vocab, generator=gen) < 0.6
    mask = bool_to_bitmask(allowed)
    batch = logits.repeat(n, 1)
    tokens = sample_tokens(batch, params, bitmask=mask.repeat(n, 1), generator=gen)
    masked = logits.masked_fill(~allowed, -math.inf).unsqueeze(0)
    expected = warp_logits(masked, params).softmax(-1)[0].double().numpy()
    assert chi2_pvalue(np.bincount(tokens.numpy(), minlength=vocab), expected * n) > 1e-4


def test_row_without_allowed_tokens_is_an_error():
    mask = allocate_token_bitmask(2, 40)
    mask[1] = 0
    with pytest.raises(StencilError, match=r"row\(s\) \[1\]"):
        sample_tokens(torch.zeros(2, 40), bitmask=mask)


def test_constraint_mask_sets_eos_from_completion():
    vocab, eos = 20, [18, 19]
    for completed in (False, True):
        constraint = fixed_set(vocab, [2, 5, 18], completed=completed)
        allowed = constraint_allowed_tokens(constraint, vocab + 45, eos)  # model logits wider
        expected = np.zeros(vocab + 45, dtype=bool)
        expected[[2, 5]] = True
        expected[eos] = completed
        assert np.array_equal(allowed, expected)


def _awrs_vs_mask(logits: torch.Tensor, make_constraint, eos: list[int], n: int, seed: int) -> float:
    vocab = logits.shape[0]
    sampler = AWRS(eos_ids=eos, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    by_awrs = np.zeros(vocab)
    by_mask = np.zeros(vocab)
    for _ in range(n):
        by_awrs[sampler.sample(logits, make_constraint()).token] += 1
        by_mask[sample_constrained(logits, make_constraint(), eos_ids=eos, generator=gen)] += 1
    return chi2_same_distribution(by_awrs, by_mask)


def test_masked_sampling_and_awrs_agree_on_a_token_set():
    vocab = 30
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(6)) * 2
    allowed = [1, 4, 7, 8, 15, 22, 29]
    assert _awrs_vs_mask(logits, lambda: fixed_set(vocab, allowed, completed=True), [29], 2000, 1) > 1e-4


def test_masked_sampling_and_awrs_agree_on_a_regex():
    tokens = ["a", "b", "ab", "ba", "bb", "aab", "", ""]  # the two empty strings stand for stop ids
    constraint = RegexConstraint(tokens[:6], r"(ab)+b*", r"(ab)*a?|(ab)+b*")
    constraint.accept_token(2)  # text "ab": may stop, or go on with "a", "ab", "b", "bb", ...
    logits = torch.randn(len(tokens), generator=torch.Generator().manual_seed(7))
    assert _awrs_vs_mask(logits, constraint.fork, [6, 7], 2000, 2) > 1e-4
