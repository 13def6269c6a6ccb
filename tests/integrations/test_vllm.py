"""The vLLM integration against the real vLLM 0.33.0 classes.

vLLM is installed without its dependencies (``pip install --no-deps vllm==0.33.0`` plus the light
packages of the ``vllm`` extra); its interface modules, config classes, batch-update types and
plug-in loaders are the real ones. What needs a GPU is replaced: Model Runner V2's request state
lives in accelerator buffers (pinned memory, Triton writes), so the V2 tests hand the processor
the real ``LogitsProcRequestState`` dataclass over plain CPU tensors with the same attributes.

The oracle for every mask row is a standalone :class:`GrammarMatcher`, fed the same tokens,
whose brute-force mask (every token tried with the parser) gives the allowed set; the processor
must leave those logits unchanged and set all others to ``-inf``. Batch updates are replayed as
vLLM's V1 ``InputBatch`` produces them (finished requests removed, new ones filling the lowest
holes, the last requests moved down into the remaining holes, occasional swaps), and Model Runner
V2 steps as its sampler sees them (rows reordered every step, one row per draft token, drafts the
grammar rejects, partially accepted speculation, recycled slots, a resumed request).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: pip install --no-deps vllm==0.33.0 and the 'vllm' extra")
if vllm.__version__ != "0.33.0":
    pytest.skip(f"these tests target vLLM 0.33.0, found {vllm.__version__}", allow_module_level=True)

from vllm.config import DeviceConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor  # noqa: E402
from vllm.v1.structured_output.backend_types import StructuredOutputOptions  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import (  # noqa: E402
    LogitsContext,
    LogitsProcRequestState,
)
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor  # noqa: E402

from stencil.decode.matcher import GrammarMatcher  # noqa: E402
from stencil.grammar.compiler import GrammarCompiler  # noqa: E402
from stencil.grammar.vocab import TokenizerInfo  # noqa: E402
from stencil.integrations import vllm as sv  # noqa: E402
from tests.conftest import tokenizer_dir, tokenizer_meta  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}}}]
CONSTRAINTS = [
    {"json_schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                                      "ok": {"type": "boolean"}}, "required": ["n"]},
     "whitespace": "compact"},
    {"regex": r"(yes|no|maybe)[!.]?"},
    {"choice": ["alpha", "beta", "gamma delta"]},
    {"grammar": 'root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3})* ")"'},
    {"structural_tag": {"type": "structural_tag", "format": {"type": "tag", "begin": "<a>",
                                                             "content": {"type": "any_text"}, "end": "</a>"}}},
    {"tools": TOOLS, "tool_choice": "required", "tool_format": "mistral"},
    None,  # an unconstrained request
]


# ----------------------------------------------------------------------------------------------
# Fixtures: a real VllmConfig naming a real tokenizer, and the oracle
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def name():
    return "mistral"


@pytest.fixture(scope="module")
def info(name):
    return TokenizerInfo.from_file(tokenizer_dir(name), vocab_size=tokenizer_meta(name)["model_vocab_size"])


def make_config(name, async_scheduling=False):
    return VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        scheduler_config=SchedulerConfig(async_scheduling=async_scheduling, max_model_len=2048, is_encoder_decoder=False),
        additional_config={"stencil": {"tokenizer": str(tokenizer_dir(name)), "threads": 2,
                                       "vocab_size": tokenizer_meta(name)["model_vocab_size"]}},
    )


@pytest.fixture(scope="module")
def config(name):
    return make_config(name)


@pytest.fixture(scope="module")
def compiler(info):
    return GrammarCompiler(info)


def params(constraint, **kw) -> SamplingParams:
    return SamplingParams(extra_args=None if constraint is None else {"stencil": constraint}, **kw)


class Oracle:
    """A standalone matcher for one request and the allowed set its brute-force mask gives.

    Stop tokens follow the request: it may stop on its own stop ids exactly when the grammar is
    complete, never on the tokenizer's other stop ids; a request that can only end may end.
    """

    def __init__(self, compiler, constraint, stop_ids=None):
        req = sv.StencilRequest.parse(constraint)
        self.m = GrammarMatcher(req.compile(compiler))
        self.own_stops = set(compiler.tokenizer_info.stop_token_ids)
        self.stops = set(stop_ids) if stop_ids else self.own_stops
        self.stopped = False

    def allowed(self) -> np.ndarray:
        a = self.m.brute_force_mask()
        if self.stopped:
            a[:] = False
        a[list(self.own_stops - self.stops)] = False
        a[list(self.stops - self.own_stops)] = self.m.is_completed() and not self.stopped
        if not a.any():
            a[list(self.own_stops | self.stops)] = True
        return a

    def accept(self, t) -> bool:
        if t in self.stops - self.own_stops:
            self.stopped = self.m.is_completed()
            return self.stopped
        return t not in self.own_stops - self.stops and self.m.accept_token(t)

    def fork(self) -> "Oracle":
        o = Oracle.__new__(Oracle)
        o.m, o.own_stops, o.stops, o.stopped = self.m.fork(), self.own_stops, self.stops, self.stopped
        return o

    def ended(self) -> bool:
        return self.stopped or self.m.is_terminated()


def check_row(before: torch.Tensor, after: torch.Tensor, allowed: np.ndarray | None, where: str):
    if allowed is None:
        assert torch.equal(before, after), f"{where}: an unconstrained row changed"
        return
    a = torch.from_numpy(allowed[: before.shape[0]])
    assert torch.equal(after[a], before[a]), f"{where}: allowed logits changed"
    assert torch.isneginf(after[~a]).all(), f"{where}: a disallowed token kept its logit"


def pick(allowed: np.ndarray, rng: random.Random, prefer_stop: float, stops) -> int:
    ids = np.flatnonzero(allowed)
    stop_ids = [t for t in ids if t in stops]
    if stop_ids and rng.random() < prefer_stop:
        return int(stop_ids[0])
    return int(ids[rng.randrange(len(ids))])


# ----------------------------------------------------------------------------------------------
# Parameters, plug-in loading, configuration errors
# ----------------------------------------------------------------------------------------------


def test_one_class_is_both_vllm_interfaces():
    assert issubclass(sv.StencilLogitsProcessor, V1LogitsProcessor)
    assert issubclass(sv.StencilLogitsProcessor, V2LogitsProcessor)


def test_entry_point_is_accepted_by_both_vllm_loaders():
    from importlib.metadata import entry_points

    from vllm.v1.sample.logits_processor import _load_logitsprocs_plugins
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

    eps = {e.name: e.value for e in entry_points(group="vllm.logits_processors")}
    assert eps.get("stencil") == "stencil.integrations.vllm:StencilLogitsProcessor", (
        "the vllm.logits_processors entry point is missing: reinstall the package (pip install -e .)")
    assert sv.StencilLogitsProcessor in _load_logitsprocs_plugins()
    assert sv.StencilLogitsProcessor in _load_v2_logitsprocs_plugins()  # the V2 loader rejects V1-only classes


@pytest.mark.parametrize("stencil, match", [
    ({"json_schema": {"type": "object"}, "regex": "a"}, "exactly one of"),
    ({}, "exactly one of"),
    (["regex"], "must be an object"),
    ("{not json", "not valid JSON"),
    ({"regex": "(a"}, "invalid regex"),
    ({"json_schema": {"type": "nonsense"}}, "invalid json_schema"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"grammar": "root ::= ("}, "invalid grammar"),
    ({"choice": []}, "invalid choice"),
    ({"structural_tag": {"type": "nope"}}, "invalid structural_tag"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid tools"),
    ({"regex": "a", "strict": True}, "unknown option"),
    ({"json_schema": {"type": "object"}, "whitespace": 3}, "json_schema"),
])
def test_validate_params_rejects_bad_constraints(stencil, match):
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    p = SamplingParams(extra_args={"stencil": stencil})
    with pytest.raises(ValueError, match=match):
        sv.StencilLogitsProcessor.validate_params(p)
    # Through vLLM's own admission check: a validation error (HTTP 400), not a crash.
    with pytest.raises(VLLMValidationError, match=match):
        validate_logits_processors_parameters([sv.StencilLogitsProcessor], p)


def test_validate_params_accepts_good_and_absent_constraints():
    for c in CONSTRAINTS:
        sv.StencilLogitsProcessor.validate_params(params(c))
        if c is not None:  # the OpenAI server's vllm_xargs carry it as JSON text
            sv.StencilLogitsProcessor.validate_params(SamplingParams(extra_args={"stencil": json.dumps(c)}))
            assert sv.StencilRequest.parse(json.dumps(c)) == sv.StencilRequest.parse(c)
    sv.StencilLogitsProcessor.validate_params(SamplingParams(extra_args={"other": 1}))


def test_v1_with_async_scheduling_fails_at_startup(name):
    with pytest.raises(ValueError, match="async scheduling"):
        sv.StencilLogitsProcessor(make_config(name, async_scheduling=True), torch.device("cpu"), False)


def test_unknown_settings_are_rejected(name):
    cfg = make_config(name)
    cfg.additional_config["stencil"]["threds"] = 2
    with pytest.raises(ValueError, match="threds"):
        sv.StencilLogitsProcessor(cfg, torch.device("cpu"), False)


# ----------------------------------------------------------------------------------------------
# V1: realistic batch-update replays
# ----------------------------------------------------------------------------------------------


@dataclass
class Req:
    constraint: dict | None
    params: SamplingParams
    output: list[int]
    oracle: Oracle | None
    done: bool = False


def replay_v1(config, compiler, info, seed, steps=14):
    rng = random.Random(seed)
    proc = sv.StencilLogitsProcessor(config, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False
    batch: list[Req | None] = []
    pending_stop = 7  # an extra request stop token for some requests ("</s>" = 2 is the tokenizer's)
    seen = {"rows": 0, "added": 0, "removed": 0, "moved": 0, "swapped": 0}
    for step in range(steps):
        removed = [i for i, r in enumerate(batch) if r is not None and (r.done or len(r.output) > 24)]
        for i in removed:
            batch[i] = None
        added = []
        for _ in range(rng.choice([0, 1, 1, 2]) if step else 4):
            c = rng.choice(CONSTRAINTS)
            stop = [pending_stop] if rng.random() < 0.3 else None
            p = params(c, stop_token_ids=stop) if stop else params(c)
            req = Req(c, p, [], Oracle(compiler, c, p.all_stop_token_ids) if c else None)
            holes = sorted(i for i in removed)
            if holes:  # vLLM reuses the lowest hole (pop_removed), so it is not reported as removed
                idx = holes[0]
                removed.remove(idx)
            else:
                idx = len(batch)
                batch.append(None)
            batch[idx] = req
            added.append((idx, p, [1, 2, 3], req.output))
        reported = sorted(removed)  # holes no new request took
        moved = []
        for hole in reported:  # condense: the last request moves down into each hole, lowest first
            last = max((i for i, r in enumerate(batch) if r is not None), default=-1)
            if last > hole:
                batch[hole], batch[last] = batch[last], None
                moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        while batch and batch[-1] is None:
            batch.pop()
        if len(batch) >= 2 and rng.random() < 0.4:
            i, j = rng.sample(range(len(batch)), 2)
            batch[i], batch[j] = batch[j], batch[i]
            moved.append((i, j, MoveDirectionality.SWAP))
        update = BatchUpdate(batch_size=len(batch), removed=reported, added=added, moved=moved) \
            if (added or moved or reported) else None
        seen["added"] += len(added)
        seen["removed"] += len(reported)
        seen["moved"] += sum(d == MoveDirectionality.UNIDIRECTIONAL for *_, d in moved)
        seen["swapped"] += sum(d == MoveDirectionality.SWAP for *_, d in moved)
        proc.update_state(update)
        if not batch:
            continue
        logits = torch.randn(len(batch), info.vocab_size)
        before = logits.clone()
        out = proc.apply(logits)
        assert out is logits
        for i, r in enumerate(batch):
            allowed = r.oracle.allowed() if r.oracle else None
            check_row(before[i], logits[i], allowed, f"seed {seed} step {step} row {i}")
            seen["rows"] += allowed is not None
            if r.done:
                continue
            t = pick(allowed, rng, 0.5, r.oracle.stops) if allowed is not None else rng.randrange(info.tokenizer_size)
            if r.oracle:
                assert r.oracle.accept(t)
                r.done = r.oracle.ended()
            r.output.append(t)  # vLLM appends to the very list it handed over in `added`
    return seen


def test_v1_batch_updates_replayed_row_by_row(config, compiler, info):
    seen = {}
    for seed in (0, 1):
        for k, v in replay_v1(config, compiler, info, seed).items():
            seen[k] = seen.get(k, 0) + v
    # Every kind of batch change happened, and many constrained rows were checked.
    assert seen["rows"] >= 40 and min(seen["added"], seen["removed"], seen["moved"], seen["swapped"]) >= 1, seen


def test_v1_rejected_committed_token_leaves_only_stopping(config, compiler, info):
    proc = sv.StencilLogitsProcessor(config, torch.device("cpu"), False)
    out: list[int] = []
    c = {"choice": ["yes", "no"]}
    proc.update_state(BatchUpdate(1, [], [(0, params(c), [1], out)], []))
    proc.apply(torch.zeros(1, info.vocab_size))
    out.append(int(info.tokens_with_prefix(b"z")[0]))  # another processor forced a token the grammar rejects
    logits = torch.zeros(1, info.vocab_size)
    proc.apply(logits)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == sorted(info.stop_token_ids)


def test_v1_resumed_request_catches_up(config, compiler, info):
    """A request re-added after preemption brings its output so far; the mask continues from there."""
    c = CONSTRAINTS[0]
    o = Oracle(compiler, c)
    so_far = []
    rng = random.Random(3)
    for _ in range(4):
        t = pick(o.allowed(), rng, 0.0, o.stops)
        assert o.accept(t)
        so_far.append(t)
    proc = sv.StencilLogitsProcessor(config, torch.device("cpu"), False)
    proc.update_state(BatchUpdate(1, [], [(0, params(c), [1], list(so_far))], []))
    logits = torch.randn(1, info.vocab_size)
    before = logits.clone()
    proc.apply(logits)
    check_row(before[0], logits[0], o.allowed(), "resumed")


# ----------------------------------------------------------------------------------------------
# Model Runner V2: reordered rows, speculative drafts, recycled slots
# ----------------------------------------------------------------------------------------------


class HostBuffer:
    """What the processor reads of vLLM's StagedWriteTensor / UvaBackedTensor: ``.gpu`` and ``.np``."""

    def __init__(self, t: torch.Tensor):
        self.gpu = t
        self.np = t.numpy()


def v2_state(info, max_reqs=6, max_len=256):
    return LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=max_reqs, vocab_size=info.vocab_size,
        all_token_ids=HostBuffer(torch.zeros(max_reqs, max_len, dtype=torch.int32)),
        prompt_len=HostBuffer(torch.zeros(max_reqs, dtype=torch.int32)),
        prefill_len=HostBuffer(torch.zeros(max_reqs, dtype=torch.int32)),
        total_len=HostBuffer(torch.zeros(max_reqs, dtype=torch.int32)),
    )


def v2_add(proc, rs, slot, p, prompt, outputs=()):
    """What the model runner does for a (re)scheduled request: fill the slot, then tell the processors."""
    toks = list(prompt) + list(outputs)
    rs.all_token_ids.gpu[slot, : len(toks)] = torch.tensor(toks, dtype=torch.int32)
    rs.prompt_len.np[slot] = len(prompt)
    rs.prefill_len.np[slot] = len(toks)
    rs.total_len.gpu[slot] = len(toks)
    return proc.add_request(slot, p)


def test_v2_steps_with_speculative_drafts(config, compiler, info):
    rng = random.Random(7)
    rs = v2_state(info)
    proc = sv.StencilLogitsProcessor(config, rs)
    live: dict[int, Req] = {}
    free = list(range(rs.max_num_reqs))
    checked = rejected_drafts = accepted_drafts = 0
    for step in range(12):
        while len(live) < 4 and free:
            slot = free.pop(rng.randrange(len(free)))
            c = rng.choice(CONSTRAINTS)
            p = params(c)
            live[slot] = Req(c, p, [], Oracle(compiler, c) if c else None)
            assert v2_add(proc, rs, slot, p, prompt=[1, 5, 9]) == (c is not None)
        order = list(live)
        rng.shuffle(order)  # rows are reordered every step
        rows, local, input_ids, drafts_of = [], [], [], {}
        for slot in order:
            r = live[slot]
            total = int(rs.total_len.gpu[slot])
            drafts = []
            if r.oracle:  # drafts: mostly tokens the grammar allows, sometimes one it rejects
                fork = r.oracle.fork()
                for _ in range(rng.choice([0, 1, 2, 3])):
                    a = fork.allowed() if rng.random() < 0.75 else ~fork.allowed()
                    a[info.tokenizer_size:] = False
                    a[list(fork.own_stops | fork.stops)] = False
                    if not a.any():
                        break
                    t = pick(a, rng, 0.0, set())
                    drafts.append(t)
                    if not fork.accept(t):
                        break
            else:
                drafts = [rng.randrange(info.tokenizer_size) for _ in range(rng.choice([0, 2]))]
            drafts_of[slot] = drafts
            for k in range(1 + len(drafts)):
                rows.append(slot)
                local.append(k)
                input_ids.append(int(rs.all_token_ids.gpu[slot, total - 1]) if k == 0 else drafts[k - 1])
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(rows, dtype=torch.int32),
            idx_mapping=torch.tensor(order, dtype=torch.int32),
            idx_mapping_np=np.array(order, dtype=np.int32),
            expanded_local_pos=torch.tensor(local, dtype=torch.int32),
            input_ids=torch.tensor(input_ids, dtype=torch.int32),
            pos=torch.zeros(len(rows), dtype=torch.int64),
            seq_lens_upper_bound_np=np.zeros(len(order), dtype=np.int32),
        )
        logits = torch.randn(len(rows), info.vocab_size)
        before = logits.clone()
        proc.apply(logits, ctx)
        # Check every row, then "rejection-sample": accept a prefix of valid drafts plus a bonus token.
        row = 0
        for slot in order:
            r, drafts = live[slot], drafts_of[slot]
            fork = r.oracle.fork() if r.oracle else None
            valid = 0
            for k in range(1 + len(drafts)):
                where = f"step {step} slot {slot} draft-row {k}"
                if fork is None:
                    check_row(before[row + k], logits[row + k], None, where)
                    continue
                if k == valid:
                    check_row(before[row + k], logits[row + k], fork.allowed(), where)
                    checked += 1
                    if k < len(drafts) and fork.accept(drafts[k]):
                        valid += 1
                    elif k < len(drafts):
                        rejected_drafts += 1
                else:  # after a rejected draft the row repeats the last valid one
                    assert torch.equal(torch.isneginf(logits[row + k]), torch.isneginf(logits[row + valid])), where
            row += 1 + len(drafts)
            keep = rng.randint(0, valid) if r.oracle else rng.randint(0, len(drafts))
            committed = drafts[:keep]
            accepted_drafts += keep if r.oracle else 0
            if r.oracle:
                for t in committed:
                    assert r.oracle.accept(t)
                bonus = pick(r.oracle.allowed(), rng, 0.3, r.oracle.stops)
                assert r.oracle.accept(bonus)
            else:
                bonus = rng.randrange(info.tokenizer_size)
            committed.append(bonus)
            total = int(rs.total_len.gpu[slot])
            rs.all_token_ids.gpu[slot, total: total + len(committed)] = torch.tensor(committed, dtype=torch.int32)
            rs.total_len.gpu[slot] = total + len(committed)
            r.output.extend(committed)
            if (r.oracle and r.oracle.ended()) or len(r.output) > 30:
                del live[slot]  # finished: V2 frees the slot without telling the processors
                free.append(slot)
        if step == 6 and live:
            # Preemption: a request comes back in another slot with its output so far as prefill.
            slot = next(iter(live))
            r = live.pop(slot)
            new = free.pop()
            free.append(slot)
            live[new] = r
            v2_add(proc, rs, new, r.params, prompt=[1, 5, 9], outputs=r.output)
    assert checked >= 30 and rejected_drafts >= 3 and accepted_drafts >= 3, (checked, rejected_drafts, accepted_drafts)


def test_v2_unconstrained_batch_is_untouched(config, info):
    rs = v2_state(info)
    proc = sv.StencilLogitsProcessor(config, rs)
    assert v2_add(proc, rs, 0, params(None), prompt=[1]) is False
    ctx = LogitsContext(torch.tensor([0]), torch.tensor([0]), np.array([0]), torch.tensor([0]), torch.tensor([1]),
                        torch.tensor([0]), np.array([1]))
    logits = torch.randn(1, info.vocab_size)
    before = logits.clone()
    assert torch.equal(proc.apply(logits, ctx), before)


# ----------------------------------------------------------------------------------------------
# The structured-output backend
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(config, name):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))
    b = sv.StencilBackend(config, tokenizer=hf, vocab_size=tokenizer_meta(name)["model_vocab_size"])
    yield b
    b.destroy()


REQUESTS = [
    (StructuredOutputOptions.JSON, json.dumps({"type": "object", "properties": {"k": {"enum": ["a", "b"]}},
                                               "required": ["k"]}), {"json_schema": {
        "type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"]}}),
    (StructuredOutputOptions.JSON_OBJECT, "", {"json_schema": {"type": "object"}}),
    (StructuredOutputOptions.REGEX, r"[a-c]{2,4}", {"regex": r"[a-c]{2,4}"}),
    (StructuredOutputOptions.CHOICE, json.dumps(["left", "right"]), {"choice": ["left", "right"]}),
    (StructuredOutputOptions.GRAMMAR, 'root ::= "x" [0-9]+', {"grammar": 'root ::= "x" [0-9]+'}),
    (StructuredOutputOptions.STRUCTURAL_TAG, json.dumps({"type": "structural_tag", "format": {
        "type": "const_string", "value": "ok"}}), {"structural_tag": {"type": "const_string", "value": "ok"}}),
]


@pytest.mark.parametrize("kind, spec, constraint", REQUESTS)
def test_backend_grammar_follows_the_scheduler_protocol(backend, compiler, info, kind, spec, constraint):
    """The calls vLLM's StructuredOutputManager makes: masks for draft positions (accept, fill,
    roll back), validate_tokens, accept_tokens, termination, reset."""
    rng = random.Random(kind.value)
    stops = set(info.stop_token_ids)
    g = backend.compile_grammar(kind, spec, stop_token_ids=stops)
    oracle = Oracle(compiler, constraint, stops)
    bitmask = backend.allocate_token_bitmask(4)
    assert bitmask.shape == (4, (info.vocab_size + 31) // 32) and bitmask.dtype == torch.int32
    for _ in range(40):
        # Draft tokens: a valid prefix and maybe one the grammar rejects.
        fork = oracle.fork()
        drafts = []
        for _ in range(rng.randint(0, 3)):
            a = fork.allowed()
            t = pick(a if rng.random() < 0.8 else ~a & (np.arange(a.size) < info.tokenizer_size), rng, 0.2, stops)
            drafts.append(t)
            if not fork.accept(t) or fork.ended():
                break
        valid = g.validate_tokens(drafts)
        expect = []
        fork = oracle.fork()
        for t in drafts:
            if not fork.accept(t):
                break
            expect.append(t)
            if fork.ended():
                break
        assert valid == expect
        # The manager's bitmask loop: fill, accept a draft, fill, ..., then roll back.
        fork = oracle.fork()
        advanced = 0
        for k, t in enumerate(valid[:3]):
            g.fill_bitmask(bitmask, k)
            check_bits(bitmask[k], fork.allowed(), info)
            if g.is_terminated() or not g.accept_tokens("req", [t]):
                break
            fork.accept(t)
            advanced += 1
        g.rollback(advanced)
        # Commit one token (what the scheduler does after sampling).
        g.fill_bitmask(bitmask, 0)
        a = oracle.allowed()
        check_bits(bitmask[0], a, info)
        t = pick(a, rng, 0.3, stops)
        assert g.accept_tokens("req", [t]) and oracle.accept(t)
        assert g.is_terminated() == oracle.ended()
        if g.is_terminated():
            assert g.accept_tokens("req", [123])  # ignored after termination, as vLLM expects
            assert g.validate_tokens([1, 2]) == []
            break
    g.reset()
    assert not g.is_terminated()
    g.fill_bitmask(bitmask, 1)
    check_bits(bitmask[1], Oracle(compiler, constraint, stops).allowed(), info)


def check_bits(row: torch.Tensor, allowed: np.ndarray, info):
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[: info.vocab_size].astype(bool)
    assert np.array_equal(bits, allowed[: info.vocab_size])


def test_backend_honours_the_requests_stop_tokens(backend, info):
    g = backend.compile_grammar(StructuredOutputOptions.CHOICE, json.dumps(["hi"]), stop_token_ids={7})
    bm = backend.allocate_token_bitmask(1)
    eos = info.stop_token_ids[0]
    for t in info.tokens_with_prefix(b"hi"):
        if info.decoded_vocab[t] == b"hi":
            assert g.accept_tokens("r", [t])
            break
    g.fill_bitmask(bm, 0)
    bits = np.unpackbits(bm[0].numpy().view(np.uint8), bitorder="little")
    assert bits[7] and not bits[eos]  # vLLM stops on 7 here, not on the tokenizer's eos
    assert g.validate_tokens([eos]) == [] and g.validate_tokens([7]) == [7]
    assert g.accept_tokens("r", [7]) and g.is_terminated()


def test_register_installs_and_removes_the_backend():
    import vllm.v1.structured_output as so_mod
    import vllm.v1.structured_output.backend_xgrammar as xgr_mod

    original = so_mod.XgrammarBackend
    sv.register()
    try:
        assert so_mod.XgrammarBackend is sv.StencilBackend
        validate = xgr_mod.validate_xgrammar_grammar  # what vLLM looks up at request time
        validate(SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"})))
        with pytest.raises(VLLMValidationError, match="json_schema"):
            validate(SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "nonsense"})))
        with pytest.raises(VLLMValidationError, match="regex"):
            validate(SamplingParams(structured_outputs=StructuredOutputsParams(regex="(a")))
        sv.register()  # idempotent
    finally:
        sv.unregister()
    assert so_mod.XgrammarBackend is original


def test_general_plugin_registers_only_when_asked(monkeypatch):
    import vllm.v1.structured_output as so_mod

    original = so_mod.XgrammarBackend
    monkeypatch.delenv("STENCIL_VLLM_BACKEND", raising=False)
    sv.general_plugin()
    assert so_mod.XgrammarBackend is original
    monkeypatch.setenv("STENCIL_VLLM_BACKEND", "1")
    try:
        sv.general_plugin()
        assert so_mod.XgrammarBackend is sv.StencilBackend
    finally:
        sv.unregister()
