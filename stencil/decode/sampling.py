"""Masked sampling over a batch of logits, and the constraint protocol the samplers share.

Order of operations (the one ``transformers`` uses, with the grammar as a logits processor): the
grammar mask is applied first, then temperature, top-k, top-p and min-p, in that order. So top-k and
friends choose among *allowed* tokens; a mask can never be undone by a warper.

Everything here is torch and works on CPU and CUDA tensors alike; randomness comes only from the
``torch.Generator`` passed in, so a fixed seed gives the same tokens on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from stencil.decode.bitmask import bitmask_words, unpack_bitmask
from stencil.errors import StencilError

__all__ = [
    "TokenConstraint",
    "SamplingParams",
    "warp_logits",
    "sample_tokens",
    "constraint_allowed_tokens",
    "sample_constrained",
]


@runtime_checkable
class TokenConstraint(Protocol):
    """What the samplers need from a constraint (``GrammarMatcher`` satisfies it).

    * ``try_token(t)``: would token ``t`` be accepted now? Must not change the state. The samplers
      never call it with an end-of-sequence id (they decide those with ``is_completed``), nor with
      ids at or past the ``vocab_size`` they were given (a model's padding ids).
    * ``accept_token(t)``: advance by ``t``; returns whether it was accepted (``False`` leaves the
      state unchanged).
    * ``fork()``: an independent copy (one per SMC particle).
    * ``is_completed()``: the constraint may end here, so an end-of-sequence token is allowed.
    * ``fill_next_token_bitmask(bitmask, index)``: write row ``index`` of an int32
      ``[B, ceil(V/32)]`` bitmask (bit ``t % 32`` of word ``t // 32``; 1 = allowed), covering every
      word of its vocabulary, with bits past its vocabulary cleared. The samplers hand it a row
      that is all zeros, so words past the constraint's vocabulary stay "disallowed".
    """

    def try_token(self, token_id: int) -> bool: ...

    def accept_token(self, token_id: int) -> bool: ...

    def fork(self) -> TokenConstraint: ...

    def is_completed(self) -> bool: ...

    def fill_next_token_bitmask(self, bitmask: Any, index: int = 0) -> None: ...


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults sample from the (masked) model distribution unchanged.

    ``temperature == 0`` means greedy decoding (argmax of the masked logits, lowest id on ties).
    ``top_k == 0``, ``top_p == 1`` and ``min_p == 0`` switch the respective warper off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, on ``[B, V]`` logits; returns a new tensor.

    Removed tokens get ``-inf``. Each warper keeps at least one token per row, as in
    ``transformers``. Greedy parameters leave the logits as they are (the argmax does not change).
    """
    out = logits.clone()
    if params.temperature not in (0.0, 1.0):
        out = out / params.temperature
    neg_inf = float("-inf")
    vocab = out.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth = torch.topk(out, params.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, neg_inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Mass strictly above each token; a token stays while that mass is still short of top_p.
        above = probs.cumsum(dim=-1) - probs
        drop_sorted = above >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, neg_inf)
    if params.min_p > 0.0:
        probs = out.softmax(dim=-1)
        top = probs.max(dim=-1, keepdim=True).values
        out = out.masked_fill(probs < params.min_p * top, neg_inf)
    return out


def _draw(masked: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of already-masked ``[B, V]`` logits: argmax when greedy, else warp and sample."""
    dead = torch.isneginf(masked).all(dim=-1)
    if bool(dead.any()):
        rows = torch.nonzero(dead).flatten().tolist()
        raise StencilError(f"no token is allowed in batch row(s) {rows}: the constraint admits no continuation")
    if params.greedy:
        return masked.argmax(dim=-1)
    probs = warp_logits(masked, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams = SamplingParams(),
    *,
    bitmask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token id per row of ``[B, V]`` logits (or ``[V]``), masked then warped.

    ``bitmask`` (int32 ``[B, ceil(V'/32)]``, see :mod:`stencil.decode.bitmask`) is applied first; the
    input logits are not modified. ``generator`` must live on the logits' device. Raises
    :class:`~stencil.errors.StencilError` when a row has no allowed token. Returns ``int64 [B]``
    (a 0-d tensor for 1-D input).
    """
    squeeze = logits.dim() == 1
    rows = logits.unsqueeze(0) if squeeze else logits
    if rows.dim() != 2:
        raise ValueError(f"logits must be [V] or [B, V], got shape {tuple(logits.shape)}")
    work = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows.clone()
    if bitmask is not None:
        mask = bitmask.unsqueeze(0) if bitmask.dim() == 1 else bitmask
        if mask.shape[0] != work.shape[0]:
            raise ValueError(f"logits have {work.shape[0]} rows but the bitmask has {mask.shape[0]}")
        allowed = unpack_bitmask(mask.to(work.device, non_blocking=True), work.shape[-1])
        work.masked_fill_(~allowed, float("-inf"))
    tokens = _draw(work, params, generator)
    return tokens[0] if squeeze else tokens


def constraint_allowed_tokens(
    constraint: TokenConstraint,
    vocab_size: int,
    eos_ids: Sequence[int] = (),
    *,
    constraint_vocab_size: int | None = None,
) -> np.ndarray:
    """The full mask of ``constraint`` as a boolean numpy array of length ``vocab_size`` (the
    logits' width).

    The constraint fills a bitmask sized for ``constraint_vocab_size`` (its own vocabulary; default
    ``vocab_size``); ids past it, such as a model's padding, are not allowed. The end-of-sequence
    ids are set explicitly: allowed exactly when ``constraint.is_completed()``, whatever the
    constraint wrote for them.
    """
    own = vocab_size if constraint_vocab_size is None else constraint_vocab_size
    bitmask = torch.zeros((1, bitmask_words(own)), dtype=torch.int32)
    constraint.fill_next_token_bitmask(bitmask, 0)
    allowed = unpack_bitmask(bitmask[0], vocab_size).numpy().copy()
    allowed[own:] = False
    eos = [e for e in eos_ids if 0 <= e < min(own, vocab_size)]
    if eos:
        allowed[eos] = bool(constraint.is_completed())
    return allowed


def sample_constrained(
    logits: torch.Tensor,
    constraint: TokenConstraint,
    *,
    eos_ids: Sequence[int] = (),
    params: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    constraint_vocab_size: int | None = None,
) -> int:
    """One token for one row of logits under ``constraint``, through its full mask (the mask path).

    This is the reference that adaptive rejection sampling (:mod:`stencil.decode.awrs`) must match
    in distribution when the parameters are the defaults. ``constraint_vocab_size`` as in
    :func:`constraint_allowed_tokens`.
    """
    if logits.dim() != 1:
        raise ValueError(f"logits must be one row [V], got shape {tuple(logits.shape)}")
    allowed = torch.from_numpy(
        constraint_allowed_tokens(constraint, logits.shape[-1], eos_ids, constraint_vocab_size=constraint_vocab_size)
    )
    work = logits.float().masked_fill(~allowed.to(logits.device), float("-inf")).unsqueeze(0)
    return int(_draw(work, params, generator)[0])
