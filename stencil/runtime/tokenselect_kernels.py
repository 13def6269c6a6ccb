"""Tensor kernels of TokenSelect: token scoring, the selection masks, and attention over a selected set.

Shapes follow transformers' attention interface: queries ``(B, Hq, Q, D)``, keys and values ``(B, Hkv, K, D)``,
with ``Hq`` a multiple of ``Hkv`` and query head ``h`` reading KV head ``h // (Hq // Hkv)`` (as ``repeat_kv``).
Key positions are indices into the key tensor; ``cand`` (``(B, K)`` bool) marks the keys a chunk of queries may
see (not padding, not in the future).

Scoring and attention come twice, with the same math:

* ``*_reference``: float32 throughout, ``repeat_kv`` of the keys, explicit softmax. Clear, and the oracle for the
  tests; the default on CPU.
* ``*_fused``: the fast path, the default on CUDA. Query heads of a KV group are packed into one matmul against
  that KV head (the cache is never repeated), logits are computed in the cache dtype with float32 softmax, and
  attention over the gathered keys runs in ``scaled_dot_product_attention``. It is plain torch, so it also runs
  (and is tested against the reference) on CPU.

The selection helpers (``fixed_mask``, ``top_k_mask``, ``compact``) are shared by both paths and are O(K) per row
apart from one ``topk``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

__all__ = [
    "attend_dense",
    "attend_fused",
    "attend_reference",
    "compact",
    "fixed_mask",
    "gather_keys",
    "score_fused",
    "score_reference",
    "top_k_mask",
]


def score_reference(q_mean: torch.Tensor, key: torch.Tensor, cand: torch.Tensor, scaling: float) -> torch.Tensor:
    """Soft-vote scores ``(B, K)``: for each head, softmax over the candidates of ``scaling * q_h . k``; summed.

    ``q_mean`` is ``(B, Hq, D)``. Non-candidates score 0 (a row without candidates scores 0 everywhere).
    """
    keys = repeat_kv(key.float(), q_mean.shape[1] // key.shape[1])
    logits = torch.einsum("bhd,bhkd->bhk", q_mean.float(), keys) * scaling
    logits = logits.masked_fill(~cand[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=1)


def score_fused(q_mean: torch.Tensor, key: torch.Tensor, cand: torch.Tensor, scaling: float) -> torch.Tensor:
    """Same scores as :func:`score_reference`, one GQA-packed matmul per KV head in the cache dtype."""
    batch, n_q, dim = q_mean.shape
    n_kv = key.shape[1]
    # Heads kv*g .. kv*g+g-1 share KV head kv: this view is exactly the grouping of repeat_kv.
    q = (q_mean * scaling).to(key.dtype).reshape(batch, n_kv, n_q // n_kv, dim)
    logits = torch.matmul(q, key.transpose(-1, -2)).float()
    logits.masked_fill_(~cand[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2)).nan_to_num(0.0)


def fixed_mask(cand: torch.Tensor, n_sink: int, n_local: int) -> torch.Tensor:
    """The always-kept keys of each row: its first ``n_sink`` and last ``n_local`` candidates (``(B, K)`` bool).

    Ranks count candidates only, so left padding does not eat into the sinks.
    """
    rank = cand.cumsum(dim=1) - 1
    count = rank[:, -1:] + 1
    return cand & ((rank < n_sink) | (rank >= count - n_local))


def top_k_mask(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring eligible keys of each row (all of them if fewer), as a ``(B, K)`` bool mask.

    Tie rule: among equal scores at the boundary, earlier positions win. This makes the set a deterministic
    function of the scores, which ``torch.topk`` alone is not.
    """
    if k == 0:
        return torch.zeros_like(eligible)
    masked = scores.masked_fill(~eligible, float("-inf"))
    kth = masked.topk(min(k, masked.shape[1]), dim=1).values[:, -1:]
    above = masked > kth
    tied = eligible & (masked == kth)
    room = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= room))


def compact(sel: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a ``(B, K)`` selection mask into sorted indices ``(B, S)`` and a validity mask ``(B, S)``.

    ``S`` is ``width`` (which must be >= every row count; passing it saves a device sync) or the largest row count;
    shorter rows are padded with index 0 marked invalid. O(K) per row (a cumsum and a scatter), no sort.
    """
    batch, n_keys = sel.shape
    counts = sel.sum(dim=1)
    if width is None:
        width = int(counts.max()) if batch else 0
    slot = torch.where(sel, sel.cumsum(dim=1) - 1, width)
    idx = torch.zeros(batch, width + 1, dtype=torch.long, device=sel.device)
    # Unselected keys all land in the spare last slot, which is dropped.
    idx.scatter_(1, slot, torch.arange(n_keys, device=sel.device).expand(batch, n_keys))
    valid = torch.arange(width, device=sel.device) < counts[:, None]
    return idx[:, :width].masked_fill(~valid, 0), valid


def gather_keys(states: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``states[b, h, idx[b, s]]`` as ``(B, Hkv, S, D)``."""
    batch, n_kv, n_keys, dim = states.shape
    if not states.is_contiguous():
        return states.gather(2, idx[:, None, :, None].expand(batch, n_kv, idx.shape[1], dim))
    # Whole rows through one index_select: about 3x faster on CPU than gather, which reads an index per element.
    base = torch.arange(batch * n_kv, device=idx.device).view(batch, n_kv, 1) * n_keys
    rows = (base + idx[:, None, :]).reshape(-1)
    return states.view(-1, dim).index_select(0, rows).view(batch, n_kv, idx.shape[1], dim)


def attend_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor, allowed: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of ``query`` over the keys ``idx`` (``(B, S)``); query ``i`` sees slot ``s`` iff ``allowed[b, i, s]``.

    Float32, explicit softmax. A query that sees nothing gets zeros, as SDPA gives.
    """
    groups = query.shape[1] // key.shape[1]
    keys = repeat_kv(gather_keys(key, idx).float(), groups)
    values = repeat_kv(gather_keys(value, idx).float(), groups)
    logits = torch.einsum("bhqd,bhsd->bhqs", query.float(), keys) * scaling
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqs,bhsd->bhqd", weights, values).to(query.dtype)


def attend_fused(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor, allowed: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Same as :func:`attend_reference`: gather the selected keys, then SDPA; one decode query per head is packed
    per KV group so no key is repeated."""
    batch, n_q, n_query, _ = query.shape
    n_kv = key.shape[1]
    keys = gather_keys(key, idx)
    values = gather_keys(value, idx)
    if n_query == 1:
        packed = query.reshape(batch, n_kv, n_q // n_kv, query.shape[-1])
        out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=allowed[:, None], scale=scaling)
        return out.reshape(batch, n_q, 1, value.shape[-1])
    groups = n_q // n_kv
    return F.scaled_dot_product_attention(
        query, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=allowed[:, None], scale=scaling
    )


def attend_dense(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Dense attention over every key (``mask``: ``(B|1, 1, Q, K)`` bool, or None for no restriction)."""
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
