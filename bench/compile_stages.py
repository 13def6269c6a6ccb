"""Where Stencil's time to first mask goes, per stage, over the mask benchmark's schemas.

For each schema of ``bench/masks.py``'s sample (same records, same seed): the JSON Schema frontend
(schema -> IR expressions), the IR build (rule automata -> flat arrays, timed inside the frontend's
call), the productive-root check, binding to the llama3 vocabulary, the mask cache's setup, and the
matcher plus its first mask fill. Times are this thread's CPU time (``time.thread_time_ns``), which a
loaded machine disturbs far less than wall time. Each schema's compile is timed ``--reps`` times
(the process-wide rule-automaton cache cleared before each pass, so every pass compiles the sample
in order as the benchmark does) and the fastest pass is kept; the first fill is the first pass's,
since later passes find the shared mask store warm.

    python bench/compile_stages.py --n 30 --reps 3
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from masks import load_records  # noqa: E402
import replay  # noqa: E402

import stencil as st  # noqa: E402
from stencil.grammar import ir, json_schema  # noqa: E402
from stencil.grammar.compiler import bind  # noqa: E402

STAGES = ("frontend (schema -> IR)", "IR build (automata, arrays)", "productive check", "bind", "mask cache setup",
          "matcher + first fill", "time to first mask")


def main() -> None:
    ap = replay.arguments(__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the per-schema numbers as JSON")
    args = ap.parse_args()

    tok_dir = replay.tokenizer_dir(ap, args)
    meta = json.loads((tok_dir / "meta.json").read_text())
    info = st.TokenizerInfo.from_file(tok_dir, vocab_size=meta["model_vocab_size"])
    records = load_records(args.n, args.seed)
    clock = time.thread_time_ns
    inner: dict[str, int] = {}

    def timed(name, f):
        def wrapper(*a, **k):
            t = clock()
            try:
                return f(*a, **k)
            finally:
                inner[name] = inner.get(name, 0) + clock() - t
        return wrapper

    ir.GrammarBuilder.build = timed("build", ir.GrammarBuilder.build)
    json_schema.derivable_rules = timed("productive", json_schema.derivable_rules)
    bitmask = st.allocate_token_bitmask(1, info.vocab_size)
    st.GrammarMatcher(bind(json_schema.json_schema_to_grammar({"type": "object"}), info)).fill_next_token_bitmask(bitmask)

    best: dict[str, dict[str, float]] = {}
    first_fill: dict[str, float] = {}
    for rep in range(args.reps):
        ir._BODY_CACHE.clear()
        for rec in records:
            inner.clear()
            t0 = clock()
            try:
                g = json_schema.json_schema_to_grammar(rec["schema"])
            except st.StencilError:
                continue
            t1 = clock()
            cg = bind(g, info)
            t2 = clock()
            cg.mask_cache  # noqa: B018 - builds the cache
            t3 = clock()
            st.GrammarMatcher(cg).fill_next_token_bitmask(bitmask)
            t4 = clock()
            if rep == 0:
                first_fill[rec["id"]] = (t4 - t3) / 1e6
            row = {STAGES[0]: (t1 - t0 - inner.get("build", 0) - inner.get("productive", 0)) / 1e6,
                   STAGES[1]: inner.get("build", 0) / 1e6, STAGES[2]: inner.get("productive", 0) / 1e6,
                   STAGES[3]: (t2 - t1) / 1e6, STAGES[4]: (t3 - t2) / 1e6, STAGES[5]: first_fill[rec["id"]]}
            row[STAGES[6]] = sum(row.values())
            if rec["id"] not in best or row[STAGES[6]] < best[rec["id"]][STAGES[6]]:
                best[rec["id"]] = row

    print(f"{len(best)} schemas compiled, tokenizer {args.tokenizer}, thread CPU ms (fastest of {args.reps} passes)")
    print(f"| stage | p50 | p90 | max |\n|---|---:|---:|---:|")
    for s in STAGES:
        a = np.array([row[s] for row in best.values()])
        print(f"| {s} | {np.percentile(a, 50):.2f} | {np.percentile(a, 90):.2f} | {a.max():.2f} |")
    if args.out:
        args.out.write_text(json.dumps(best))


if __name__ == "__main__":
    main()
