"""Token bitmasks: allocate them, turn them into boolean masks, apply them to logits.

Layout (the one XGrammar uses, so masks can be exchanged): an ``int32`` tensor of shape
``[batch, ceil(vocab_size / 32)]``; token ``t`` is allowed in row ``b`` when bit ``t % 32`` of word
``t // 32`` is set. A freshly allocated mask allows everything (all bits set, i.e. every word is -1).

Widths. The logits of a model may be wider than the tokenizer's vocabulary (a padded
``vocab_size``): ids past the mask's ``32 * words`` bits do not exist in the tokenizer and are always
masked. Logits narrower than the mask's bit count simply ignore the extra bits: those ids do not
exist in the model, so ignoring them can never loosen a constraint. (A model vocabulary that is
narrower than the tokenizer is a configuration error caught when the vocabulary is bound, not here.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "allocate_token_bitmask",
    "bitmask_words",
    "unpack_bitmask",
    "bool_to_bitmask",
    "apply_token_bitmask_inplace",
]

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words per row needed for ``vocab_size`` tokens."""
    if vocab_size < 0:
        raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A CPU ``int32 [batch_size, ceil(vocab_size/32)]`` bitmask with every token allowed.

    It lives on the CPU because matchers fill it there; move it (or let
    :func:`apply_token_bitmask_inplace` move it) to the logits' device to apply it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return torch.full((batch_size, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        _BIT_SHIFTS[device] = shifts
    return shifts


def _check_bitmask(bitmask: torch.Tensor) -> None:
    if not isinstance(bitmask, torch.Tensor) or bitmask.dtype != torch.int32:
        raise TypeError("a token bitmask must be an int32 torch.Tensor")
    if bitmask.dim() not in (1, 2):
        raise ValueError(f"a token bitmask must be 1-D or 2-D, got shape {tuple(bitmask.shape)}")


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Boolean ``[..., vocab_size]`` view of a bitmask (``True`` = allowed), on the mask's device.

    Ids at or past ``32 * words`` are reported as not allowed (see the module docstring).
    """
    _check_bitmask(bitmask)
    words = bitmask.shape[-1]
    # Arithmetic right shift sign-extends negative words, but "& 1" reads the wanted bit regardless.
    bits = (bitmask.unsqueeze(-1) >> _shifts(bitmask.device)) & 1
    allowed = bits.reshape(*bitmask.shape[:-1], words * 32).bool()
    if vocab_size <= words * 32:
        return allowed[..., :vocab_size]
    pad = torch.zeros(*bitmask.shape[:-1], vocab_size - words * 32, dtype=torch.bool, device=bitmask.device)
    return torch.cat([allowed, pad], dim=-1)


def bool_to_bitmask(allowed: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Pack a boolean ``[..., V]`` mask (``True`` = allowed) into an int32 ``[..., ceil(V/32)]`` bitmask."""
    allowed_t = torch.as_tensor(allowed, dtype=torch.bool)
    vocab_size = allowed_t.shape[-1]
    words = bitmask_words(vocab_size)
    padded = torch.zeros(*allowed_t.shape[:-1], words * 32, dtype=torch.int64, device=allowed_t.device)
    padded[..., :vocab_size] = allowed_t.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=allowed_t.device) << torch.arange(
        32, dtype=torch.int64, device=allowed_t.device
    )
    packed = (padded.reshape(*allowed_t.shape[:-1], words, 32) * weights).sum(-1)
    # Values are in [0, 2**32); reinterpret the top bit as the int32 sign bit.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def apply_token_bitmask_inplace(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    indices: Sequence[int] | torch.Tensor | None = None,
) -> None:
    """Set the logits of disallowed tokens to ``-inf``, in place.

    ``logits`` is ``[batch, V]`` (or ``[V]`` with a 1-D mask), on any device and of any floating
    dtype; ``bitmask`` is ``int32 [batch, words]`` on any device (copied to the logits' device when
    needed). With ``indices``, only those rows of ``logits`` are masked, each with the bitmask row of
    the same index (the XGrammar convention). Ids past ``32 * words`` are masked; bits past ``V`` are
    ignored.
    """
    _check_bitmask(bitmask)
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() != bitmask.dim():
        raise ValueError(
            f"logits shape {tuple(logits.shape)} and bitmask shape {tuple(bitmask.shape)} "
            "must have the same number of dimensions"
        )
    if logits.dim() == 2 and logits.shape[0] != bitmask.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but the bitmask has {bitmask.shape[0]}")
    mask = bitmask.to(logits.device, non_blocking=True)
    vocab_size = logits.shape[-1]
    if indices is None:
        allowed = unpack_bitmask(mask, vocab_size)
        logits.masked_fill_(~allowed, float("-inf"))
        return
    if logits.dim() != 2:
        raise ValueError("indices need 2-D logits and bitmask")
    rows = torch.as_tensor(indices, dtype=torch.long, device=logits.device)
    if rows.numel() == 0:
        return
    if int(rows.min()) < 0 or int(rows.max()) >= logits.shape[0]:
        raise IndexError(f"indices {rows.tolist()} out of range for a batch of {logits.shape[0]}")
    allowed = unpack_bitmask(mask.index_select(0, rows), vocab_size)
    sub = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, sub)
