"""Token-level sparse KV selection (TokenSelect) as a transformers attention implementation.

For each layer and step, every visible cached key is scored against the query (the mean query of a prefill
chunk) head by head; the per-head softmaxes are summed over heads ("soft voting"), and the step attends only to
the ``top_k`` best keys plus the first ``n_sink`` and the last ``n_local`` keys. A per-layer selection cache
reuses the last top-k part while consecutive query fingerprints stay similar (cosine >= ``threshold``), so the
scoring pass over the whole cache is skipped on hits. See ``docs/tokenselect.md``.

Usage::

    from stencil.runtime.tokenselect import TokenSelectConfig, enable, disable, tokenselect
    state = enable(model, TokenSelectConfig(top_k=2048))   # model(...) and model.generate(...) now use it
    ...; state.total_stats().hit_rate
    disable(model)                                          # back to the previous attn_implementation
    with tokenselect(model, TokenSelectConfig()) as state:  # the same, scoped (what stencil.generate calls)
        model.generate(...)

The implementation is registered as ``"stencil_tokenselect"`` in transformers' ``AttentionInterface``, with
``sdpa_mask`` as its ``AttentionMaskInterface`` entry, so models build exactly the masks they build for SDPA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from stencil.errors import TokenSelectError
from stencil.runtime import tokenselect_kernels as kernels

__all__ = [
    "ATTN_IMPLEMENTATION",
    "LayerCache",
    "TokenSelectConfig",
    "TokenSelectState",
    "TokenSelectStats",
    "disable",
    "enable",
    "get_state",
    "select_chunk",
    "sparse_attention",
    "tokenselect",
    "tokenselect_attention_forward",
]

ATTN_IMPLEMENTATION = "stencil_tokenselect"
_STATE_ATTR = "_stencil_tokenselect"
_KERNELS = ("auto", "reference", "fused")


@dataclass(frozen=True)
class TokenSelectConfig:
    """Settings of token-level sparse attention.

    Attributes:
        n_sink: first visible keys always attended (attention sinks).
        n_local: last visible keys always attended; a prefill chunk keeps the ``n_local`` keys before each of its
            queries, i.e. the last ``n_local + chunk - 1`` keys, so every query sees its own neighbourhood.
        top_k: keys chosen by soft-vote score among the rest.
        threshold: the selection cache reuses a row's last top-k set while the cosine similarity of consecutive
            query fingerprints is >= this. ``> 1`` disables the cache; ``-1`` always reuses.
        prefill_chunk: queries of a longer call are processed in chunks of this many, each chunk selecting with
            its mean query.
        kernel: ``"reference"`` (float32 torch, the CPU default), ``"fused"`` (the fast path, the CUDA default),
            or ``"auto"``.
    """

    n_sink: int = 128
    n_local: int = 512
    top_k: int = 2048
    threshold: float = 0.9
    prefill_chunk: int = 512
    kernel: str = "auto"

    def __post_init__(self) -> None:
        minimum = {"n_sink": 0, "n_local": 1, "top_k": 0, "prefill_chunk": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TokenSelectError(f"must be an int, got {type(value).__name__} {value!r}", field=name)
            if value < low:
                reason = " (the local window must hold the current token)" if name == "n_local" else ""
                raise TokenSelectError(f"must be >= {low}{reason}, got {value}", field=name)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TokenSelectError(f"must be a number, got {type(self.threshold).__name__}", field="threshold")
        if math.isnan(self.threshold):
            raise TokenSelectError("must not be NaN", field="threshold")
        if self.kernel not in _KERNELS:
            raise TokenSelectError(f"must be one of {', '.join(_KERNELS)}, got {self.kernel!r}", field="kernel")

    def budget(self, chunk: int = 1) -> int:
        """Keys attended by a chunk of ``chunk`` queries once the context exceeds it."""
        return self.n_sink + self.n_local + chunk - 1 + self.top_k


@dataclass
class TokenSelectStats:
    """Counters of one layer (or, summed, of a model). Selections are counted per (batch row, chunk)."""

    calls: int = 0  #: attention calls routed to TokenSelect
    dense_calls: int = 0  #: calls whose whole context fit the budget (plain SDPA)
    dense_rows: int = 0  #: row-chunks of sparse calls whose visible keys fit the budget (attended densely)
    misses: int = 0  #: row-chunks that scored every key and selected afresh
    hits: int = 0  #: row-chunks that reused the cached top-k set

    @property
    def hit_rate(self) -> float:
        """Fraction of selections served by the cache (0 when none were made)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def reset(self) -> None:
        """Zero every counter."""
        for f in fields(self):
            setattr(self, f.name, 0)

    def __iadd__(self, other: TokenSelectStats) -> TokenSelectStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class LayerCache:
    """The selection cache of one layer: the last fingerprint of each row and its last top-k set."""

    fingerprint: torch.Tensor | None = None  #: (B, Hq*D) float32 mean query of the last step
    top: torch.Tensor | None = None  #: (B, top_k) key indices of the last fresh top-k set
    has_top: torch.Tensor | None = None  #: (B,) rows whose ``top`` holds a selection
    n_keys: int = 0  #: key count when it was written; a shorter cache means a new sequence

    def usable(self, batch: int, n_keys: int, device: torch.device) -> bool:
        return (
            self.fingerprint is not None
            and self.fingerprint.shape[0] == batch
            and self.fingerprint.device == device
            and n_keys >= self.n_keys
        )

    def clear(self) -> None:
        self.fingerprint = self.top = self.has_top = None
        self.n_keys = 0


@dataclass
class TokenSelectState:
    """What :func:`enable` attaches to a model: the config, the per-layer caches and statistics."""

    config: TokenSelectConfig
    previous_implementation: str = "sdpa"
    caches: dict[int, LayerCache] = field(default_factory=dict)
    stats: dict[int, TokenSelectStats] = field(default_factory=dict)

    def layer(self, layer_idx: int) -> tuple[LayerCache, TokenSelectStats]:
        """The cache and counters of one layer (created on first use)."""
        return self.caches.setdefault(layer_idx, LayerCache()), self.stats.setdefault(layer_idx, TokenSelectStats())

    def reset_caches(self) -> None:
        """Forget every cached selection (a new sequence starts)."""
        for cache in self.caches.values():
            cache.clear()

    def reset_stats(self) -> None:
        """Zero every layer's counters."""
        self.stats.clear()

    def total_stats(self) -> TokenSelectStats:
        """The counters summed over layers."""
        total = TokenSelectStats()
        for s in self.stats.values():
            total += s
        return total


class _Visibility:
    """Which keys each query may attend, from the mask the model built.

    transformers passes SDPA masks: a ``(B|1, 1, Q, K)`` bool tensor, or None when SDPA needs none, in which case
    SDPA's own convention applies: one query sees every key, several queries are causal aligned top-left (query
    ``i`` sees keys ``0..i``). Additive float masks are accepted when they only allow (0) or deny (-inf / dtype
    min); a real bias would be dropped by the selection, so it is refused.
    """

    def __init__(self, mask: torch.Tensor | None, batch: int, n_query: int, n_keys: int, device: torch.device):
        self.batch, self.n_query, self.n_keys, self.device = batch, n_query, n_keys, device
        if mask is None:
            self.mask = None
            return
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[2:] != (
            n_query,
            n_keys,
        ):
            raise TokenSelectError(
                f"attention mask of shape {tuple(mask.shape)} does not fit queries ({batch}, {n_query}) and "
                f"{n_keys} keys; expected (batch, 1, {n_query}, {n_keys})",
                field="attention_mask",
            )
        if mask.dtype != torch.bool:
            if not mask.is_floating_point():
                raise TokenSelectError(f"attention mask must be bool or float, got {mask.dtype}",
                                       field="attention_mask")
            allowed = mask == 0
            if bool((~allowed & (mask > torch.finfo(mask.dtype).min / 2)).any()):
                raise TokenSelectError(
                    "additive attention biases are not supported (only 0 / -inf masks)", field="attention_mask"
                )
            mask = allowed
        self.mask = mask.expand(batch, 1, n_query, n_keys)

    def candidates(self, start: int, end: int) -> torch.Tensor:
        """``(B, K)``: keys visible to at least one query of ``start:end``."""
        if self.mask is not None:
            return self.mask[:, 0, start:end].any(dim=1)
        keys = torch.arange(self.n_keys, device=self.device)
        visible = keys < end if self.n_query > 1 else torch.ones_like(keys, dtype=torch.bool)
        return visible.expand(self.batch, self.n_keys)

    def dense(self, start: int, end: int) -> torch.Tensor | None:
        """``(B|1, 1, q, K)`` mask for dense attention of queries ``start:end``, or None."""
        if self.mask is not None:
            return self.mask[:, :, start:end]
        if self.n_query == 1:
            return None
        keys = torch.arange(self.n_keys, device=self.device)
        return (keys[None, :] <= torch.arange(start, end, device=self.device)[:, None])[None, None]

    def at(self, start: int, end: int, idx: torch.Tensor) -> torch.Tensor:
        """``(B, q, S)``: may query ``start + i`` see key ``idx[b, s]``."""
        if self.mask is not None:
            rows = self.mask[:, 0, start:end]
            return rows.gather(2, idx[:, None, :].expand(-1, end - start, -1))
        if self.n_query == 1:
            return torch.ones(idx.shape[0], 1, idx.shape[1], dtype=torch.bool, device=idx.device)
        return idx[:, None, :] <= torch.arange(start, end, device=idx.device)[None, :, None]


def _use_fused(config: TokenSelectConfig, device: torch.device) -> bool:
    return config.kernel == "fused" or (config.kernel == "auto" and device.type == "cuda")


@dataclass
class _Plan:
    """What one chunk will do, decided on the device and read back in a single sync."""

    over: torch.Tensor  #: (B,) rows whose candidates exceed the budget
    hit: torch.Tensor  #: (B,) over rows that reuse their cached top-k set
    miss: torch.Tensor  #: (B,) over rows that select afresh
    fingerprint: torch.Tensor  #: (B, Hq*D) float32
    max_count: int
    n_hit: int
    n_miss: int


def _plan(q_mean: torch.Tensor, cand: torch.Tensor, config: TokenSelectConfig, chunk: int,
          cache: LayerCache | None) -> _Plan:
    batch, n_keys = cand.shape
    count = cand.sum(dim=1)
    over = count > config.budget(chunk)
    fingerprint = q_mean.float().reshape(batch, -1)
    hit = torch.zeros_like(over)
    if cache is not None and cache.usable(batch, n_keys, cand.device):
        cos = torch.nn.functional.cosine_similarity(fingerprint.double(), cache.fingerprint.double(), dim=1)
        # Rounding can push cos a hair past +-1; clamping keeps threshold -1 meaning "always" (and 1 "identical").
        hit = over & cache.has_top & (cos.clamp(-1.0, 1.0) >= config.threshold)
    miss = over & ~hit
    max_count, n_hit, n_miss = torch.stack([count.max(), hit.sum(), miss.sum()]).tolist()
    return _Plan(over, hit, miss, fingerprint, max_count, n_hit, n_miss)


def _select(plan: _Plan, q_mean: torch.Tensor, key: torch.Tensor, cand: torch.Tensor, *, scaling: float,
            config: TokenSelectConfig, chunk: int, cache: LayerCache | None) -> torch.Tensor:
    fixed = kernels.fixed_mask(cand, config.n_sink, config.n_local + chunk - 1)
    middle = cand & ~fixed
    # Rows within the budget keep every candidate; the others start from their sinks and window.
    top = middle & ~plan.over[:, None]
    if plan.n_miss:
        score = kernels.score_fused if _use_fused(config, cand.device) else kernels.score_reference
        fresh = kernels.top_k_mask(score(q_mean, key, cand, scaling), middle, config.top_k) & plan.miss[:, None]
        top |= fresh
    if plan.n_hit:
        cached = torch.zeros_like(middle)
        cached.scatter_(1, cache.top.clamp(min=0), cache.top >= 0)
        # Cached keys the window has grown over are already kept: intersecting with `middle` counts them once.
        top |= cached & middle & plan.hit[:, None]
    if cache is not None:
        if plan.n_miss:
            # A missing row's middle exceeds top_k, so it holds exactly top_k fresh keys.
            fresh_idx, fresh_valid = kernels.compact(fresh, config.top_k)
            fresh_top = fresh_idx.masked_fill(~fresh_valid, -1)
            cache.top = fresh_top if cache.top is None else torch.where(plan.hit[:, None], cache.top, fresh_top)
        cache.has_top = plan.hit | plan.miss
        cache.fingerprint = plan.fingerprint
        cache.n_keys = cand.shape[1]
    return fixed | top


def _count(stats: TokenSelectStats | None, plan: _Plan, batch: int) -> None:
    if stats is not None:
        stats.hits += plan.n_hit
        stats.misses += plan.n_miss
        stats.dense_rows += batch - plan.n_hit - plan.n_miss


def select_chunk(
    q_mean: torch.Tensor,
    key: torch.Tensor,
    cand: torch.Tensor,
    *,
    scaling: float,
    config: TokenSelectConfig,
    chunk: int = 1,
    cache: LayerCache | None = None,
    stats: TokenSelectStats | None = None,
) -> torch.Tensor:
    """The ``(B, K)`` bool selection of one chunk of ``chunk`` queries with mean query ``q_mean`` (``(B, Hq, D)``).

    A row whose candidates fit ``config.budget(chunk)`` keeps them all. Otherwise it keeps its sinks and local
    window, plus a top-k set: reused from ``cache`` when the cosine of this fingerprint and the previous one
    reaches ``config.threshold``, or else the ``top_k`` best-scoring keys outside sinks and window (ties: earlier
    keys win). ``cache`` is updated.
    """
    plan = _plan(q_mean, cand, config, chunk, cache)
    _count(stats, plan, cand.shape[0])
    return _select(plan, q_mean, key, cand, scaling=scaling, config=config, chunk=chunk, cache=cache)


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float,
    config: TokenSelectConfig,
    cache: LayerCache | None = None,
    stats: TokenSelectStats | None = None,
    record: list | None = None,
) -> torch.Tensor:
    """TokenSelect attention of ``query`` ``(B, Hq, Q, D)`` over ``key``/``value`` ``(B, Hkv, K, D)``.

    ``attention_mask`` is what transformers passes to SDPA (see :class:`_Visibility`); a selected key is attended
    only where it allows, so padding and causality are exact. Queries go in chunks of ``config.prefill_chunk``;
    a chunk whose rows all fit the budget is attended densely. Returns ``(B, Hq, Q, Dv)`` in the query dtype.
    ``record``, when given, receives ``(start, end, idx, valid)`` for each sparse chunk. One host sync per chunk.
    """
    batch, n_q, n_query, _ = query.shape
    n_kv, n_keys = key.shape[1], key.shape[2]
    if n_q % n_kv:
        raise TokenSelectError(f"{n_q} query heads are not a multiple of {n_kv} key/value heads", field="query")
    visibility = _Visibility(attention_mask, batch, n_query, n_keys, query.device)
    attend = kernels.attend_fused if _use_fused(config, query.device) else kernels.attend_reference
    outputs = []
    for start in range(0, n_query, config.prefill_chunk):
        end = min(start + config.prefill_chunk, n_query)
        q = query[:, :, start:end]
        q_mean = q.float().mean(dim=2)
        cand = visibility.candidates(start, end)
        plan = _plan(q_mean, cand, config, end - start, cache)
        if plan.max_count <= config.budget(end - start):
            outputs.append(kernels.attend_dense(q, key, value, visibility.dense(start, end), scaling))
            if stats is not None:
                stats.dense_rows += batch
            continue
        _count(stats, plan, batch)
        sel = _select(plan, q_mean, key, cand, scaling=scaling, config=config, chunk=end - start, cache=cache)
        idx, valid = kernels.compact(sel, min(plan.max_count, config.budget(end - start)))
        if record is not None:
            record.append((start, end, idx, valid))
        outputs.append(attend(q, key, value, idx, valid[:, None, :] & visibility.at(start, end, idx), scaling))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def tokenselect_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``"stencil_tokenselect"`` entry of transformers' ``AttentionInterface``.

    Falls back to transformers' own SDPA (bit for bit) when the whole context fits the budget, in training, for
    non-causal calls, and for sliding-window layers (their rolling caches renumber keys, which would invalidate
    cached selections, and the window already bounds the work).
    """
    state: TokenSelectState | None = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise TokenSelectError(
            f"{type(module).__name__} runs attn_implementation={ATTN_IMPLEMENTATION!r} without a TokenSelect "
            "state; switch models on with stencil.runtime.tokenselect.enable(model, config)"
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise TokenSelectError(f"attention argument {name!r} is not supported by TokenSelect", field=name)
    config = state.config
    cache, stats = state.layer(module.layer_idx)
    stats.calls += 1
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if (
        key.shape[2] <= config.budget()
        or module.training
        or not causal
        or kwargs.get("sliding_window") is not None
    ):
        stats.dense_calls += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = sparse_attention(
        query, key, value, attention_mask,
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        config=config, cache=cache, stats=stats,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, tokenselect_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "layer_idx")]


def _reset_on_new_sequence(state: TokenSelectState):
    def hook(_module, args, kwargs):
        past = kwargs.get("past_key_values")
        if past is None or past.get_seq_length() == 0:
            state.reset_caches()

    return hook


def get_state(model: torch.nn.Module) -> TokenSelectState | None:
    """The TokenSelect state of a model switched on by :func:`enable`, else None."""
    found = getattr(model, _STATE_ATTR, None)
    return found[0] if found else None


def enable(model: torch.nn.Module, config: TokenSelectConfig | None = None) -> TokenSelectState:
    """Switch a loaded transformers model to TokenSelect attention; returns its (fresh) state.

    ``model(...)`` and ``model.generate(...)`` then use it. The selection cache is cleared whenever a forward
    starts a new sequence (no or empty ``past_key_values``). Enabling an enabled model replaces its config.
    """
    config = TokenSelectConfig() if config is None else config
    if not isinstance(config, TokenSelectConfig):
        raise TokenSelectError(f"expected a TokenSelectConfig, got {type(config).__name__}", field="config")
    if get_state(model) is not None:
        disable(model)
    if not hasattr(model, "set_attn_implementation") or not hasattr(getattr(model, "config", None),
                                                                    "_attn_implementation"):
        raise TokenSelectError(f"{type(model).__name__} is not a transformers PreTrainedModel", field="model")
    modules = _attention_modules(model)
    if not modules:
        raise TokenSelectError(f"{type(model).__name__} has no attention layers with layer_idx and "
                               "num_key_value_groups (Llama, Qwen2, Mistral families are supported)", field="model")
    previous = model.config._attn_implementation
    state = TokenSelectState(config=config, previous_implementation="sdpa" if previous == ATTN_IMPLEMENTATION
                             else previous)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise TokenSelectError(f"{type(model).__name__} cannot switch its attention implementation at run time",
                               field="model")
    for m in modules:
        setattr(m, _STATE_ATTR, state)
    handle = model.register_forward_pre_hook(_reset_on_new_sequence(state), with_kwargs=True)
    setattr(model, _STATE_ATTR, (state, handle))
    return state


def disable(model: torch.nn.Module) -> None:
    """Restore the attention implementation the model had before :func:`enable` (no-op if not enabled)."""
    found = getattr(model, _STATE_ATTR, None)
    if not found:
        return
    state, handle = found
    handle.remove()
    for m in _attention_modules(model):
        if hasattr(m, _STATE_ATTR):
            delattr(m, _STATE_ATTR)
    delattr(model, _STATE_ATTR)
    model.set_attn_implementation(state.previous_implementation)


@contextlib.contextmanager
def tokenselect(model: torch.nn.Module, config: TokenSelectConfig | None = None) -> Iterator[TokenSelectState]:
    """``with tokenselect(model, config) as state:`` enables TokenSelect for the block, then disables it.

    This is the hook ``stencil.generate(..., long_context=config)`` wraps its decode loop in.
    """
    state = enable(model, config)
    try:
        yield state
    finally:
        disable(model)
