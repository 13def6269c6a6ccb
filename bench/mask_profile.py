"""Where Stencil's mask time goes: replay MaskBench instances in-process and break each step down.

For a sample of dev records (the same sampling as ``bench/masks.py``), compile each schema, then
replay its valid instance token by token (accept + fill, as the benchmark times them) and report
per-step wall and CPU time, how many states were classified in the step, and the slowest steps with
the states that were classified there (rule, walk length, DFA/Earley time).

    python bench/mask_profile.py --n 30                # llama3
    python bench/mask_profile.py --n 30 --no-warm-up   # without the background worker
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from masks import load_records  # noqa: E402
from peers import load_hf_tokenizer  # noqa: E402
import replay  # noqa: E402

import stencil as st  # noqa: E402
from stencil.errors import StencilError  # noqa: E402


def main() -> None:
    ap = replay.arguments(__doc__)
    ap.add_argument("--no-warm-up", action="store_true")
    ap.add_argument("--slowest", type=int, default=15)
    args = ap.parse_args()

    tok_dir = replay.tokenizer_dir(ap, args)
    hf = load_hf_tokenizer(tok_dir)
    info = st.TokenizerInfo.from_file(tok_dir)
    compiler = st.GrammarCompiler(info, warm_up=not args.no_warm_up)
    bitmask = st.allocate_token_bitmask(1, info.vocab_size)
    steps = []  # (wall, cpu, classified, schema id, step, classified-state details)
    ttfm = []
    for rec in load_records(args.n, args.seed):
        ids = replay.first_instance_ids(hf, rec)
        t0 = time.perf_counter()
        try:
            cg = compiler.compile_json_schema(rec["schema"])
        except StencilError:
            continue
        t1 = time.perf_counter()
        m = st.GrammarMatcher(cg)
        m.fill_next_token_bitmask(bitmask, 0)
        ttfm.append((time.perf_counter() - t0, t1 - t0))
        if ttfm[-1][0] > 1.0:
            print(f"{rec['id']}: time to first mask {ttfm[-1][0]:.2f} s (compile {ttfm[-1][1]:.2f} s)")
        cache = cg.mask_cache
        for k, t in enumerate(ids):
            before = dict(cache.computed)
            w0, c0 = time.perf_counter(), time.thread_time()
            ok = m.accept_token(t)
            m.fill_next_token_bitmask(bitmask, 0)
            w1, c1 = time.perf_counter(), time.thread_time()
            new = {s: v for s, v in cache.computed.items() if s not in before}
            steps.append((w1 - w0, c1 - c0, len(new), rec["id"], k, new, cache))
            if not ok:
                print(f"{rec['id']}: token {k} rejected")
                break
    walls = np.array([s[0] for s in steps]) * 1e3
    cpus = np.array([s[1] for s in steps]) * 1e3
    print(f"{len(steps)} steps over {len(ttfm)} schemas (ms)")
    for name, xs in (("wall", walls), ("cpu", cpus)):
        print(f"  {name}: p50 {np.percentile(xs, 50):.3f}  p90 {np.percentile(xs, 90):.3f}  "
              f"p99 {np.percentile(xs, 99):.3f}  max {xs.max():.3f}")
    cold = np.array([s[2] > 0 for s in steps])
    print(f"  steps that classified states: {cold.sum()}  (cpu p50 of the rest {np.percentile(cpus[~cold], 50):.3f})")
    tt = np.array(ttfm) * 1e3
    print(f"  TTFM p50 {np.percentile(tt[:, 0], 50):.1f}  (compile p50 {np.percentile(tt[:, 1], 50):.1f})  "
          f"max {tt[:, 0].max():.1f}")
    print("slowest steps:")
    for wall, cpu, n_new, rid, k, new, cache in sorted(steps, key=lambda s: -s[1])[: args.slowest]:
        g = cache.grammar
        parts = [f"{g.rule_names[g.state_rule[s]]}.{s}:{v[0] * 1e3:.1f}ms/{v[1]}n" for s, v in new.items()]
        print(f"  {cpu * 1e3:8.2f} cpu {wall * 1e3:8.2f} wall  {rid} step {k}: {', '.join(parts)}")


if __name__ == "__main__":
    main()
