"""Mask step cost by kind: steps whose cache entries all exist, and steps that classified new states.

Replays one valid instance of each of a sample of MaskBench dev records (the sampling of
``bench/masks.py``) in-process and measures each step's thread CPU time (accept + fill, as the
benchmark times them). Steps are split into those that reuse every cache entry, those that only
registered a state under an existing key combination, and those that classified states, by the
largest number of trie nodes a classification walk visited.

``--eager-ms B`` spends B ms after each compile classifying the grammar's states in BFS order from
the root (as the background warm-up would) before the first fill, and reports what that does to
the time to first mask (wall: compile, eager work, first fill) and to the share of cheap steps.

    python bench/mask_steps.py --n 30
    python bench/mask_steps.py --n 30 --eager-ms 4
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from masks import load_records  # noqa: E402
from peers import load_hf_tokenizer  # noqa: E402
import replay  # noqa: E402

import stencil as st  # noqa: E402
from stencil.errors import StencilError  # noqa: E402


def main() -> None:
    ap = replay.arguments(__doc__)
    ap.add_argument("--eager-ms", type=float, default=0.0,
                    help="ms of BFS-order classification after each compile, before the first fill (default 0)")
    args = ap.parse_args()
    if args.eager_ms < 0:
        ap.error(f"--eager-ms must be 0 or more, not {args.eager_ms:g}")

    tok_dir = replay.tokenizer_dir(ap, args)
    hf = load_hf_tokenizer(tok_dir)
    info = st.TokenizerInfo.from_file(tok_dir)
    compiler = st.GrammarCompiler(info, warm_up=False)
    bitmask = st.allocate_token_bitmask(1, info.vocab_size)
    rows = []  # (cpu s, states registered, states classified, walk s, most nodes visited, nodes visited)
    first, eager = [], []  # time to first mask (s), states classified eagerly, per schema
    records = load_records(args.n, args.seed)
    for i, rec in enumerate(records):
        print(f"\r[{i + 1}/{len(records)}]", end="", file=sys.stderr, flush=True)
        ids = replay.first_instance_ids(hf, rec)
        t0 = time.perf_counter()
        try:
            cg = compiler.compile_json_schema(rec["schema"])
        except StencilError:
            continue
        cache = cg.mask_cache
        k = 0
        if args.eager_ms:
            deadline = time.perf_counter() + args.eager_ms / 1e3
            for s in cache.lookup_states().tolist():
                if time.perf_counter() >= deadline:
                    break
                cache.ensure((s,))
                k += 1
        m = st.GrammarMatcher(cg)
        m.fill_next_token_bitmask(bitmask, 0)
        first.append(time.perf_counter() - t0)
        eager.append(k)
        for t in ids:
            before = dict(cache.computed)
            n_before = cache.n_computed
            c0 = time.thread_time()
            ok = m.accept_token(t)
            m.fill_next_token_bitmask(bitmask, 0)
            c1 = time.thread_time()
            new = [v for s, v in cache.computed.items() if s not in before]
            rows.append((c1 - c0, cache.n_computed - n_before, len(new), sum(v[0] for v in new),
                         max([v[1] for v in new] or [0]), sum(v[1] for v in new)))
            if not ok:
                break
    print(file=sys.stderr)
    a = np.array(rows)
    cpu = a[:, 0] * 1e3
    print(f"{len(a)} steps, CPU ms: p50 {np.percentile(cpu, 50):.4f}  p90 {np.percentile(cpu, 90):.3f}  "
          f"p99 {np.percentile(cpu, 99):.3f}  max {cpu.max():.2f}; under 15 µs: {np.mean(cpu < 0.015):.1%}")
    print(f"states classified {int(a[:, 2].sum())}, trie nodes walked {int(a[:, 5].sum())}; "
          f"steps classifying two or more states: {int((a[:, 2] >= 2).sum())}")
    ttfm = np.array(first) * 1e3
    print(f"time to first mask, ms: p50 {np.median(ttfm):.2f}  p90 {np.percentile(ttfm, 90):.1f}" +
          (f"; states classified eagerly per schema: p50 {np.median(eager):.0f}" if args.eager_ms else ""))
    kinds = [("every entry reused", a[:, 1] == 0),
             ("registered under an existing key combination", (a[:, 1] > 0) & (a[:, 2] == 0))]
    for lo, hi in ((0, 1000), (1000, 3000), (3000, 20000), (20000, None)):
        sel = (a[:, 2] > 0) & (a[:, 4] >= lo) & (a[:, 4] < (hi or np.inf))
        kinds.append((f"classified, walk visited {lo}-{hi or ''} trie nodes", sel))
    for name, sel in kinds:
        if sel.any():
            p = np.percentile(cpu[sel], [25, 50, 75, 90])
            print(f"  {name}: {sel.sum()} steps, p25/p50/p75/p90 " + " / ".join(f"{x:.4f}" for x in p))


if __name__ == "__main__":
    main()
