"""Walk cost per state: every classification the MaskBench replay makes, run again on its own.

Replays one valid instance of each of a sample of MaskBench dev records (the sampling of
``bench/masks.py``), recording every call of ``classify_state`` (the walk of a state's bands,
with its donor if it had one). Then runs each call again ``--repeats`` times and reports the
least thread CPU per call, by kind (with a donor; walks of fewer than 1000, 1000-3000 and more
trie nodes), and a fingerprint of every band entry the calls produce.

Two trees that classify alike print the same fingerprint: a change to the walk or the packing that
should not change any entry is checked on thousands of real states (the oracle tests check
correctness; this checks "unchanged"). The CPU numbers leave out first-visit effects (horizon
classes computed on first use, cold caches) that ``bench/mask_steps.py`` includes.

    python bench/classify_cost.py --n 30
"""

from __future__ import annotations

import hashlib
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
import stencil.grammar.masks as stencil_masks  # noqa: E402
from stencil.errors import StencilError  # noqa: E402


def main() -> None:
    ap = replay.arguments(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, not {args.repeats}")
    tok_dir = replay.tokenizer_dir(ap, args)

    calls = []  # (args, keyword args, trie nodes visited)
    classify = stencil_masks.classify_state

    def recording(*a, **kw):
        a = (*a[:4], list(a[4]), *a[5:])  # the bands may be an iterator
        out = classify(*a, **kw)
        calls.append((a, kw, sum(e.visited for e in out)))
        return out

    hf = load_hf_tokenizer(tok_dir)
    info = st.TokenizerInfo.from_file(tok_dir)
    compiler = st.GrammarCompiler(info, warm_up=False)  # its kernel preload classifies too: not recorded
    bitmask = st.allocate_token_bitmask(1, info.vocab_size)
    stencil_masks.classify_state = recording
    records = load_records(args.n, args.seed)
    try:
        for i, rec in enumerate(records):
            print(f"\rreplay [{i + 1}/{len(records)}]", end="", file=sys.stderr, flush=True)
            try:
                m = st.GrammarMatcher(compiler.compile_json_schema(rec["schema"]))
            except StencilError:
                continue
            m.fill_next_token_bitmask(bitmask, 0)
            for t in replay.first_instance_ids(hf, rec):
                if not m.accept_token(t):
                    break
                m.fill_next_token_bitmask(bitmask, 0)
    finally:
        stencil_masks.classify_state = classify
    print(file=sys.stderr)

    digest = hashlib.sha1()
    kinds: dict[str, list[float]] = {}
    for k, (a, kw, visited) in enumerate(calls):
        print(f"\rrerun [{k + 1}/{len(calls)}]", end="", file=sys.stderr, flush=True)
        best = float("inf")
        for _ in range(args.repeats):
            c0 = time.thread_time()
            out = classify(*a, **kw)
            best = min(best, time.thread_time() - c0)
        for e in out:
            digest.update(np.array([e.acc_mode, e.n_accepted], np.int64).tobytes())
            for arr in (e.acc, e.rec_node, e.rec_ae_ptr, e.rec_ae):
                digest.update(arr.tobytes())
        kind = ("with a donor" if kw.get("donor") is not None else
                "< 1000 nodes" if visited < 1000 else "1000-3000 nodes" if visited < 3000 else "> 3000 nodes")
        kinds.setdefault(kind, []).append(best * 1e3)
    print(file=sys.stderr)
    every = np.concatenate([np.array(v) for v in kinds.values()])
    print(f"{len(calls)} classifications, CPU ms (least of {args.repeats}): total {every.sum():.1f}  "
          f"p50 {np.percentile(every, 50):.4f}  p90 {np.percentile(every, 90):.3f}  "
          f"p99 {np.percentile(every, 99):.3f}")
    for kind, v in kinds.items():
        print(f"  {kind}: {len(v)} calls, total {sum(v):.1f}, p50 {np.percentile(v, 50):.4f}, "
              f"p90 {np.percentile(v, 90):.3f}")
    print(f"entries fingerprint {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
