"""Sampling benchmark: AWRS against the full-mask path (Stencil's and XGrammar's masks), per token.

For a seeded sample of MaskBench dev records that have valid instances, each instance is replayed
token by token (``json.dumps`` of the instance, encoded by the HF tokenizer, then a stop token).
At every position a **proxy model** supplies the logits, and each sampler draws one token from
them under the grammar. The replay then moves on with the instance's own token, so every sampler
sees the same grammar states.

The proxy model (the logits are log-probabilities):

* ``--top-mass`` (default 0.9) goes to the model's top proposal. That is the instance's next token,
  except with probability ``--invalid-rate`` (default 0.1). Then the proposal is a uniformly drawn
  token that the grammar rejects at this position: it gets two thirds of the top mass, and the
  instance's token the remaining third.
* The rest (``1 - top-mass``) is a Zipf tail over the whole vocabulary: the token of rank ``r`` in a
  seeded random permutation (one per record) gets mass proportional to ``1 / r^--zipf``. Special
  and stop tokens are in the tail too.

Each instance is replayed in separate passes, one per decoder, as a decode loop would run them: at
each position the proxy model writes the logits (a pass over the whole vocabulary, as a real
sampler's input would be), then the decoder does its work, then the instance's token is accepted.
Per token it records:

* **AWRS** (``stencil.decode.awrs.AWRS``, recursive estimator, ``max_rejections=32``): the checks
  it made (``try_token`` calls plus at most one ``is_completed``), whether it fell back to the full
  mask, and the CPU time spent in the constraint (checks, plus the mask when it falls back). The
  same calls are then repeated at once for ``awrs_constraint_hot``. The difference is cache misses:
  the proxy model's pass over the vocabulary (and AWRS's own read of the logits) evicts the
  matcher's data and the interpreter's and numba's code just before the checks. ``awrs_total`` is
  the whole ``sample`` call.
* **Stencil mask path**: the CPU time of ``fill_next_token_bitmask`` (``stencil_mask``), of the same
  fill repeated at once (``stencil_mask_hot``), and of the mask plus ``sample_tokens`` on the
  logits (``stencil_mask_total``). A first, untimed pass fills the masks along the path once, so
  the mask cache's lazy classification of new states is out of the steady-state numbers, just as
  XGrammar does that work at compile time. That pass's fill times are ``stencil_mask_cold``.
* **XGrammar mask** (``xgrammar_mask``): the CPU time of its ``fill_next_token_bitmask``, through
  ``bench/peers.py``. It is compiled with one thread and without its compile cache.

Times are per-thread CPU time (``time.thread_time_ns``), so other load on a shared machine does not
count. Torch runs on one thread.

    python bench/sampling.py --n 40                     # llama3, 40 records, 1 instance each
    python bench/sampling.py --n 40 --invalid-rate 0.3
    python bench/sampling.py --n 10 --no-xgrammar

Writes ``bench/results/sampling-<tokenizer>-invalid<rate>.json`` (settings, commit, summary, per-token rows).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from masks import SHARED, PCTS, load_records  # noqa: E402
from peers import XGrammar, load_hf_tokenizer  # noqa: E402

import stencil as st  # noqa: E402
from stencil.decode.awrs import AWRS  # noqa: E402
from stencil.decode.sampling import sample_tokens  # noqa: E402

class TimedConstraint:
    """A matcher seen through the samplers' constraint protocol, adding up the CPU time of its calls."""

    def __init__(self, matcher):
        self.m = matcher
        self.ns = 0
        self.calls: list[tuple] = []

    def _timed(self, fn, *args):
        self.calls.append((fn, args))
        t0 = time.thread_time_ns()
        out = fn(*args)
        self.ns += time.thread_time_ns() - t0
        return out

    def replay_hot(self) -> int:
        """The same calls again, right away (caches warm): CPU ns. Separates the checks' own cost from
        the cache misses that the sampler's pass over the vocabulary causes them."""
        t0 = time.thread_time_ns()
        for fn, args in self.calls:
            fn(*args)
        return time.thread_time_ns() - t0

    def try_token(self, t: int) -> bool:
        return self._timed(self.m.try_token, t)

    def try_tokens(self, ts) -> np.ndarray:
        return self._timed(self.m.try_tokens, ts)

    def is_completed(self) -> bool:
        return self._timed(self.m.is_completed)

    def fill_next_token_bitmask(self, bitmask, index: int = 0) -> None:
        self._timed(self.m.fill_next_token_bitmask, bitmask, index)

    def accept_token(self, t: int) -> bool:
        return self.m.accept_token(t)

    def fork(self) -> "TimedConstraint":
        return TimedConstraint(self.m.fork())


class ProxyModel:
    """Logits for one record: a Zipf tail over a random permutation, plus the top proposal's mass."""

    def __init__(self, vocab_size: int, rng: np.random.Generator, top_mass: float, zipf: float):
        rank = rng.permutation(vocab_size) + 1
        tail = rank.astype(np.float64) ** -zipf
        self.tail = tail * (1.0 - top_mass) / tail.sum()
        self.top_mass = top_mass

    def logits(self, target: int, invalid: int | None) -> torch.Tensor:
        p = self.tail.copy()
        if invalid is None:
            p[target] += self.top_mass
        else:
            p[invalid] += self.top_mass * 2 / 3
            p[target] += self.top_mass / 3
        return torch.from_numpy(np.log(p)).float()


def invalid_token(m, rng: np.random.Generator, vocab_size: int) -> int:
    """A uniformly drawn token the grammar rejects here (the matcher is only asked, not moved)."""
    while True:
        t = int(rng.integers(vocab_size))
        if not m.try_token(t):
            return t


def percentiles(xs) -> dict:
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    if a.size == 0:
        return {}
    out = {f"p{p:g}": float(np.percentile(a, p)) for p in PCTS}
    out["max"] = float(a.max())
    out["mean"] = float(a.mean())
    out["n"] = int(a.size)
    return out


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return (rev + ("+uncommitted" if dirty else "")) if rev else "unknown (not a git checkout)"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="llama3")
    ap.add_argument("--n", type=int, default=40, help="records to sample (default 40)")
    ap.add_argument("--max-instances", type=int, default=1, help="valid instances replayed per record")
    ap.add_argument("--max-tokens", type=int, default=400, help="tokens replayed per instance at most")
    ap.add_argument("--top-mass", type=float, default=0.9)
    ap.add_argument("--invalid-rate", type=float, default=0.1,
                    help="how often the model's top proposal is a token the grammar rejects")
    ap.add_argument("--zipf", type=float, default=1.1, help="exponent of the Zipf tail")
    ap.add_argument("--max-rejections", type=int, default=32, help="AWRS: rejections before the full mask")
    ap.add_argument("--no-xgrammar", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if not 0.0 < args.top_mass < 1.0 or not 0.0 <= args.invalid_rate <= 1.0:
        ap.error("need 0 < --top-mass < 1 and 0 <= --invalid-rate <= 1")

    torch.set_num_threads(1)
    tok_dir = SHARED / "tokenizers" / args.tokenizer
    meta = json.loads((tok_dir / "meta.json").read_text())
    vocab_size = meta["model_vocab_size"]
    hf = load_hf_tokenizer(tok_dir)
    info = st.TokenizerInfo.from_file(tok_dir, vocab_size=vocab_size)
    stop = info.stop_token_ids[0]
    compiler = st.GrammarCompiler(info, warm_up=False)  # no background thread competing with the timings
    xgr = None
    if not args.no_xgrammar:
        try:
            xgr = XGrammar(tok_dir, vocab_size)
        except ImportError as e:
            print(f"xgrammar unavailable: {e}", file=sys.stderr)
    records = load_records(args.n, args.seed)
    rng = np.random.default_rng(args.seed)
    sampler = AWRS(eos_ids=info.stop_token_ids, vocab_size=vocab_size, max_rejections=args.max_rejections,
                   seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    bitmask = st.allocate_token_bitmask(1, vocab_size)
    xgr_bitmask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)

    cols = ("record", "pos", "invalid_top", "checks", "fallback", "awrs_constraint_us", "awrs_constraint_hot_us",
            "awrs_total_us", "stencil_mask_us", "stencil_mask_hot_us", "stencil_mask_total_us",
            "stencil_mask_cold_us", "xgrammar_mask_us")
    rows: list[tuple] = []
    failures: dict[str, int] = {}

    def fail(kind: str) -> None:
        failures[kind] = failures.get(kind, 0) + 1

    t_start = time.time()
    for i, rec in enumerate(records):
        try:
            cg = compiler.compile_json_schema(rec["schema"])
        except st.StencilError as e:
            fail(type(e).__name__)
            continue
        model = ProxyModel(vocab_size, rng, args.top_mass, args.zipf)
        for inst in rec["instances"][: args.max_instances]:
            ids = hf.encode(json.dumps(inst), add_special_tokens=False)[: args.max_tokens]
            ids = ids + [stop] if len(ids) < args.max_tokens else ids

            # Pass 0 (untimed but for the first masks): where the model proposes an invalid token,
            # and Stencil's masks on first visit (lazy classification of new states).
            m = st.GrammarMatcher(cg)
            invalid: list[int | None] = []
            cold: list[float] = []
            for t in ids:
                t0 = time.thread_time_ns()
                m.fill_next_token_bitmask(bitmask, 0)
                cold.append((time.thread_time_ns() - t0) / 1e3)
                bad = invalid_token(m, rng, info.tokenizer_size) if rng.random() < args.invalid_rate else None
                invalid.append(bad)
                if not m.accept_token(t):
                    fail("stencil_rejected_instance")
                    break
            n = len(invalid)

            # Each decoder runs in its own pass, as it would in a decode loop: the proxy model makes
            # the logits (touching the whole vocabulary, as a real sampler does), then the sampler.
            awrs = []
            m = st.GrammarMatcher(cg)
            for pos in range(n):
                logits = model.logits(ids[pos], invalid[pos])
                timed = TimedConstraint(m)
                t0 = time.thread_time_ns()
                r = sampler.sample(logits, timed)
                total = (time.thread_time_ns() - t0) / 1e3
                awrs.append((r.checks, r.fallback, timed.ns / 1e3, timed.replay_hot() / 1e3, total))
                m.accept_token(ids[pos])

            masks = []
            m = st.GrammarMatcher(cg)
            for pos in range(n):
                logits = model.logits(ids[pos], invalid[pos])
                t0 = time.thread_time_ns()
                m.fill_next_token_bitmask(bitmask, 0)
                t1 = time.thread_time_ns()
                m.fill_next_token_bitmask(bitmask, 0)
                t2 = time.thread_time_ns()
                sample_tokens(logits, bitmask=bitmask[0], generator=gen)
                t3 = time.thread_time_ns()
                masks.append(((t1 - t0) / 1e3, (t2 - t1) / 1e3, (t1 - t0 + t3 - t2) / 1e3))
                m.accept_token(ids[pos])

            xgrammar: list[float | None] = [None] * n
            if xgr is not None:
                try:
                    xm = xgr.compile_json_schema(rec["schema"])
                except Exception:  # XGrammar cannot compile this schema: time Stencil only
                    fail("xgrammar_compile")
                    xm = None
                for pos in range(n if xm is not None else 0):
                    model.logits(ids[pos], invalid[pos])
                    t0 = time.thread_time_ns()
                    xgr.fill(xm, xgr_bitmask)
                    xgrammar[pos] = (time.thread_time_ns() - t0) / 1e3
                    if not xgr.accept(xm, ids[pos]):
                        fail("xgrammar_rejected_instance")
                        break

            for pos in range(n):
                rows.append((rec["id"], pos, invalid[pos] is not None, *awrs[pos], *masks[pos], cold[pos],
                             xgrammar[pos]))
        done = i + 1
        eta = (time.time() - t_start) / done * (len(records) - done)
        print(f"\r[{done}/{len(records)}] {len(rows)} tokens, eta {eta:5.0f}s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    data = {c: [row[k] for row in rows] for k, c in enumerate(cols)}
    summary = {c: percentiles(data[c]) for c in cols[3:]}
    checks = np.asarray(data["checks"], dtype=np.float64)
    summary["fallback_rate"] = float(np.mean(data["fallback"])) if rows else math.nan
    summary["invalid_top_rate"] = float(np.mean(data["invalid_top"])) if rows else math.nan
    def p50_ratio(a: str, b: str) -> float:
        return summary[a].get("p50", math.nan) / summary[b].get("p50", math.nan) if rows else math.nan

    summary["targets"] = {
        "median_checks": float(np.median(checks)) if rows else math.nan,
        "median_checks<=2": bool(np.median(checks) <= 2) if rows else False,
        "awrs_constraint/stencil_mask at p50": p50_ratio("awrs_constraint_us", "stencil_mask_us"),
        "awrs_constraint_hot/stencil_mask_hot at p50": p50_ratio("awrs_constraint_hot_us", "stencil_mask_hot_us"),
    }

    commit = git_commit()
    print(f"\n{len(records)} records, {len(rows)} tokens, tokenizer {args.tokenizer} (vocab {vocab_size}), "
          f"top mass {args.top_mass}, invalid rate {args.invalid_rate}, commit {commit}")
    print(f"checks per token: median {np.median(checks):.0f}, mean {checks.mean():.2f}, "
          f"p99 {np.percentile(checks, 99):.0f}, max {checks.max():.0f}; fallback rate {summary['fallback_rate']:.4f}")
    header = f"{'CPU µs per token':<24} {'p50':>9} {'p90':>9} {'p99':>9} {'p99.9':>9} {'max':>10} {'mean':>9}"
    print(header)
    print("-" * len(header))
    for c in cols[5:]:
        s = summary[c]
        if s:
            print(f"{c:<24} {s['p50']:9.1f} {s['p90']:9.1f} {s['p99']:9.1f} {s['p99.9']:9.1f} {s['max']:10.1f} "
                  f"{s['mean']:9.1f}")
    print(f"targets: {summary['targets']}")
    if failures:
        print(f"failures: {failures}")

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"sampling-{args.tokenizer}-invalid{args.invalid_rate:g}.json"
    # Per-token columns, times rounded to 0.1 µs; "record" indexes "records".
    ids = list(dict.fromkeys(data["record"]))
    index = {r: k for k, r in enumerate(ids)}
    data["record"] = [index[r] for r in data["record"]]
    columns = {c: [round(x, 1) if isinstance(x, float) else x for x in v] for c, v in data.items()}
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "commit": commit,
                               "summary": summary, "failures": failures, "records": ids, "tokens": columns}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
