"""vLLM integration: a logits processor for both model runners, and a structured-output backend.

Tested against vLLM 0.33.0 (see docs/vllm.md). Two independent ways in:

1. :class:`StencilLogitsProcessor`, a vLLM logits-processor plug-in, registered through the
   ``vllm.logits_processors`` entry point, so an installed Stencil is loaded by every vLLM engine.
   One class implements both interfaces: the V1 one (``__init__(vllm_config, device,
   is_pin_memory)``, ``update_state``, ``apply(logits)``) and Model Runner V2's
   (``__init__(vllm_config, req_states)``, ``add_request``, ``apply(logits, ctx)``); vLLM picks by
   the runner it uses. A request opts in with ``SamplingParams(extra_args={"stencil": {...}})``
   (or, through the OpenAI server, ``"vllm_xargs": {"stencil": "<the same object as JSON text>"}``)::

       {"json_schema": {...}}                      # options: strict, any_order, whitespace, lenient
       {"grammar": "root ::= ..."}                 # options: syntax ("auto", "ebnf", "lark"), root
       {"regex": "\\\\d+"}      {"choice": ["yes", "no"]}      {"structural_tag": {...}}
       {"tools": [...]}                            # options: tool_choice, parallel_tool_calls, tool_format

   Requests without ``"stencil"`` are untouched. A bad constraint fails the request in
   ``validate_params`` (HTTP 400 in the server) with the frontend's message. Grammars are compiled
   off the model runner's thread while the prompt is prefilled, cached across requests, and the
   batch's masks are filled on a thread pool (the mask kernels release the GIL).

2. :class:`StencilBackend` / :class:`StencilGrammar`, vLLM's ``StructuredOutputBackend`` /
   ``StructuredOutputGrammar`` (``response_format``, ``structured_outputs``, guided decoding).
   vLLM has no plug-in point for these, so :func:`register` patches it; see its docstring.

Configuration (``--additional-config '{"stencil": {...}}'``, all optional): ``tokenizer`` (a path
or hub name; default: the model's tokenizer), ``vocab_size`` (default: the model's),
``threads`` (mask threads; default ``min(8, cpu_count)``), ``cache_size`` (compiled grammars kept;
default 256).

Stop tokens: a constrained request may stop (on any of its ``all_stop_token_ids``, or the
tokenizer's stop tokens when it has none) exactly when its grammar is complete, and never on a
stop token vLLM would not stop on. If vLLM nevertheless feeds a token the grammar rejects (another
processor forced it), the request is logged and from then on only its stop tokens are allowed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

import vllm
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
from vllm.v1.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    StructuredOutputOptions,
)
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from stencil.decode.bitmask import apply_token_bitmask_inplace, bitmask_words
from stencil.decode.matcher import GrammarMatcher
from stencil.errors import StencilError
from stencil.grammar.compiler import CompiledGrammar, GrammarCompiler
from stencil.grammar.vocab import TokenizerInfo

__all__ = [
    "StencilRequest",
    "StencilLogitsProcessor",
    "StencilBackend",
    "StencilGrammar",
    "register",
    "validate_structured_outputs",
    "TESTED_VLLM_VERSIONS",
]

logger = logging.getLogger(__name__)

TESTED_VLLM_VERSIONS = ("0.33.0",)

# ----------------------------------------------------------------------------------------------
# Requests: what "stencil" in extra_args may say
# ----------------------------------------------------------------------------------------------

_OPTIONS: dict[str, frozenset[str]] = {
    "json_schema": frozenset({"strict", "any_order", "whitespace", "max_whitespace", "lenient"}),
    "grammar": frozenset({"syntax", "root"}),
    "regex": frozenset(),
    "choice": frozenset(),
    "structural_tag": frozenset(),
    "tools": frozenset({"tool_choice", "parallel_tool_calls", "tool_format"}),
}


@dataclass(frozen=True)
class StencilRequest:
    """One request's constraint, read from ``extra_args["stencil"]``.

    ``kind`` is one of ``json_schema``, ``grammar``, ``regex``, ``choice``, ``structural_tag`` or
    ``tools``; ``key`` is its canonical JSON (the cache key).
    """

    kind: str
    spec: Any
    options: tuple[tuple[str, Any], ...]
    key: str

    @classmethod
    def from_params(cls, params: SamplingParams | None) -> "StencilRequest | None":
        """The request's constraint, None when it has none; ValueError when ``"stencil"`` is malformed."""
        extra = getattr(params, "extra_args", None)
        if not extra or "stencil" not in extra:
            return None
        return cls.parse(extra["stencil"])

    @classmethod
    def parse(cls, d: Any) -> "StencilRequest":
        """From the value of ``"stencil"``: an object, or its JSON text (what the OpenAI server's
        ``vllm_xargs`` can carry, since its values must be strings, numbers or lists)."""
        if isinstance(d, str):
            try:
                d = json.loads(d)
            except json.JSONDecodeError as e:
                raise ValueError(f"stencil: extra_args['stencil'] is not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ValueError(f"stencil: extra_args['stencil'] must be an object, got {type(d).__name__}")
        kinds = [k for k in _OPTIONS if k in d]
        if len(kinds) != 1:
            raise ValueError(f"stencil: give exactly one of {', '.join(_OPTIONS)} (got {kinds or 'none'})")
        kind = kinds[0]
        unknown = sorted(set(d) - {kind} - _OPTIONS[kind])
        if unknown:
            allowed = ", ".join(sorted(_OPTIONS[kind])) or "none"
            raise ValueError(f"stencil: unknown option(s) {unknown} for {kind} (allowed: {allowed})")
        spec = d[kind]
        if kind == "json_schema" and isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"stencil: json_schema is not valid JSON ({e.msg})") from None
        options = tuple(sorted((k, v) for k, v in d.items() if k != kind))
        try:
            key = json.dumps([kind, spec, options], sort_keys=True)
        except TypeError as e:
            raise ValueError(f"stencil: the constraint must be JSON data ({e})") from None
        return cls(kind, spec, options, key)

    def check(self) -> None:
        """Run the constraint's frontend (no tokenizer needed): ValueError with its message if it is bad."""
        _check_key(self.key)

    def compile(self, compiler: GrammarCompiler, tool_format: str | None = None) -> CompiledGrammar:
        """The constraint bound to ``compiler``'s vocabulary (cached by the compiler).

        ``tool_format`` is the default tool-call format when the request names none.
        """
        opts = dict(self.options)
        k = self.kind
        if k == "json_schema":
            return compiler.compile_json_schema(self.spec, **opts)
        if k == "grammar":
            return compiler.compile_grammar(self._text(), root=opts.get("root"), syntax=opts.get("syntax", "auto"))
        if k == "regex":
            return compiler.compile_regex(self._text())
        if k == "choice":
            return compiler.compile_choice(self.spec)
        if k == "structural_tag":
            return compiler.compile_structural_tag(self.spec)
        return compiler.compile_tools(self.spec, opts.get("tool_choice", "auto"), opts.get("parallel_tool_calls", True),
                                      format=opts.get("tool_format") or tool_format)

    def _text(self) -> str:
        if not isinstance(self.spec, str):
            raise StencilError(f"stencil: {self.kind} must be a string, got {type(self.spec).__name__}")
        return self.spec

    def grammar(self):
        """The grammar IR without a vocabulary (what :meth:`check` builds)."""
        opts = dict(self.options)
        k = self.kind
        if k == "json_schema":
            from stencil.grammar.json_schema import json_schema_to_grammar

            return json_schema_to_grammar(self.spec, **opts)
        if k == "grammar":
            syntax = opts.get("syntax", "auto")
            text = self._text()
            if syntax == "auto":
                syntax = "ebnf" if "::=" in text else "lark"
            if syntax == "ebnf":
                from stencil.grammar.ebnf import ebnf_to_grammar

                return ebnf_to_grammar(text, root=opts.get("root") or "root")
            if syntax == "lark":
                from stencil.grammar.lark import lark_to_grammar

                return lark_to_grammar(text, start=opts.get("root") or "start")
            raise StencilError(f"stencil: unknown grammar syntax {syntax!r}: use 'auto', 'ebnf' or 'lark'")
        if k == "regex":
            from stencil.grammar.regex import regex_grammar

            return regex_grammar(self._text())
        if k == "choice":
            from stencil.grammar.ir import GrammarBuilder, alt, lit

            if not isinstance(self.spec, list) or not self.spec or not all(isinstance(c, str) for c in self.spec):
                raise StencilError("stencil: choice must be a non-empty list of strings")
            b = GrammarBuilder()
            b.rule("root", alt(*(lit(c) for c in dict.fromkeys(self.spec))))
            return b.build("root")
        if k == "structural_tag":
            from stencil.grammar.structural_tag import structural_tag_to_grammar

            return structural_tag_to_grammar(self.spec)
        from stencil.integrations.tools import build_tool_grammar

        return build_tool_grammar(self.spec, opts.get("tool_choice", "auto"), opts.get("parallel_tool_calls", True),
                                  format=opts.get("tool_format") or "hermes")


@lru_cache(maxsize=1024)
def _check_key(key: str) -> None:
    kind, spec, options = json.loads(key)
    req = StencilRequest(kind, spec, tuple((k, v) for k, v in options), key)
    try:
        req.grammar()
    except StencilError as e:
        raise ValueError(f"stencil: invalid {kind}: {e}") from None
    except (TypeError, ValueError) as e:  # a wrong option type reaching a frontend
        raise ValueError(f"stencil: invalid {kind} options: {e}") from None


# ----------------------------------------------------------------------------------------------
# One request's constraint state
# ----------------------------------------------------------------------------------------------


class _Constraint:
    """A matcher plus the request's own stop tokens.

    The matcher allows the tokenizer's stop tokens when the grammar is complete; vLLM stops on the
    request's ``stop_ids``. Stop ids the tokenizer lacks are added (allowed when complete; taking
    one terminates), and the tokenizer's that vLLM would not stop on are removed.
    """

    def __init__(self, compiled: CompiledGrammar, stop_ids: Iterable[int] | None = None):
        self.matcher = GrammarMatcher(compiled)
        info = compiled.tokenizer_info
        vocab = compiled.vocab_size
        own = set(info.stop_token_ids)
        wanted = {int(t) for t in stop_ids if 0 <= int(t) < vocab} if stop_ids else own
        self.vocab_size = vocab
        self.extra_stops = np.array(sorted(wanted - own), np.int64)
        self.dropped_stops = np.array(sorted(own - wanted), np.int64)
        self.all_stops = np.array(sorted(own | wanted), np.int64)
        self._extra = frozenset(self.extra_stops.tolist())
        self._dropped = frozenset(self.dropped_stops.tolist())
        self._stopped = False
        self._history: list[bool] = []  # True: an added stop token was accepted

    def is_terminated(self) -> bool:
        return self._stopped or self.matcher.is_terminated()

    def accept(self, token: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar or the stop rule rejects it."""
        if self.is_terminated():
            return False
        t = int(token)
        if t in self._extra:
            if not self.matcher.is_completed():
                return False
            self._stopped = True
            self._history.append(True)
            return True
        if t in self._dropped or not self.matcher.accept_token(t):
            return False
        self._history.append(False)
        return True

    def rollback(self, n: int) -> None:
        if n < 0 or n > len(self._history):
            raise StencilError(f"cannot roll back {n} tokens: only {len(self._history)} accepted")
        for _ in range(n):
            if self._history.pop():
                self._stopped = False
            else:
                self.matcher.rollback(1)

    def reset(self) -> None:
        self.matcher.reset()
        self._history.clear()
        self._stopped = False

    @property
    def num_accepted(self) -> int:
        return len(self._history)

    def validate(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` are accepted in a row from here (state unchanged)."""
        n = 0
        for t in tokens:
            if not self.accept(t):
                break
            n += 1
        self.rollback(n)
        return n

    def fill(self, rows: np.ndarray, index: int) -> None:
        """Write the allowed next tokens into ``rows[index]`` (int32 bitmask words, 1 = allowed)."""
        row = rows[index]
        if self.is_terminated():
            row[:] = 0
            _set_bits(row, self.all_stops)
            return
        self.matcher.fill_next_token_bitmask(rows, index)
        if self.dropped_stops.size:
            _clear_bits(row, self.dropped_stops)
        if self.extra_stops.size and self.matcher.is_completed():
            _set_bits(row, self.extra_stops)
        if not row.any():
            # Nothing can follow and no stop token of the request may end it: let it stop anyway,
            # rather than leave a row whose every logit is -inf.
            _set_bits(row, self.all_stops)


def _set_bits(row: np.ndarray, ids: np.ndarray) -> None:
    u = row.view(np.uint32)
    np.bitwise_or.at(u, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))


def _clear_bits(row: np.ndarray, ids: np.ndarray) -> None:
    u = row.view(np.uint32)
    np.bitwise_and.at(u, ids >> 5, ~(np.uint32(1) << (ids & 31).astype(np.uint32)))


def _forced_stop_row(rows: np.ndarray, index: int, stops: np.ndarray) -> None:
    rows[index] = 0
    _set_bits(rows[index], stops)


# ----------------------------------------------------------------------------------------------
# Shared per-process state: vocabulary, compiler, threads
# ----------------------------------------------------------------------------------------------


class _Runtime:
    """What every Stencil processor of one vLLM config shares in a process."""

    _instances: dict[int, "_Runtime"] = {}
    _lock = threading.Lock()

    def __init__(self, vllm_config: Any):
        self.config = vllm_config  # held so that its id, the registry key, is never reused
        settings = dict((getattr(vllm_config, "additional_config", None) or {}).get("stencil", {}) or {})
        unknown = sorted(set(settings) - {"tokenizer", "vocab_size", "threads", "cache_size"})
        if unknown:
            raise ValueError(f"stencil: unknown additional_config settings {unknown}")
        model_config = getattr(vllm_config, "model_config", None)
        self._tokenizer_name = settings.get("tokenizer") or getattr(model_config, "tokenizer", None)
        if not self._tokenizer_name:
            raise ValueError("stencil: no tokenizer: the model config has none and additional_config "
                             "{'stencil': {'tokenizer': ...}} is not set")
        self._trust_remote_code = bool(getattr(model_config, "trust_remote_code", False))
        self._revision = getattr(model_config, "tokenizer_revision", None)
        self._vocab_size = settings.get("vocab_size") or (model_config.get_vocab_size() if model_config else None)
        threads = int(settings.get("threads") or min(8, os.cpu_count() or 1))
        self.cache_size = int(settings.get("cache_size") or 256)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="stencil-mask")
        # Compilation gets its own thread: mask tasks may wait on it.
        self.compile_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stencil-compile")
        self._compiler: GrammarCompiler | None = None
        self._tool_format: str | None = None
        self._init_lock = threading.Lock()

    @classmethod
    def of(cls, vllm_config: Any) -> "_Runtime":
        with cls._lock:
            rt = cls._instances.get(id(vllm_config))
            if rt is None:
                rt = cls._instances[id(vllm_config)] = cls(vllm_config)
            return rt

    def compiler(self) -> GrammarCompiler:
        with self._init_lock:
            if self._compiler is None:
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(self._tokenizer_name, trust_remote_code=self._trust_remote_code,
                                                   revision=self._revision)
                info = TokenizerInfo.from_huggingface(hf, vocab_size=self._vocab_size)
                self._compiler = GrammarCompiler(info, cache_size=self.cache_size)
                try:
                    from stencil.integrations.tools import detect_tool_format

                    self._tool_format = detect_tool_format(hf)
                except StencilError:
                    self._tool_format = None
            return self._compiler

    def compile(self, req: StencilRequest) -> CompiledGrammar:
        compiler = self.compiler()
        return req.compile(compiler, self._tool_format)


# ----------------------------------------------------------------------------------------------
# The logits processor (V1 and Model Runner V2)
# ----------------------------------------------------------------------------------------------


class _Slot:
    """A constrained request in the batch: its compiled grammar (maybe still compiling) and state."""

    def __init__(self, runtime: "_Runtime", req: StencilRequest, future: Future, stop_ids: Iterable[int] | None,
                 output_ids: list[int] | None = None):
        self.runtime = runtime
        self.req = req
        self.future = future
        self.stop_ids = sorted(stop_ids) if stop_ids else None
        self.output_ids = output_ids  # V1: vLLM's live list of the request's output tokens
        self.constraint: _Constraint | None = None
        self.broken = False
        self.fed = 0  # committed output tokens accepted so far

    def stops(self) -> np.ndarray:
        """The tokens a request whose grammar failed may still take: its stop tokens."""
        if self.constraint is not None:
            return self.constraint.all_stops
        ids = self.stop_ids or self.runtime.compiler().tokenizer_info.stop_token_ids
        return np.array(sorted(ids), np.int64)

    def ready(self) -> _Constraint | None:
        if self.constraint is None and not self.broken:
            try:
                self.constraint = _Constraint(self.future.result(), self.stop_ids)
            except Exception:
                logger.exception("stencil: compiling %s failed; the request may only stop", self.req.kind)
                self.broken = True
        return self.constraint

    def feed(self, tokens: Sequence[int]) -> None:
        """Accept committed tokens; on a rejection, give up on the grammar (the request may only stop)."""
        c = self.ready()
        for t in tokens:
            if c is None or self.broken:
                break
            if not c.accept(t):
                logger.error("stencil: the grammar rejects committed token %d (another processor forced it?); "
                             "the request may only stop now", t)
                self.broken = True
        self.fed += len(tokens)


class StencilLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Grammar-constrained decoding for requests that carry ``extra_args={"stencil": {...}}``.

    Implements vLLM's V1 logits-processor interface and Model Runner V2's; see the module
    docstring. It changes the argmax, so ``is_argmax_invariant()`` is False.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject a malformed or invalid ``"stencil"`` constraint (ValueError naming what and where)."""
        req = StencilRequest.from_params(sampling_params)
        if req is not None:
            req.check()

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        # V1 calls (vllm_config, device, is_pin_memory); V2 calls (vllm_config, req_states).
        # The device is the logits' own, and masks go there from pageable memory (a pinned buffer
        # reused across steps could be overwritten before an asynchronous copy of it ran).
        if len(args) + len(kwargs) == 1:
            self.req_states: LogitsProcRequestState | None = args[0] if args else kwargs["req_states"]
        else:
            self.req_states = None
            self._check_v1(vllm_config)
        self.runtime = _Runtime.of(vllm_config)
        self.slots: dict[int, _Slot] = {}

    @staticmethod
    def _check_v1(vllm_config: Any) -> None:
        sched = getattr(vllm_config, "scheduler_config", None)
        model = getattr(vllm_config, "model_config", None)
        listed = any("StencilLogitsProcessor" in (p if isinstance(p, str) else getattr(p, "__name__", ""))
                     for p in (getattr(model, "logits_processors", None) or ()))
        if getattr(sched, "async_scheduling", False) and not listed:
            # vLLM's V1 runner fills the sampled tokens of entry-point plug-ins in lazily under
            # async scheduling: a grammar would see placeholders instead of tokens.
            raise ValueError(
                "stencil: the V1 model runner with async scheduling gives entry-point logits processors no "
                "sampled tokens; use the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1, the default where "
                "supported) or --no-async-scheduling"
            )

    def _new_slot(self, params: SamplingParams, output_ids: list[int] | None = None) -> _Slot | None:
        req = StencilRequest.from_params(params)
        if req is None:
            return None
        future = self.runtime.compile_pool.submit(self.runtime.compile, req)
        return _Slot(self.runtime, req, future, getattr(params, "all_stop_token_ids", None), output_ids)

    # -- V1 ----------------------------------------------------------------------------------

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Apply a V1 batch update: removed, then added, then moved (one-way) or swapped."""
        if not batch_update:
            return
        for index in batch_update.removed:
            self.slots.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            slot = self._new_slot(params, output_ids)
            if slot is None:
                self.slots.pop(index, None)
            else:
                self.slots[index] = slot
        for a, b, direction in batch_update.moved:
            sa = self.slots.pop(a, None)
            sb = self.slots.pop(b, None)
            if sa is not None:
                self.slots[b] = sa
            if sb is not None and direction == MoveDirectionality.SWAP:
                self.slots[a] = sb

    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        """Mask the rows of constrained requests (V1: ``apply(logits)``; V2: ``apply(logits, ctx)``)."""
        if ctx is not None:
            return self._apply_v2(logits, ctx)
        if not self.slots:
            return logits
        rows = sorted(i for i in self.slots if i < logits.shape[0])
        tasks = []
        for r in rows:
            slot = self.slots[r]
            new = slot.output_ids[slot.fed:] if slot.output_ids is not None else []
            if any(t < 0 for t in new):
                raise RuntimeError("stencil: vLLM passed placeholder output tokens (-1); see the V1 async "
                                   "scheduling note in docs/vllm.md")
            tasks.append((slot, list(new), []))
        return self._mask(logits, rows, tasks)

    # -- Model Runner V2 --------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """(Re)initialize slot ``req_idx``; True when the request is constrained."""
        slot = self._new_slot(sampling_params)
        if slot is None:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = slot
        return True

    def _apply_v2(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        slot_of_batch = np.asarray(ctx.idx_mapping_np)
        active = sorted({int(s) for s in slot_of_batch if int(s) in self.slots})
        if not active:
            return logits
        rs = self.req_states
        dev = ctx.expanded_idx_mapping.device
        n_rows = int(ctx.expanded_idx_mapping.shape[0])
        act = torch.tensor(active, dtype=torch.long, device=dev)
        # One device->host copy for the layout and the committed lengths ...
        meta = torch.cat([
            ctx.expanded_idx_mapping.to(torch.long), ctx.expanded_local_pos.to(torch.long),
            ctx.input_ids.to(torch.long), rs.total_len.gpu.index_select(0, act.to(rs.total_len.gpu.device)).to(dev, torch.long),
        ]).cpu().numpy()
        row_slot, local_pos, input_ids = meta[:n_rows], meta[n_rows:2 * n_rows], meta[2 * n_rows:3 * n_rows]
        total = dict(zip(active, meta[3 * n_rows:].tolist()))
        prompt_len = {s: int(rs.prompt_len.np[s]) for s in active}
        # ... and one for the tokens committed since the last step.
        want_rows, want_cols, spans = [], [], {}
        for s in active:
            start = prompt_len[s] + self.slots[s].fed
            end = int(total[s])
            spans[s] = (len(want_cols), max(0, end - start))
            want_rows.extend([s] * max(0, end - start))
            want_cols.extend(range(start, end))
        committed = np.zeros(0, np.int64)
        if want_cols:
            all_ids = rs.all_token_ids.gpu
            committed = all_ids[torch.tensor(want_rows, device=all_ids.device),
                                torch.tensor(want_cols, device=all_ids.device)].cpu().numpy().astype(np.int64)
        # Rows of each request in local order: row p is sampled after drafts 1..p (input_ids).
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for r in range(n_rows):
            s = int(row_slot[r])
            if s in self.slots:
                by_slot.setdefault(s, []).append((int(local_pos[r]), r))
        rows, tasks = [], []
        for s, lst in sorted(by_slot.items()):
            lst.sort()
            first = lst[0][1] - lst[0][0]
            a, n = spans[s]
            drafts = [int(input_ids[first + p]) for p, _ in lst[1:]]
            rows.extend(r for _, r in lst)
            tasks.append((self.slots[s], committed[a:a + n].tolist(), drafts))
        return self._mask(logits, rows, tasks)

    # -- shared -------------------------------------------------------------------------------

    def _mask(self, logits: torch.Tensor, rows: list[int], tasks: list[tuple[_Slot, list[int], list[int]]]) -> torch.Tensor:
        """Feed each request its committed tokens, fill its rows (one per draft position) in parallel, apply."""
        if not rows:
            return logits
        words = bitmask_words(logits.shape[-1])
        masks = np.zeros((len(rows), words), np.int32)
        offsets = np.cumsum([0] + [1 + len(d) for _, _, d in tasks])

        def run(i: int) -> None:
            slot, committed, drafts = tasks[i]
            slot.feed(committed)
            _fill_rows(slot, drafts, masks, int(offsets[i]))

        list(self.runtime.pool.map(run, range(len(tasks))))
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        sub = logits.index_select(0, idx)
        apply_token_bitmask_inplace(sub, torch.from_numpy(masks).to(logits.device))
        logits.index_copy_(0, idx, sub)
        return logits


def _fill_rows(slot: _Slot, drafts: list[int], masks: np.ndarray, at: int) -> None:
    """Rows ``at .. at + len(drafts)``: the mask now and after each draft token (speculative decoding).

    Rows after a draft the grammar rejects repeat the last valid row: the rejection sampler never
    accepts such a draft (its row gives it probability 0), so those rows are never sampled from.
    """
    c = slot.ready()
    if c is None or slot.broken:
        stops = slot.stops()
        for k in range(len(drafts) + 1):
            _forced_stop_row(masks, at + k, stops)
        return
    c.fill(masks, at)
    taken = 0
    for k, t in enumerate(drafts, start=1):
        if taken == k - 1 and c.accept(t):
            taken += 1
            c.fill(masks, at + k)
        else:
            masks[at + k] = masks[at + k - 1]
    c.rollback(taken)


# ----------------------------------------------------------------------------------------------
# Structured-output backend
# ----------------------------------------------------------------------------------------------


@dataclass
class StencilGrammar(StructuredOutputGrammar):
    """vLLM's per-request ``StructuredOutputGrammar`` over a Stencil matcher."""

    constraint: _Constraint
    vocab_size: int

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        """Advance over ``tokens``; tokens after termination are ignored. False if one is rejected."""
        for t in tokens:
            if self.constraint.is_terminated():
                return True
            if not self.constraint.accept(t):
                logger.error("stencil: request %s: the grammar rejects token %d", request_id, t)
                return False
        return True

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        """The longest prefix of ``tokens`` the grammar accepts (up to and including a stop token)."""
        c = self.constraint
        n = 0
        for t in tokens:
            if c.is_terminated() or not c.accept(t):
                break
            n += 1
        c.rollback(n)
        return list(tokens[:n])

    def rollback(self, num_tokens: int) -> None:
        self.constraint.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, batch_index: int) -> None:
        rows = bitmask.numpy() if isinstance(bitmask, torch.Tensor) else bitmask
        self.constraint.fill(rows, batch_index)

    def is_terminated(self) -> bool:
        return self.constraint.is_terminated()

    def reset(self) -> None:
        self.constraint.reset()


@dataclass
class StencilBackend(StructuredOutputBackend):
    """vLLM's engine-level ``StructuredOutputBackend`` compiling every request type with Stencil."""

    def __post_init__(self) -> None:
        if not hasattr(self.tokenizer, "backend_tokenizer"):
            raise ValueError(
                f"stencil: the structured-output backend needs a Hugging Face fast tokenizer, got "
                f"{type(self.tokenizer).__name__} (for Mistral models use --tokenizer-mode hf)"
            )
        info = TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
        self.compiler = GrammarCompiler(info)
        so = getattr(self.vllm_config, "structured_outputs_config", None)
        self.whitespace = "compact" if getattr(so, "disable_any_whitespace", False) else "flexible"

    def compile_grammar(self, request_type: StructuredOutputOptions, grammar_spec: str,
                        stop_token_ids: set[int] | None = None) -> StructuredOutputGrammar:
        c = self.compiler
        if request_type == StructuredOutputOptions.JSON:
            cg = c.compile_json_schema(json.loads(grammar_spec), whitespace=self.whitespace)
        elif request_type == StructuredOutputOptions.JSON_OBJECT:
            cg = c.compile_json_schema({"type": "object"}, whitespace=self.whitespace)
        elif request_type == StructuredOutputOptions.GRAMMAR:
            cg = c.compile_grammar(grammar_spec)
        elif request_type == StructuredOutputOptions.REGEX:
            cg = c.compile_regex(grammar_spec)
        elif request_type == StructuredOutputOptions.CHOICE:
            cg = c.compile_choice(json.loads(grammar_spec))
        elif request_type == StructuredOutputOptions.STRUCTURAL_TAG:
            cg = c.compile_structural_tag(grammar_spec)
        else:
            raise ValueError(f"stencil: unsupported structured output type {request_type}")
        return StencilGrammar(_Constraint(cg, stop_token_ids), self.vocab_size)

    def allocate_token_bitmask(self, max_num_seqs: int) -> torch.Tensor:
        return torch.full((max_num_seqs, bitmask_words(self.vocab_size)), -1, dtype=torch.int32)

    def destroy(self) -> None:
        self.compiler.clear_cache()


def validate_structured_outputs(sampling_params: SamplingParams) -> None:
    """Validate a request's ``structured_outputs`` with Stencil's frontends (no tokenizer needed).

    Raises vLLM's ``VLLMValidationError`` with the frontend's message, as vLLM's own validators do.
    """
    from vllm.exceptions import VLLMValidationError

    so = sampling_params.structured_outputs
    if so is None:
        return
    if so.json is not None:
        spec = {"json_schema": so.json}
    elif so.json_object:
        spec = {"json_schema": {"type": "object"}}
    elif so.regex is not None:
        spec = {"regex": so.regex}
    elif so.choice is not None:
        spec = {"choice": so.choice}
    elif so.grammar is not None:
        spec = {"grammar": so.grammar}
    elif so.structural_tag is not None:
        try:
            spec = {"structural_tag": json.loads(so.structural_tag)}
        except json.JSONDecodeError as e:
            raise VLLMValidationError(f"stencil: structural_tag is not valid JSON ({e.msg})") from None
    else:
        raise VLLMValidationError("stencil: this structured outputs specification is not supported")
    try:
        StencilRequest.parse(spec).check()
    except ValueError as e:
        raise VLLMValidationError(str(e)) from None


_ORIGINALS: dict[str, Any] = {}


def register(*, force: bool = False) -> None:
    """Install Stencil as vLLM's ``xgrammar`` structured-output backend, in this process.

    vLLM has no plug-in point for structured-output backends, so this patches two names (vLLM
    0.33.0; other versions raise unless ``force=True``, and it checks both names exist):

    * ``vllm.v1.structured_output.XgrammarBackend`` -> :class:`StencilBackend`: the engine core
      builds the backend of requests that resolved to ``"xgrammar"`` from this module global;
    * ``vllm.v1.structured_output.backend_xgrammar.validate_xgrammar_grammar`` ->
      :func:`validate_structured_outputs`: request validation (for backend ``"xgrammar"`` and for
      ``"auto"``, which tries xgrammar first) imports it at call time.

    So with ``--structured-outputs-config.backend xgrammar`` (or ``auto``) every structured request
    runs on Stencil. Both the API-server process (validation) and the engine-core process (the
    backend) need it: set ``STENCIL_VLLM_BACKEND=1`` and Stencil's ``vllm.general_plugins`` entry
    point, which vLLM loads in every process, calls this. Idempotent.
    """
    import vllm.v1.structured_output as so_mod
    import vllm.v1.structured_output.backend_xgrammar as xgr_mod

    if vllm.__version__ not in TESTED_VLLM_VERSIONS and not force:
        raise RuntimeError(f"stencil.register() patches vLLM internals and was tested with vLLM "
                           f"{', '.join(TESTED_VLLM_VERSIONS)}, not {vllm.__version__}; pass force=True to try anyway")
    for mod, name in ((so_mod, "XgrammarBackend"), (xgr_mod, "validate_xgrammar_grammar")):
        if not hasattr(mod, name):
            raise RuntimeError(f"stencil.register(): {mod.__name__}.{name} does not exist in vLLM {vllm.__version__}")
    if _ORIGINALS:
        return
    _ORIGINALS["XgrammarBackend"] = so_mod.XgrammarBackend
    _ORIGINALS["validate_xgrammar_grammar"] = xgr_mod.validate_xgrammar_grammar
    so_mod.XgrammarBackend = StencilBackend
    xgr_mod.validate_xgrammar_grammar = validate_structured_outputs


def unregister() -> None:
    """Undo :func:`register`."""
    if not _ORIGINALS:
        return
    import vllm.v1.structured_output as so_mod
    import vllm.v1.structured_output.backend_xgrammar as xgr_mod

    so_mod.XgrammarBackend = _ORIGINALS.pop("XgrammarBackend")
    xgr_mod.validate_xgrammar_grammar = _ORIGINALS.pop("validate_xgrammar_grammar")


def general_plugin() -> None:
    """vLLM ``general_plugins`` hook: :func:`register` when ``STENCIL_VLLM_BACKEND`` is 1/true/yes."""
    if os.environ.get("STENCIL_VLLM_BACKEND", "").lower() in ("1", "true", "yes"):
        register()
