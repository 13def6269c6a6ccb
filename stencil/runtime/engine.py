"""The decode loop: a transformers causal LM, its KV cache, and grammar work overlapped with the model.

One :class:`Engine` wraps a model and its tokenizer (the vocabulary and grammar compiler are built
once and cached). :meth:`Engine.decode` runs a batch of :class:`Request` s to the end:

* **Batching.** Prompts are left-padded into one prefill; every later step feeds one chunk per row
  (the sampled token, plus any tokens the grammar forces) through the shared ``DynamicCache``. Rows
  stop on their own (stop token, grammar finished, ``max_new_tokens``, stop string) and are dropped
  from the batch and the cache (``batch_select_indices``), so a long row never pays for finished ones.
  Positions are counted per row from the attention mask, so a padded row computes what it would alone.
* **Overlap.** After a token is chosen, the next forward pass is launched at once while a worker
  thread does the grammar work of the next step: accept the token in the row's matcher and fill its
  next token bitmask (mask sampler), or just accept it (check-based samplers, whose checks need the
  new logits). numba kernels and torch both release the GIL, so on a CPU the two really run side by
  side; on a GPU the forward pass is asynchronous anyway, and the finished mask goes to the device on
  a side stream. The sampler then waits only for whatever grammar work outlasted the forward pass.
* **Forced tokens** (``jump_forward``). Right after the sampled token is accepted, the tokens the
  grammar forces whatever the model says (:func:`stencil.decode.jump_forward.jump_forward_tokens`:
  only those the tokenizer's own encoding would certainly produce) are accepted too and fed in the
  same forward pass: a chunk of several tokens per row, left-padded within the chunk. That step runs
  on the decode thread (the next input depends on it); the mask fill after it still overlaps.
* **Samplers.** ``"mask"``: the full token bitmask (filled during the forward pass), applied on the
  logits' device, then greedy or temperature / top-k / top-p sampling (:mod:`stencil.decode.sampling`).
  ``"awrs"``: check first. The model's own choice (its argmax, or a draw from the softmax) is checked
  with one ``try_token`` per row; only rows where it is rejected get a full mask and a fresh draw from
  the masked distribution. That is adaptive rejection sampling with a budget of one rejection before
  its full-mask fallback (:mod:`stencil.decode.awrs`), exact for greedy decoding and for pure
  temperature sampling, and it costs one check per token when the model mostly agrees with the
  grammar. Unconstrained rows are sampled as they are.

Text is the exact bytes of the tokens (from :class:`~stencil.grammar.vocab.TokenizerInfo`, so it is
what the grammar saw), decoded as UTF-8 incrementally; special tokens add no text.
"""

from __future__ import annotations

import codecs
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stencil.decode.bitmask import allocate_token_bitmask, apply_token_bitmask_inplace
from stencil.decode.jump_forward import TextEncoder, jump_forward_tokens
from stencil.decode.matcher import GrammarMatcher, fill_next_token_bitmasks
from stencil.decode.sampling import SamplingParams, sample_tokens
from stencil.errors import StencilError
from stencil.grammar.compiler import CompiledGrammar, GrammarCompiler
from stencil.grammar.vocab import TokenizerInfo

__all__ = ["Engine", "Request", "DecodeParams", "Generation", "GenerationStats", "FINISH_REASONS"]

FINISH_REASONS = ("stop", "length", "stop_string")
"""``stop``: a stop token was produced, or the grammar admits nothing more; ``length``:
``max_new_tokens`` ran out first; ``stop_string``: one of the stop strings appeared (it is cut from
the text)."""

SAMPLERS = ("mask", "awrs")


@dataclass
class GenerationStats:
    """What one generation cost. Times are wall-clock seconds of the whole batch it ran in."""

    prompt_tokens: int = 0
    generated_tokens: int = 0  #: tokens appended to the output, forced ones included
    forced_tokens: int = 0  #: tokens the grammar forced (fed without sampling)
    seconds: float = 0.0  #: wall time of the batch, prefill included
    tokens_per_second: float = 0.0  #: ``generated_tokens / seconds``
    grammar_seconds: float = 0.0  #: grammar work of the batch (accepts, masks, checks), on any thread
    grammar_wait_seconds: float = 0.0  #: time the batch's loop waited for grammar work (not hidden by the model)
    checks: int = 0  #: single-token constraint checks (check-based samplers)
    mask_fills: int = 0  #: full token masks computed
    sampler: str = "none"

    @property
    def checks_per_token(self) -> float:
        sampled = self.generated_tokens - self.forced_tokens
        return self.checks / sampled if sampled else 0.0


@dataclass
class Generation:
    """One generated output.

    ``value`` is the parsed JSON for a JSON Schema constraint (the pydantic instance when the schema
    was a pydantic class), or None when the output is not complete. ``tool_calls`` is set when tools
    were offered; ``text`` is then the free text outside the calls and ``raw_text`` the whole output
    as generated (what a transcript should replay). For SMC, ``weight`` is the normalised posterior weight and the top-level result's
    ``posterior`` lists every distinct output, heaviest first.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    value: Any = None
    tool_calls: list | None = None
    raw_text: str | None = None
    weight: float | None = None
    posterior: list["Generation"] | None = None

    def __str__(self) -> str:
        return self.text


@dataclass
class Request:
    """One row of a batch: prompt token ids and what to do with them."""

    prompt_ids: list[int]
    grammar: CompiledGrammar | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass
class DecodeParams:
    """Settings shared by the rows of a batch."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    sampler: str = "mask"  #: "mask" or "awrs" (constrained rows only)
    seed: int | None = None
    jump_forward: bool = True
    logit_bias: dict[int, float] | None = None


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def logits_width(model: torch.nn.Module) -> int:
    """The width of the model's logits (its output embedding rows, else ``config.vocab_size``)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


_INFO_CACHE: dict[tuple[int, int], tuple[Any, TokenizerInfo, GrammarCompiler]] = {}
_INFO_LOCK = threading.Lock()


def tokenizer_info_for(tokenizer: Any, vocab_size: int, extra_stop_ids: Sequence[int] = ()) -> tuple[TokenizerInfo, GrammarCompiler]:
    """The (cached) vocabulary and grammar compiler of a HF tokenizer at a logits width.

    The stop tokens are the tokenizer's own plus ``extra_stop_ids`` (the model's generation config).
    """
    key = (id(tokenizer), vocab_size)
    with _INFO_LOCK:
        hit = _INFO_CACHE.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1], hit[2]
    info = TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    extra = [int(i) for i in extra_stop_ids if 0 <= int(i) < vocab_size and int(i) not in info.stop_token_ids]
    if extra:
        info = TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=list(info.stop_token_ids) + extra)
    compiler = GrammarCompiler(info)
    with _INFO_LOCK:
        if len(_INFO_CACHE) > 16:
            _INFO_CACHE.clear()
        # The tokenizer object is kept alive in the entry so its id cannot be reused by another.
        _INFO_CACHE[key] = (tokenizer, info, compiler)
    return info, compiler


def _generation_eos_ids(model: torch.nn.Module) -> list[int]:
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _must_stop(matcher: Any) -> bool:
    """The grammar is complete and no further byte could follow: only a stop token is left."""
    if not matcher.is_completed():
        return False
    if matcher.is_terminated():
        return True
    can_continue = getattr(matcher, "can_continue", None)
    if can_continue is None:
        rec = getattr(matcher, "_rec", None)
        can_continue = getattr(rec, "can_continue", None)
    return can_continue is not None and not can_continue()


class _Row:
    """Per-row decode state."""

    def __init__(self, index: int, req: Request, info: TokenizerInfo, vocab: int, special_names: dict[int, str]):
        self.index = index
        self.req = req
        self.matcher = None
        if req.grammar is not None:
            if req.grammar.vocab_size != vocab:
                raise StencilError(
                    f"the grammar was compiled for a vocabulary of {req.grammar.vocab_size} ids but the model's "
                    f"logits have {vocab}: compile it with this model's tokenizer"
                )
            self.matcher = GrammarMatcher(req.grammar)
        self.info = info
        self.special_names = special_names
        self.ids: list[int] = []
        self.done = False
        self.finish_reason = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0  # characters of text already streamed
        self.stats = GenerationStats(prompt_tokens=len(req.prompt_ids))
        self.max_stop = max((len(s) for s in req.stop), default=0)
        self.pending: list[int] = []  # tokens to feed in the next forward pass

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.finish_reason = reason
            self.text += self.decoder.decode(b"", final=True)
            self._check_stop_strings(final=True)

    def append(self, token: int, forced: bool = False) -> None:
        """Add a token to the output and its bytes to the text; finish on a stop string or the length."""
        self.ids.append(token)
        self.stats.generated_tokens += 1
        self.stats.forced_tokens += forced
        lo, hi = self.info.token_offsets[token], self.info.token_offsets[token + 1]
        piece = self.info.token_bytes[lo:hi].tobytes()
        if not piece and self.req.grammar is not None and self.req.grammar.special_symbol_of_token[token] >= 0:
            # A special token the grammar names (a tool-call marker, say) is part of the output's language.
            piece = self.special_names[token].encode("utf-8")
        if piece:
            self.text += self.decoder.decode(piece)
            if self._check_stop_strings(final=False):
                return
        if len(self.ids) >= self.req.max_new_tokens:
            self.finish("length")

    def _check_stop_strings(self, final: bool) -> bool:
        if not self.req.stop or self.finish_reason == "stop_string":
            return False
        cut = min((p for p in (self.text.find(s) for s in self.req.stop) if p >= 0), default=-1)
        if cut < 0:
            return False
        self.text = self.text[:cut]
        self.emitted = min(self.emitted, cut)
        if not final:
            self.done = True
            self.finish_reason = "stop_string"
        return True

    def stream_piece(self) -> str:
        """Text not yet streamed, holding back a tail that may still become a stop string."""
        end = len(self.text) if self.done else max(self.emitted, len(self.text) - max(0, self.max_stop - 1))
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece


class Engine:
    """Runs batches of requests on one transformers causal LM.

    >>> engine = Engine(model, tokenizer)
    >>> [g] = engine.decode([Request(ids, grammar=engine.compiler.compile_regex(r"\\d+"))], DecodeParams())
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model_device(model)
        self.vocab_size = logits_width(model)
        self.tokenizer_info, self.compiler = tokenizer_info_for(tokenizer, self.vocab_size, _generation_eos_ids(model))
        self.stop_ids = list(self.tokenizer_info.stop_token_ids)
        self.special_names = {i: name for name, i in self.tokenizer_info.special_token_names.items()}
        self._text_encoder: TextEncoder | None = None
        self._stop_set = frozenset(self.stop_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)
        params = inspect.signature(model.forward).parameters
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._takes_position_ids = "position_ids" in params
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stencil-grammar")

    # -- model calls -----------------------------------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "past_key_values": cache,
                                  "use_cache": True}
        if self._takes_position_ids:
            kwargs["position_ids"] = positions
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():  # not inference_mode: the logits are masked in place afterwards
            out = self.model(**kwargs)
        return out.logits[:, -1, :]

    @property
    def text_encoder(self) -> TextEncoder:
        """Mid-text encoder of the tokenizer, for canonical-safe forced tokens."""
        if self._text_encoder is None:
            self._text_encoder = TextEncoder(self.tokenizer, self.tokenizer_info)
        return self._text_encoder

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    # -- the loop --------------------------------------------------------------------------------

    def decode(self, requests: Sequence[Request], params: DecodeParams) -> list[Generation]:
        """Run every request to the end; one :class:`Generation` per request, in order."""
        events = self.decode_stream(requests, params)
        for _ in events:
            pass
        return events.generations  # type: ignore[attr-defined]

    def decode_stream(self, requests: Sequence[Request], params: DecodeParams) -> "_DecodeRun":
        """An iterator of ``(row, text_piece)`` events; ``.generations`` is filled once it is exhausted."""
        return _DecodeRun(self, list(requests), params)


class _DecodeRun:
    """One batch being decoded; iterate it for streamed text pieces."""

    def __init__(self, engine: Engine, requests: list[Request], params: DecodeParams):
        if not requests:
            raise StencilError("no prompts to generate from")
        if params.sampler not in SAMPLERS:
            raise StencilError(f"unknown sampler {params.sampler!r}; expected one of {SAMPLERS}")
        for r in requests:
            if r.max_new_tokens < 1:
                raise StencilError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
            if not r.prompt_ids:
                raise StencilError("a prompt encodes to no tokens: give at least one token of prompt")
        self.e = engine
        self.params = params
        self.rows = [_Row(i, r, engine.tokenizer_info, engine.vocab_size, engine.special_names)
                     for i, r in enumerate(requests)]
        self.generations: list[Generation] | None = None
        self.grammar_seconds = 0.0
        self._iter = self._run()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._iter)

    # -- grammar work ----------------------------------------------------------------------------

    def _grammar_work(self, rows: list[_Row], accept: list[list[int]], bitmask: torch.Tensor | None,
                      copy: Callable[[], None] | None) -> None:
        """Accept each row's new tokens, then fill the next masks (runs on the worker thread)."""
        t0 = time.perf_counter()
        fill: list[Any] = []
        where: list[int] = []
        for k, (row, toks) in enumerate(zip(rows, accept)):
            m = row.matcher
            if m is None:
                continue
            for t in toks:
                if not m.accept_token(t):
                    raise StencilError(f"internal error: the grammar rejected token {t} that it allowed "
                                       f"(row {row.index}, after {len(row.ids)} tokens)")
            if bitmask is not None and not _must_stop(m):
                fill.append(m)
                where.append(k)
                row.stats.mask_fills += 1
        if fill:
            fill_next_token_bitmasks(fill, bitmask, where)
        if copy is not None:
            copy()
        self.grammar_seconds += time.perf_counter() - t0

    def _forced(self, row: _Row) -> list[int]:
        """Accept the row's sampled token now and return the tokens the grammar forces after it."""
        m = row.matcher
        t0 = time.perf_counter()
        for t in row.pending:
            if not m.accept_token(t):
                raise StencilError(f"internal error: the grammar rejected token {t} that it allowed (row {row.index})")
        forced: list[int] = []
        budget = row.req.max_new_tokens - len(row.ids)
        if budget > 0 and not m.is_terminated():
            for t in jump_forward_tokens(m, self.e.text_encoder)[:budget]:
                if not m.accept_token(t):
                    raise StencilError(f"internal error: the grammar rejected forced token {t} (row {row.index})")
                forced.append(int(t))
        self.grammar_seconds += time.perf_counter() - t0
        return forced

    # -- choosing tokens -------------------------------------------------------------------------

    def _choose(self, rows: list[_Row], logits: torch.Tensor, bitmask: torch.Tensor | None,
                gen: torch.Generator | None) -> list[int]:
        sp = self.params.sampling
        if self.params.logit_bias:
            bias = self.params.logit_bias
            ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
            logits = logits.clone()
            logits[:, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
        constrained = [k for k, r in enumerate(rows) if r.matcher is not None]
        if bitmask is not None and constrained:
            return sample_tokens(logits, sp, bitmask=bitmask, generator=gen).tolist()
        # Check first: the model's own choice (argmax, or a draw from the softmax), one check per row.
        first = sample_tokens(logits, sp, generator=gen).tolist()
        if not constrained:
            return first
        t0 = time.perf_counter()
        rejected = []
        for k in constrained:
            row, t = rows[k], first[k]
            m = row.matcher
            row.stats.checks += 1
            if not (m.is_completed() if t in self.e._stop_set else m.try_token(t)):
                rejected.append(k)
        if rejected:
            # A rejected draw is followed by an exact draw from the masked distribution: the output is
            # then distributed as p(a)c(a) + (1 - Z) p(a)c(a)/Z = p(a)c(a)/Z, i.e. exactly the
            # constrained distribution (AWRS with one check before its full-mask fallback).
            mask = allocate_token_bitmask(len(rejected), self.e.vocab_size)
            fill_next_token_bitmasks([rows[k].matcher for k in rejected], mask)
            for k in rejected:
                rows[k].stats.mask_fills += 1
            redo = sample_tokens(logits[rejected], sp, bitmask=mask, generator=gen).tolist()
            for k, t in zip(rejected, redo):
                first[k] = t
        self.grammar_seconds += time.perf_counter() - t0
        return first

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> Iterator[tuple[int, str]]:
        e, params = self.e, self.params
        dev = e.device
        t_start = time.perf_counter()
        use_mask = params.sampler == "mask" and any(r.matcher is not None for r in self.rows)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(int(params.seed))
        for r in self.rows:
            r.stats.sampler = (params.sampler if r.matcher is not None else "none")

        # Prefill: left-padded prompts; the first masks are computed meanwhile.
        rows = list(self.rows)
        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), e.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            n = len(r.req.prompt_ids)
            ids[k, width - n:] = torch.tensor(r.req.prompt_ids)
            attn[k, width - n:] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        next_pos = positions[:, -1] + 1

        pinned = dev.type == "cuda"
        bitmask = allocate_token_bitmask(len(rows), e.vocab_size) if use_mask else None
        if bitmask is not None and pinned:
            bitmask = bitmask.pin_memory()
        side = torch.cuda.Stream(device=dev) if pinned and bitmask is not None else None
        dev_mask: list[torch.Tensor | None] = [None]
        copied: list[Any] = [None]  # CUDA event of the last host-to-device mask copy

        def copier(n: int) -> Callable[[], None] | None:
            if side is None:
                return None

            def copy() -> None:
                with torch.cuda.stream(side):
                    dev_mask[0] = bitmask[:n].to(dev, non_blocking=True)
                    copied[0] = torch.cuda.Event()
                    copied[0].record(side)

            return copy

        wait_total = 0.0
        fut: Future = e._executor.submit(self._grammar_work, rows, [[] for _ in rows], bitmask, copier(len(rows)))
        cache = e.new_cache()
        logits = e._forward(ids, attn, positions, cache)

        while True:
            t0 = time.perf_counter()
            fut.result()
            wait_total += time.perf_counter() - t0
            if side is not None:
                torch.cuda.current_stream(dev).wait_stream(side)
            # Rows whose grammar is finished end here, without a token.
            for r in rows:
                if r.matcher is not None and not r.done and _must_stop(r.matcher):
                    r.finish("stop")
            step_mask = None
            if bitmask is not None:
                step_mask = dev_mask[0] if side is not None else bitmask[: len(rows)]
            live = [k for k, r in enumerate(rows) if not r.done]
            if live and len(live) < len(rows):
                keep = torch.tensor(live, device=dev)
                cache.batch_select_indices(keep)
                logits, attn, next_pos = logits[keep], attn[keep], next_pos[keep]
                rows = [rows[k] for k in live]
                if step_mask is not None:
                    step_mask = step_mask[keep.to(step_mask.device)]
            for r in self.rows:
                if r.done:
                    piece = r.stream_piece()
                    if piece:
                        yield r.index, piece
            if not live:
                break

            tokens = self._choose(rows, logits, step_mask, gen)
            for r, t in zip(rows, tokens):
                if t in e._stop_set:
                    r.finish("stop")
                    continue
                r.pending = [t]
                r.append(t)
            for r in rows:
                piece = r.stream_piece()
                if piece:
                    yield r.index, piece

            # Forced tokens (needs the sampled token accepted first), then the next chunk per row.
            chunks: list[list[int]] = []
            accept: list[list[int]] = []
            for r in rows:
                if r.done:
                    chunks.append([])
                    accept.append([])
                    continue
                if r.matcher is not None and params.jump_forward:
                    forced = self._forced(r)
                    for t in forced:
                        if not r.done:
                            r.append(t, forced=True)
                    chunks.append(r.pending + forced)
                    accept.append([])
                else:
                    chunks.append(list(r.pending))
                    accept.append(list(r.pending))
            live = [k for k, r in enumerate(rows) if not r.done]
            if not live:
                for r in self.rows:
                    piece = r.stream_piece()
                    if piece:
                        yield r.index, piece
                break
            if len(live) < len(rows):
                keep = torch.tensor(live, device=dev)
                cache.batch_select_indices(keep)
                rows = [rows[k] for k in live]
                attn, next_pos = attn[keep], next_pos[keep]
                chunks = [chunks[k] for k in live]
                accept = [accept[k] for k in live]
            n = max(len(c) for c in chunks)
            step_ids = torch.full((len(rows), n), e.pad_id, dtype=torch.long)
            step_attn = torch.zeros((len(rows), n), dtype=torch.long)
            for k, c in enumerate(chunks):
                step_ids[k, n - len(c):] = torch.tensor(c)
                step_attn[k, n - len(c):] = 1
            step_ids, step_attn = step_ids.to(dev), step_attn.to(dev)
            step_pos = next_pos[:, None] + (step_attn.cumsum(-1) - 1).clamp(min=0)
            next_pos = next_pos + step_attn.sum(-1)
            attn = torch.cat([attn, step_attn], dim=1)
            if bitmask is not None:
                if copied[0] is not None:
                    copied[0].synchronize()  # the pinned buffer may still be in flight to the device
                bitmask[: len(rows)].fill_(-1)
            fut = e._executor.submit(self._grammar_work, rows, accept, bitmask, copier(len(rows)))
            logits = e._forward(step_ids, attn, step_pos, cache)

        elapsed = time.perf_counter() - t_start
        out = []
        for r in self.rows:
            r.stats.seconds = elapsed
            r.stats.tokens_per_second = r.stats.generated_tokens / elapsed if elapsed > 0 else 0.0
            r.stats.grammar_seconds = self.grammar_seconds
            r.stats.grammar_wait_seconds = wait_total
            out.append(Generation(r.text, list(r.ids), r.finish_reason, r.stats))
        self.generations = out


def run_smc(engine: Engine, req: Request, sampling: SamplingParams, *, particles: int, seed: int | None) -> Generation:
    """Sequential Monte Carlo (:func:`stencil.decode.smc.smc`) over ``engine``'s model for one request.

    Returns the heaviest output, with every distinct output (heaviest first, each with its
    normalised ``weight``) in ``posterior``. The target is the model at ``sampling.temperature``
    restricted to the grammar. Each step runs one batched forward pass over the live particles,
    growing their KV caches from their parents' (particles that share a prefix share its entry).
    """
    from transformers import DynamicCache

    from stencil.decode.smc import smc

    if req.grammar is None:
        raise StencilError("sampler='smc' needs a constraint (schema, grammar, regex, choices or tools)")
    if particles < 1:
        raise StencilError(f"particles must be >= 1, got {particles}")
    if req.grammar.vocab_size != engine.vocab_size:
        raise StencilError("the grammar was compiled for another vocabulary than this model's")
    if not engine.stop_ids:
        raise StencilError("sampler='smc' needs a stop token, and this tokenizer has none")
    t_start = time.perf_counter()
    dev = engine.device
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    prompt = torch.tensor([req.prompt_ids], device=dev)
    n_prompt = prompt.shape[1]
    root_cache = engine.new_cache()
    root_logits = engine._forward(prompt, torch.ones_like(prompt), torch.arange(n_prompt, device=dev)[None], root_cache)
    # prefix -> (per-layer (key, value) of that sequence, logits after it); only the newest length is kept.
    store: dict[tuple[int, ...], tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]] = {
        (): ([(layer.keys, layer.values) for layer in root_cache.layers], root_logits[0])
    }

    def next_logits(prefixes: list[list[int]]) -> torch.Tensor:
        keys = [tuple(p) for p in prefixes]
        todo = sorted({k for k in keys if k not in store})
        if todo:
            parents = [store[k[:-1]][0] for k in todo]
            stacked = [(torch.cat([p[i][0] for p in parents]), torch.cat([p[i][1] for p in parents]))
                       for i in range(len(parents[0]))]
            cache = DynamicCache(stacked, config=engine.model.config)
            length = n_prompt + len(todo[0])
            ids = torch.tensor([[k[-1]] for k in todo], device=dev)
            attn = torch.ones((len(todo), length), dtype=torch.long, device=dev)
            pos = torch.full((len(todo), 1), length - 1, dtype=torch.long, device=dev)
            logits = engine._forward(ids, attn, pos, cache)
            fresh = {k: ([(layer.keys[j:j + 1], layer.values[j:j + 1]) for layer in cache.layers], logits[j])
                     for j, k in enumerate(todo)}
            store.clear()
            store.update(fresh)
        return torch.stack([store[k][1] for k in keys]).float().div(temperature)

    result = smc(next_logits, GrammarMatcher(req.grammar), eos_ids=engine.stop_ids, n_particles=int(particles),
                 max_tokens=req.max_new_tokens, seed=seed)
    if not result.posterior:
        raise StencilError(f"every SMC particle died: no complete output within max_new_tokens={req.max_new_tokens}")
    elapsed = time.perf_counter() - t_start
    info = engine.tokenizer_info
    outs = []
    for tokens, weight in sorted(result.posterior.items(), key=lambda kv: -kv[1]):
        text = b"".join(info.decoded_vocab[t] for t in tokens).decode("utf-8", errors="replace")
        stats = GenerationStats(prompt_tokens=n_prompt, generated_tokens=len(tokens), seconds=elapsed,
                                checks=result.checks, sampler="smc")
        stats.tokens_per_second = sum(len(p.tokens) for p in result.particles) / elapsed if elapsed > 0 else 0.0
        outs.append(Generation(text, list(tokens), "stop", stats, weight=weight))
    best = outs[0]
    best.posterior = outs
    return best
