"""TokenSelect: selection oracles, exactness against dense attention, the error bound, the selection cache, and
the transformers integration on tiny random-weight Llama / Qwen2 / Mistral models (no downloads)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config
from transformers import Qwen2ForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import sdpa_mask

from stencil.errors import StencilError, TokenSelectError
from stencil.runtime import tokenselect_kernels as K
from stencil.runtime.tokenselect import (
    ATTN_IMPLEMENTATION,
    LayerCache,
    TokenSelectConfig,
    TokenSelectStats,
    disable,
    enable,
    get_state,
    select_chunk,
    sparse_attention,
    tokenselect,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = 97


# ----------------------------------------------------------------------------------------------- helpers


def tiny_model(family: str, *, attn: str = "sdpa", sliding_window: int | None = None):
    torch.manual_seed({"llama": 1, "qwen2": 2, "mistral": 3}[family])
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation=attn,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    return model.eval()


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random ids and their 2-D attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        ids[row, : width - n] = 0
    return ids, mask


def causal_bool_mask(attention_mask_2d: torch.Tensor, n_query: int) -> torch.Tensor:
    """The 4-D mask transformers builds for SDPA when a prefill of the whole row is run (materialized)."""
    batch, n_keys = attention_mask_2d.shape
    return sdpa_mask(
        batch_size=batch, q_length=n_query, kv_length=n_keys, q_offset=n_keys - n_query,
        attention_mask=attention_mask_2d.bool(), allow_is_causal_skip=False,
    )


def np_scores(q: np.ndarray, k: np.ndarray, cand: np.ndarray, scaling: float) -> np.ndarray:
    """Brute force soft-vote scores: sum over query heads h of softmax_j(scaling * q_h . k_{h // g, j})."""
    batch, n_q, _ = q.shape
    groups = n_q // k.shape[1]
    out = np.zeros(cand.shape)
    for b in range(batch):
        idx = np.flatnonzero(cand[b])
        if idx.size == 0:
            continue
        for h in range(n_q):
            logits = scaling * (k[b, h // groups][idx] @ q[b, h])
            w = np.exp(logits - logits.max())
            out[b, idx] += w / w.sum()
    return out


def np_top_k(scores: np.ndarray, eligible: np.ndarray, k: int) -> np.ndarray:
    """Top-k via argpartition; tie rule: at the boundary value, earlier positions win."""
    out = np.zeros(scores.shape, dtype=bool)
    for b in range(scores.shape[0]):
        idx = np.flatnonzero(eligible[b])
        if idx.size <= k:
            out[b, idx] = True
            continue
        if k == 0:
            continue
        s = scores[b, idx]
        kth = s[np.argpartition(-s, k - 1)[k - 1]]
        above = idx[s > kth]
        tied = idx[s == kth][: k - above.size]
        out[b, above] = out[b, tied] = True
    return out


def first_last(cand_row: np.ndarray, n_first: int, n_last: int) -> set[int]:
    idx = np.flatnonzero(cand_row)
    return set(idx[:n_first].tolist()) | set(idx[max(idx.size - n_last, 0):].tolist())


@st.composite
def attention_case(draw, *, n_query=None):
    """Random GQA shapes and tensors: q (B,Hq,Q,D), k/v (B,Hkv,K,D), K >= Q."""
    batch = draw(st.integers(1, 3))
    n_kv = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    dim = draw(st.sampled_from([4, 8]))
    n_keys = draw(st.integers(6, 48))
    nq = n_query if n_query is not None else draw(st.integers(1, min(12, n_keys)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    spread = draw(st.sampled_from([0.5, 2.0, 6.0]))
    q = torch.randn(batch, n_kv * groups, nq, dim, generator=g) * spread
    k = torch.randn(batch, n_kv, n_keys, dim, generator=g)
    v = torch.randn(batch, n_kv, n_keys, dim, generator=g)
    return q, k, v


def small_config(values: dict, **overrides) -> TokenSelectConfig:
    return TokenSelectConfig(**{**values, **overrides})


configs = st.fixed_dictionaries(
    {
        "n_sink": st.integers(0, 3),
        "n_local": st.integers(1, 4),
        "top_k": st.integers(0, 6),
        "prefill_chunk": st.integers(1, 6),
        "threshold": st.just(2.0),
    }
)


# ----------------------------------------------------------------------------------------------- config


def test_config_defaults():
    c = TokenSelectConfig()
    assert (c.n_sink, c.n_local, c.top_k, c.threshold, c.prefill_chunk, c.kernel) == (128, 512, 2048, 0.9, 512, "auto")
    assert c.budget() == 128 + 512 + 2048
    assert c.budget(512) == 128 + 512 + 511 + 2048


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n_sink": -1}, "n_sink"),
        ({"n_local": 0}, "n_local"),
        ({"top_k": -3}, "top_k"),
        ({"prefill_chunk": 0}, "prefill_chunk"),
        ({"n_sink": True}, "n_sink"),
        ({"top_k": 2.5}, "top_k"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "0.9"}, "threshold"),
        ({"kernel": "triton"}, "kernel"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(TokenSelectError) as err:
        TokenSelectConfig(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)
    assert isinstance(err.value, StencilError) and isinstance(err.value, ValueError)


# ----------------------------------------------------------------------------------------------- scores and top-k


def test_grouping_is_repeat_kv():
    """The kernels map query head h to KV head h // groups; that is what repeat_kv does."""
    k = torch.randn(2, 3, 5, 4)
    for groups in (1, 2, 4):
        rep = repeat_kv(k, groups)
        for h in range(3 * groups):
            assert torch.equal(rep[:, h], k[:, h // groups])


@SETTINGS
@given(attention_case(n_query=1), st.integers(0, 2**31 - 1))
def test_scores_match_numpy_bruteforce(case, seed):
    q, k, _ = case
    rng = np.random.default_rng(seed)
    cand = torch.from_numpy(rng.random((k.shape[0], k.shape[2])) < 0.7)
    scaling = q.shape[-1] ** -0.5
    want = np_scores(q[:, :, 0].double().numpy(), k.double().numpy(), cand.numpy(), scaling)
    for score in (K.score_reference, K.score_fused):
        got = score(q[:, :, 0], k, cand, scaling)
        np.testing.assert_allclose(got.numpy(), want, atol=2e-5)


@SETTINGS
@given(
    st.integers(1, 3), st.integers(1, 40), st.integers(0, 12), st.integers(0, 2**31 - 1), st.booleans(),
)
def test_top_k_matches_argpartition_with_tie_rule(batch, n_keys, k, seed, coarse):
    rng = np.random.default_rng(seed)
    # Coarse scores force many ties at the boundary.
    scores = rng.integers(0, 4, (batch, n_keys)).astype(np.float32) if coarse else rng.random((batch, n_keys))
    eligible = rng.random((batch, n_keys)) < 0.8
    got = K.top_k_mask(torch.from_numpy(scores).float(), torch.from_numpy(eligible), k)
    np.testing.assert_array_equal(got.numpy(), np_top_k(scores.astype(np.float32), eligible, k))


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_compact_gives_sorted_selected_indices(batch, n_keys, seed):
    sel = torch.from_numpy(np.random.default_rng(seed).random((batch, n_keys)) < 0.4)
    idx, valid = K.compact(sel)
    for b in range(batch):
        assert idx[b][valid[b]].tolist() == torch.nonzero(sel[b]).flatten().tolist()
        assert valid[b].tolist() == sorted(valid[b].tolist(), reverse=True)  # valid slots first


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_gather_keys_contiguous_and_strided_agree(batch, n_kv, n_keys, seed):
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(batch, n_kv, n_keys + 5, 4, generator=g)
    idx = torch.randint(0, n_keys, (batch, 7), generator=g)
    strided = buffer[:, :, :n_keys]
    want = torch.stack([torch.stack([strided[b, h, idx[b]] for h in range(n_kv)]) for b in range(batch)])
    assert torch.equal(K.gather_keys(strided, idx), want)
    assert torch.equal(K.gather_keys(strided.contiguous(), idx), want)


# ----------------------------------------------------------------------------------------------- the selected set


@SETTINGS
@given(configs, st.integers(1, 3), st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_selected_set_properties(cfg_values, batch, n_keys, chunk, seed):
    """Sinks and local window always in; nothing outside the candidates; the configured size; sorted, unique."""
    config = small_config(cfg_values)
    rng = np.random.default_rng(seed)
    cand_np = rng.random((batch, n_keys)) < 0.8
    cand = torch.from_numpy(cand_np)
    q = torch.randn(batch, 4, 8, generator=torch.Generator().manual_seed(seed))
    key = torch.randn(batch, 2, n_keys, 8, generator=torch.Generator().manual_seed(seed + 1))
    sel = select_chunk(q, key, cand, scaling=0.35, config=config, chunk=chunk)
    idx, valid = K.compact(sel)
    for b in range(batch):
        chosen = idx[b][valid[b]].tolist()
        assert chosen == sorted(set(chosen))  # strictly increasing: sorted, no duplicates
        assert set(chosen) <= set(np.flatnonzero(cand_np[b]).tolist())
        assert first_last(cand_np[b], config.n_sink, config.n_local + chunk - 1) <= set(chosen)
        assert len(chosen) == min(int(cand_np[b].sum()), config.budget(chunk))


@settings(SETTINGS, max_examples=25)
@given(attention_case(), configs, st.integers(0, 2**31 - 1))
def test_causality_and_padding_are_exact(case, cfg_values, seed):
    """A query never attends a key after it or a padded key: changing those values cannot change its output,
    and changing keys after a chunk cannot change that chunk (its selection included)."""
    q, k, v = case
    config = small_config(cfg_values)
    batch, n_query, n_keys = q.shape[0], q.shape[2], k.shape[2]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n_keys + 1, batch)
    lengths[0] = n_keys
    pad = torch.ones(batch, n_keys, dtype=torch.long)
    for b, n in enumerate(lengths):
        pad[b, : n_keys - n] = 0
    # The mask transformers builds (bottom-right causal plus padding), and None with several queries: SDPA's
    # top-left causal convention (query i sees keys 0..i), used by transformers when nothing needs masking.
    cases = [(causal_bool_mask(pad, n_query), pad.bool(), n_keys - n_query)]
    if n_query > 1:
        cases.append((None, torch.ones_like(pad, dtype=torch.bool), 0))
    for mask, keep, offset in cases:
        record: list = []
        out = sparse_attention(q, k, v, mask, scaling=0.5, config=config, record=record)
        for start, end, idx, valid in record:
            for b in range(batch):
                chosen = idx[b][valid[b]]
                assert bool(keep[b, chosen].all()), "a padded key was selected"
                assert bool((chosen <= offset + end - 1).all()), "a key after the chunk was selected"
        # Values after query p (and every padded value) are garbage: outputs of queries <= p must not move.
        p = int(rng.integers(0, n_query))
        v2 = v.clone()
        v2[:, :, offset + p + 1:] = 1e4 * torch.randn_like(v2[:, :, offset + p + 1:])
        v2[~keep[:, None, :].expand_as(v2[..., 0])] = -1e4
        out2 = sparse_attention(q, k, v2, mask, scaling=0.5, config=config)
        rows = keep[:, offset: offset + p + 1]  # queries that are not padding themselves
        torch.testing.assert_close(out[:, :, : p + 1].transpose(1, 2)[rows],
                                   out2[:, :, : p + 1].transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)
        # Keys and values from the end of query p's chunk on are garbage: queries of that chunk and before must
        # not move (their chunks' selections cannot see those keys either).
        chunk_end = min((p // config.prefill_chunk + 1) * config.prefill_chunk, n_query)
        k3, v3 = k.clone(), v.clone()
        k3[:, :, offset + chunk_end:] = 50 * torch.randn_like(k3[:, :, offset + chunk_end:])
        v3[:, :, offset + chunk_end:] = 1e4
        out3 = sparse_attention(q, k3, v3, mask, scaling=0.5, config=config)
        rows = keep[:, offset: offset + chunk_end]
        torch.testing.assert_close(out[:, :, :chunk_end].transpose(1, 2)[rows],
                                   out3[:, :, :chunk_end].transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- exactness


@SETTINGS
@given(attention_case(), st.integers(1, 6), st.sampled_from(["reference", "fused"]))
def test_sparse_equals_dense_when_budget_covers(case, chunk, kernel):
    """k covers the context -> the output is dense attention (here through the chunked path, with a causal mask)."""
    q, k, v = case
    n_query, n_keys = q.shape[2], k.shape[2]
    config = TokenSelectConfig(n_sink=0, n_local=1, top_k=n_keys, prefill_chunk=chunk, kernel=kernel)
    pad = torch.ones(q.shape[0], n_keys, dtype=torch.long)
    mask = causal_bool_mask(pad, n_query)
    got = sparse_attention(q, k, v, mask, scaling=0.4, config=config)
    want = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, q.shape[1] // k.shape[1]),
                                                            repeat_kv(v, q.shape[1] // k.shape[1]),
                                                            attn_mask=mask, scale=0.4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(attention_case(), st.integers(0, 2**31 - 1))
def test_attention_over_everything_equals_dense(case, seed):
    """The gather kernels, given every visible key as the selection, equal dense SDPA."""
    q, k, v = case
    n_query, n_keys = q.shape[2], k.shape[2]
    mask = causal_bool_mask(torch.ones(q.shape[0], n_keys, dtype=torch.long), n_query)
    idx = torch.arange(n_keys).expand(q.shape[0], n_keys)
    allowed = mask[:, 0]
    want = K.attend_dense(q, k, v, mask, 0.3)
    for attend in (K.attend_reference, K.attend_fused):
        torch.testing.assert_close(attend(q, k, v, idx, allowed, 0.3), want, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(attention_case(), configs)
def test_fused_kernels_equal_reference(case, cfg_values):
    q, k, v = case
    mask = causal_bool_mask(torch.ones(q.shape[0], k.shape[2], dtype=torch.long), q.shape[2])
    outs, records = [], []
    for kernel in ("reference", "fused"):
        record: list = []
        config = TokenSelectConfig(**{**cfg_values, "kernel": kernel})
        outs.append(sparse_attention(q, k, v, mask, scaling=0.5, config=config, record=record))
        records.append(record)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for (_, _, i0, v0), (_, _, i1, v1) in zip(*records):
        assert torch.equal(i0[v0], i1[v1])


@SETTINGS
@given(attention_case(n_query=1), configs, st.sampled_from(["reference", "fused"]))
def test_error_bound_per_head(case, cfg_values, kernel):
    """||o_sparse - o_dense|| <= 2 (1 - m) max ||v|| per head, m = the dense attention mass on the selected set."""
    q, k, v = case
    config = TokenSelectConfig(**{**cfg_values, "kernel": kernel})
    scaling = 0.5
    record: list = []
    out = sparse_attention(q, k, v, None, scaling=scaling, config=config, record=record).double()
    groups = q.shape[1] // k.shape[1]
    if record:
        _, _, idx, valid = record[0]
    else:  # the context fit the budget: everything was selected
        idx = torch.arange(k.shape[2]).expand(q.shape[0], -1)
        valid = torch.ones_like(idx, dtype=torch.bool)
    for b in range(q.shape[0]):
        chosen = idx[b][valid[b]]
        for h in range(q.shape[1]):
            kh, vh = k[b, h // groups].double(), v[b, h // groups].double()
            w = torch.softmax(scaling * kh @ q[b, h, 0].double(), dim=0)
            mass = float(w[chosen].sum())
            err = float(torch.linalg.vector_norm(out[b, h, 0] - w @ vh))
            bound = 2 * (1 - mass) * float(torch.linalg.vector_norm(vh, dim=1).max())
            assert err <= bound + 1e-5


@SETTINGS
@given(attention_case(n_query=1), configs, st.integers(0, 2**31 - 1))
def test_dominant_token_is_always_selected(case, cfg_values, seed):
    q, k, v = case
    batch, n_q, _, dim = q.shape
    n_kv, n_keys = k.shape[1], k.shape[2]
    groups = n_q // n_kv
    # Every head of a KV group queries the same direction; token j's key points along it, far past the others.
    q = q[:, ::groups].repeat_interleave(groups, dim=1)
    j = int(np.random.default_rng(seed).integers(0, n_keys))
    scaling = 0.5
    unit = q[:, ::groups, 0] / q[:, ::groups, 0].norm(dim=-1, keepdim=True)
    others = scaling * (q[:, ::groups, 0].norm(dim=-1) * k.norm(dim=-1).amax(dim=-1))  # bound on other logits
    k = k.clone()
    k[:, :, j] = unit * ((others + 40) / (scaling * q[:, ::groups, 0].norm(dim=-1)))[..., None]
    record: list = []
    config = small_config(cfg_values, top_k=max(1, cfg_values["top_k"]))
    sparse_attention(q, k, v, None, scaling=scaling, config=config, record=record)
    for _, _, idx, valid in record:
        for b in range(batch):
            assert j in idx[b][valid[b]].tolist()


# ----------------------------------------------------------------------------------------------- the cache


def decode_steps(q_steps, k_full, config, cache, stats=None):
    """Run decode steps t = 0.. with query q_steps[t] over the first n0 + t keys; return each step's selection."""
    n0 = k_full.shape[2] - len(q_steps) + 1
    selections = []
    for t, q in enumerate(q_steps):
        keys = k_full[:, :, : n0 + t]
        cand = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
        selections.append(select_chunk(q, keys, cand, scaling=0.5, config=config, cache=cache, stats=stats))
    return selections


@pytest.fixture
def walk():
    g = torch.Generator().manual_seed(7)
    q_steps = [torch.randn(2, 4, 8, generator=g) for _ in range(8)]
    keys = torch.randn(2, 2, 40, 8, generator=g)
    return q_steps, keys


def test_threshold_above_one_never_reuses(walk):
    q_steps, keys = walk
    config = TokenSelectConfig(n_sink=2, n_local=3, top_k=5, threshold=1.0 + 1e-9)
    stats = TokenSelectStats()
    with_cache = decode_steps(q_steps, keys, config, LayerCache(), stats)
    without = decode_steps(q_steps, keys, config, None)
    assert all(torch.equal(a, b) for a, b in zip(with_cache, without))
    assert stats.hits == 0 and stats.misses == 2 * len(q_steps)


def test_threshold_minus_one_always_reuses(walk):
    """After the first step every row reuses its first top-k set; sinks and window follow the sequence; a cached
    token that the window grows over is kept once."""
    q_steps, keys = walk
    config = TokenSelectConfig(n_sink=2, n_local=3, top_k=5, threshold=-1.0)
    stats = TokenSelectStats()
    sels = decode_steps(q_steps, keys, config, LayerCache(), stats)
    assert stats.hits == 2 * (len(q_steps) - 1) and stats.misses == 2
    first_fixed = K.fixed_mask(torch.ones_like(sels[0]), 2, 3)
    first_top = sels[0] & ~first_fixed
    for sel in sels[1:]:
        n = sel.shape[1]
        fixed = K.fixed_mask(torch.ones_like(sel), 2, 3)
        want = fixed | torch.nn.functional.pad(first_top, (0, n - first_top.shape[1]))
        assert torch.equal(sel, want)
        idx, valid = K.compact(sel)
        for b in range(2):
            chosen = idx[b][valid[b]].tolist()
            assert chosen == sorted(set(chosen)) and len(chosen) <= config.budget()


def test_window_growing_over_cached_tokens_keeps_them_once():
    """A decode step caches a top-k set right behind its window; a following 12-query chunk (window widened by 11)
    reuses it: tokens now inside the window appear once, the rest of the cached set is kept."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 8, generator=g)
    keys = torch.randn(1, 2, 31, 8, generator=g) * 0.1
    group_dirs = q.reshape(1, 2, 2, 8).sum(dim=2)  # what the two query heads of each KV head agree on
    keys[:, :, 20:27] = 3 * group_dirs[:, :, None, :] / group_dirs.norm(dim=-1, keepdim=True)[..., None]
    config = TokenSelectConfig(n_sink=2, n_local=3, top_k=5, threshold=-1.0)
    cache, stats = LayerCache(), TokenSelectStats()
    ones = torch.ones(1, 31, dtype=torch.bool)
    first = select_chunk(q, keys[:, :, :30], ones[:, :30], scaling=0.5, config=config, cache=cache, stats=stats)
    cached = first & ~K.fixed_mask(ones[:, :30], 2, 3)
    assert set(torch.nonzero(cached[0]).flatten().tolist()) <= set(range(20, 27))
    second = select_chunk(q, keys, ones, scaling=0.5, config=config, chunk=12, cache=cache, stats=stats)
    assert stats.hits == 1
    fixed = K.fixed_mask(ones, 2, 3 + 11)  # sinks 0,1 and the window 17..30
    want = fixed | torch.nn.functional.pad(cached, (0, 1))
    assert torch.equal(second, want)
    idx, valid = K.compact(second)
    chosen = idx[0][valid[0]].tolist()
    assert chosen == sorted(set(chosen)) and len(chosen) == int(want.sum()) < config.budget(12)


@pytest.mark.parametrize("bump", [0.0, 1.0])
def test_reuse_happens_exactly_at_threshold(bump):
    """Fingerprints (3,4,0..) then (1,0,..) have cosine exactly 3/5: threshold 0.6 reuses, the next float up does
    not."""
    threshold = 0.6 if bump == 0.0 else float(np.nextafter(0.6, 2.0))
    config = TokenSelectConfig(n_sink=1, n_local=2, top_k=3, threshold=threshold)
    q1 = torch.zeros(1, 2, 4)
    q1[0, 0, 0], q1[0, 0, 1] = 3.0, 4.0
    q2 = torch.zeros(1, 2, 4)
    q2[0, 0, 0] = 1.0
    keys = torch.randn(1, 1, 30, 4, generator=torch.Generator().manual_seed(3))
    stats = TokenSelectStats()
    decode_steps([q1, q2], keys, config, LayerCache(), stats)
    assert (stats.hits, stats.misses) == ((1, 1) if bump == 0.0 else (0, 2))


def test_batch_rows_select_independently(walk):
    """Row 0 repeats its query (hit), row 1 turns orthogonal (miss): each row's selections equal running it alone."""
    q_steps, keys = walk
    q1 = q_steps[0]
    q2 = q1.clone()
    q2[1] = torch.randn(4, 8, generator=torch.Generator().manual_seed(11))
    q2[1] -= (q2[1].flatten() @ q1[1].flatten()) / (q1[1].flatten() @ q1[1].flatten()) * q1[1]
    config = TokenSelectConfig(n_sink=2, n_local=3, top_k=5, threshold=0.5)
    stats = TokenSelectStats()
    together = decode_steps([q1, q2, q2], keys, config, LayerCache(), stats)
    assert (stats.hits, stats.misses) == (3, 3)  # row 0 hits twice; row 1 misses, then hits on a repeat
    for row in (0, 1):
        alone = decode_steps([q[row: row + 1] for q in (q1, q2, q2)], keys[row: row + 1], config, LayerCache())
        for a, b in zip(together, alone):
            assert torch.equal(a[row], b[0])


# ----------------------------------------------------------------------------------------------- transformers


FAMILIES = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_enable_disable_restores_implementation(family):
    model = tiny_model(family, attn="eager")
    state = enable(model, TokenSelectConfig(n_sink=1, n_local=2, top_k=3))
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION and get_state(model) is state
    disable(model)
    assert model.config._attn_implementation == "eager" and get_state(model) is None
    with tokenselect(model, TokenSelectConfig()) as s:
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION and get_state(model) is s
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_logits_equal_sdpa_when_context_fits(family):
    ids, mask = padded_batch([30, 21, 9])
    model = tiny_model(family)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        # Fits outright (plain SDPA), and fits chunk by chunk (the chunked sparse machinery with dense chunks).
        for config, delegated in ((TokenSelectConfig(n_sink=4, n_local=8, top_k=30), True),
                                  (TokenSelectConfig(n_sink=2, n_local=4, top_k=20, prefill_chunk=8), False)):
            with tokenselect(model, config) as state:
                got = model(ids, attention_mask=mask).logits
            stats = state.total_stats()
            assert stats.calls == 2 and (stats.dense_calls == 2) == delegated and stats.misses == 0
            keep = mask.bool()
            torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_that_fit_are_exact_in_a_sparse_batch(family):
    """Row 1 is short (fits the budget) while row 0 is sparse: row 1's logits still equal SDPA."""
    ids, mask = padded_batch([40, 10], seed=1)
    model = tiny_model(family)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with tokenselect(model, TokenSelectConfig(n_sink=2, n_local=3, top_k=4, prefill_chunk=5)) as state:
            got = model(ids, attention_mask=mask).logits
    assert state.total_stats().misses > 0 and state.total_stats().dense_calls == 0
    keep = mask[1].bool()
    torch.testing.assert_close(got[1][keep], want[1][keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], want[0], atol=1e-3)  # row 0 really was sparse


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_with_cache_equals_sdpa_when_context_fits(family):
    ids, mask = padded_batch([33, 25], seed=2)
    model = tiny_model(family)
    from transformers import DynamicCache

    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with tokenselect(model, TokenSelectConfig(n_sink=4, n_local=8, top_k=30)):
            past, parts = DynamicCache(config=model.config), []
            for start in range(0, ids.shape[1], 7):
                end = min(start + 7, ids.shape[1])
                out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=past, use_cache=True)
                parts.append(out.logits)
    got = torch.cat(parts, dim=1)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [None, 6])
def test_generate_equals_sdpa_when_context_fits(family, chunk):
    ids, mask = padded_batch([20, 13], seed=3)
    model = tiny_model(family)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, prefill_chunk_size=chunk)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        with tokenselect(model, TokenSelectConfig(n_sink=4, n_local=8, top_k=30)):
            got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_generate_runs_and_cache_resets_per_sequence(family):
    """A sparse generate uses the cache (threshold -1: every decode step after the first reuses), and a second
    generate starts from a clean cache: it repeats the first run token for token."""
    ids, mask = padded_batch([36, 30], seed=4)
    model = tiny_model(family)
    config = TokenSelectConfig(n_sink=2, n_local=4, top_k=6, threshold=-1.0, prefill_chunk=8)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), tokenselect(model, config) as state:
        first = model.generate(ids, **kwargs)
        stats = state.total_stats()
        second = model.generate(ids, **kwargs)
    assert stats.hits > 0 and stats.misses > 0
    assert torch.equal(first, second)
    assert first.shape == (2, 36 + 5)


def test_sliding_window_layers_stay_dense():
    ids, mask = padded_batch([30, 30], seed=5)
    model = tiny_model("mistral", sliding_window=12)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with tokenselect(model, TokenSelectConfig(n_sink=1, n_local=2, top_k=2)) as state:
            got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert state.total_stats().dense_calls == state.total_stats().calls > 0


def test_bad_uses_raise_typed_errors():
    model = tiny_model("llama")
    with pytest.raises(TokenSelectError):
        enable(torch.nn.Linear(2, 2), TokenSelectConfig())
    with pytest.raises(TokenSelectError):
        enable(model, {"top_k": 4})
    # The implementation selected without enable(): the forward says how to switch it on.
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(TokenSelectError, match="enable"):
        model(torch.ones(1, 4, dtype=torch.long))
    model.set_attn_implementation("sdpa")
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    with pytest.raises(TokenSelectError, match="multiple"):
        sparse_attention(q, k, v, None, scaling=1.0, config=TokenSelectConfig(n_sink=0, n_local=1, top_k=1))
    q = torch.randn(1, 2, 2, 4)
    bias = torch.zeros(1, 1, 2, 9)
    bias[..., 3] = -2.5
    with pytest.raises(TokenSelectError, match="bias"):
        sparse_attention(q, k, v, bias, scaling=1.0, config=TokenSelectConfig(n_sink=0, n_local=1, top_k=1))
    with pytest.raises(TokenSelectError, match="shape"):
        sparse_attention(q, k, v, torch.ones(1, 1, 3, 9, dtype=torch.bool), scaling=1.0,
                         config=TokenSelectConfig(n_sink=0, n_local=1, top_k=1))


def test_additive_zero_or_min_mask_is_accepted():
    """An eager-style additive mask (0 / dtype min) selects and attends like the equivalent bool mask."""
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g), torch.randn(
        2, 2, 20, 8, generator=g)
    pad = torch.ones(2, 20, dtype=torch.long)
    pad[1, :6] = 0
    bool_mask = causal_bool_mask(pad, 5)
    additive = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    config = TokenSelectConfig(n_sink=1, n_local=2, top_k=3, prefill_chunk=2)
    a = sparse_attention(q, k, v, bool_mask, scaling=0.3, config=config)
    b = sparse_attention(q, k, v, additive, scaling=0.3, config=config)
    assert torch.equal(a, b)
    assert math.isfinite(float(a.abs().sum()))
