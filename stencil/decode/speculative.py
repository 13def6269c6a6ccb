"""Speculative decoding support: validating a draft and filling one mask row per draft position.

A draft model proposes ``k`` tokens. The target model then scores all ``k + 1`` positions in one
forward pass, and each position needs the grammar's mask *as if* the draft tokens before it had
been accepted. :func:`fill_draft_bitmasks` gives exactly that: row ``i`` is the mask after
``draft[:i]``. It accepts draft tokens one by one, fills a row before each, and rolls them all
back at the end. Rollback is exact for any depth: the chart just forgets its newest rows, and
``tests/decode/test_speculative.py`` checks random accept/rollback sequences against fresh
replays.

The matcher's own ``validate_tokens(ids)`` gives the longest prefix of a draft that the grammar
accepts, and does not move. After verification, accept the tokens the target model kept with
``accept_token``, or accept the whole draft first and ``rollback(n)`` the rejected tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stencil.errors import StencilError

__all__ = ["fill_draft_bitmasks"]


def fill_draft_bitmasks(matcher: Any, draft_ids: Sequence[int], bitmask: Any, start_index: int = 0) -> int:
    """Fill one bitmask row per draft position; return how many draft tokens the grammar accepts.

    Row ``start_index + i`` gets the mask after ``draft_ids[:i]``, for ``i = 0 .. n`` where ``n``
    is the returned count. If the whole draft is accepted (``n == len(draft_ids)``), that includes
    the row after it, for the target model's bonus token. Otherwise row ``start_index + n`` is the
    mask at the first rejected token, and the rows after it are not written. The target model's
    tokens there are discarded anyway. ``bitmask`` is what ``fill_next_token_bitmask`` takes, with
    at least ``start_index + len(draft_ids) + 1`` rows. The matcher ends in the state it started in.
    """
    rows = _rows(bitmask)
    start = int(start_index)
    draft = [int(t) for t in draft_ids]
    if start < 0 or start + len(draft) + 1 > rows:
        raise StencilError(
            f"a draft of {len(draft)} tokens needs bitmask rows {start}..{start + len(draft)}, "
            f"but the bitmask has {rows} rows"
        )
    accepted = 0
    try:
        for t in draft:
            matcher.fill_next_token_bitmask(bitmask, start + accepted)
            if not matcher.accept_token(t):
                return accepted
            accepted += 1
        matcher.fill_next_token_bitmask(bitmask, start + accepted)
        return accepted
    finally:
        matcher.rollback(accepted)


def _rows(bitmask: Any) -> int:
    if isinstance(bitmask, (torch.Tensor, np.ndarray)):
        return 1 if bitmask.ndim == 1 else int(bitmask.shape[0])
    raise StencilError(f"a token bitmask must be a torch.Tensor or numpy array, got {type(bitmask).__name__}")
