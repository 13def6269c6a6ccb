"""Mask steps with the background warm-up on and idle time between schemas.

``bench/masks.py`` runs each engine in its own process, one schema after another, so while the
other engines take their turns Stencil's background worker warms the grammars it has seen. This
replays the same records in one process, Stencil only, with the worker on (the compiler's
default) and ``--gap-s`` seconds of idle time after each schema, to see whether that warm-up
disturbs the next schema's compile and steps. Wall time per accept + fill, and per first mask.

    python bench/mask_gaps.py --n 30 --gap-s 1.5
"""

from __future__ import annotations

import json
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


def main() -> None:
    ap = replay.arguments(__doc__)
    ap.add_argument("--gap-s", type=float, default=1.5, help="idle seconds after each schema")
    args = ap.parse_args()
    if args.gap_s < 0:
        ap.error(f"--gap-s must be 0 or more, not {args.gap_s:g}")

    tok_dir = replay.tokenizer_dir(ap, args)
    vocab_size = json.loads((tok_dir / "meta.json").read_text())["model_vocab_size"]
    hf = load_hf_tokenizer(tok_dir)
    info = st.TokenizerInfo.from_file(tok_dir, vocab_size=vocab_size)
    compiler = st.GrammarCompiler(info)
    bitmask = st.allocate_token_bitmask(1, vocab_size)
    steps, first = [], []
    records = load_records(args.n, args.seed)
    for i, rec in enumerate(records):
        print(f"\r[{i + 1}/{len(records)}]", end="", file=sys.stderr, flush=True)
        ids = replay.first_instance_ids(hf, rec) + [info.stop_token_ids[0]]
        t0 = time.perf_counter()
        try:
            m = st.GrammarMatcher(compiler.compile_json_schema(rec["schema"]))
        except st.StencilError:
            continue
        m.fill_next_token_bitmask(bitmask, 0)
        first.append(time.perf_counter() - t0)
        for t in ids:
            t1 = time.perf_counter()
            ok = m.accept_token(t)
            m.fill_next_token_bitmask(bitmask, 0)
            steps.append(time.perf_counter() - t1)
            if not ok:
                break
        time.sleep(args.gap_s)
    print(file=sys.stderr)
    ms = np.array(steps) * 1e3
    print(f"{len(ms)} steps, ms: p50 {np.percentile(ms, 50):.3f}  p99 {np.percentile(ms, 99):.3f}  "
          f"max {ms.max():.1f}  over 5 ms: {(ms > 5).sum()}; first mask p50 {np.percentile(first, 50) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
