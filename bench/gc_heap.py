"""What the garbage collector walks in a Stencil process, and what a full collection costs there.

Makes a compiler (llama3), then replays one valid instance of each of a sample of MaskBench dev
records (the sampling of ``bench/masks.py``) in-process, token by token, as the benchmark does.
Prints the objects the collector tracks after start-up, the full (generation 2) collections during
the replay with their durations, and the tracked objects the replay left alive, by type.

    python bench/gc_heap.py --n 90
    python bench/gc_heap.py --n 90 --freeze-gc    # gc.freeze() after start-up, as vLLM's engine does
"""

from __future__ import annotations

import collections
import gc
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from masks import FullCollections, load_records  # noqa: E402
from peers import load_hf_tokenizer  # noqa: E402
import replay  # noqa: E402

import stencil as st  # noqa: E402
from stencil.errors import StencilError  # noqa: E402


def main() -> None:
    ap = replay.arguments(__doc__, n=90)
    ap.add_argument("--freeze-gc", action="store_true", help="gc.collect(); gc.freeze() after start-up")
    args = ap.parse_args()
    tok_dir = replay.tokenizer_dir(ap, args)
    hf = load_hf_tokenizer(tok_dir)
    info = st.TokenizerInfo.from_file(tok_dir)
    compiler = st.GrammarCompiler(info, warm_up=False)
    bitmask = st.allocate_token_bitmask(1, info.vocab_size)
    gc.collect()
    start = {id(o) for o in gc.get_objects()}
    print(f"tracked objects after start-up: {len(start)}")
    if args.freeze_gc:
        gc.freeze()
    collections_ = FullCollections()
    records = load_records(args.n, args.seed)
    for i, rec in enumerate(records):
        print(f"\r[{i + 1}/{len(records)}]", end="", file=sys.stderr, flush=True)
        ids = replay.first_instance_ids(hf, rec)
        try:
            m = st.GrammarMatcher(compiler.compile_json_schema(rec["schema"]))
        except StencilError:
            continue
        m.fill_next_token_bitmask(bitmask, 0)
        for t in ids:
            if not m.accept_token(t):
                break
            m.fill_next_token_bitmask(bitmask, 0)
    print(file=sys.stderr)
    pauses = ", ".join(f"{p * 1e3:.1f}" for p in collections_.pauses)
    print(f"full collections during the replay of {len(records)} schemas: {len(collections_.pauses)} ({pauses} ms)")
    del m
    gc.collect()
    left = [o for o in gc.get_objects() if id(o) not in start]
    kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in left)
    print(f"tracked objects the replay left alive: {len(left)}; by type:")
    for name, n in kinds.most_common(12):
        print(f"  {n:7d}  {name}")


if __name__ == "__main__":
    main()
