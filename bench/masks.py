"""Token-mask benchmark: Stencil, XGrammar, llguidance and outlines-core on the same schemas and tokens.

For each JSON Schema of a fixed sample of MaskBench dev records that have valid instances, each
engine compiles the schema and fills its first mask (time to first mask), then replays every valid
instance token by token (the same token ids for every engine: ``json.dumps`` of the instance, encoded
by the HF tokenizer), timing each mask fill plus accept. Each engine runs in its own worker process
with a per-schema timeout, so one slow or crashing engine cannot stall the run; peak memory is that
process's maximum RSS.

    pip install -r bench/requirements.txt
    python bench/masks.py                       # 500 records, llama3
    python bench/masks.py --n 50 --engines stencil,xgrammar
    python bench/masks.py --all --tokenizer qwen2
    python bench/masks.py --n 30 --model-ms 20      # 20 ms of simulated forward pass between steps

By default the steps run back to back, which leaves no time for work an engine does between masks
(Stencil's background warm-up). ``--model-ms`` sleeps that long after the first mask and after each
step, untimed and for every engine alike, as a decode loop waits for the model's forward pass.

After the table it prints each engine's full garbage collections (count, longest, how many timed steps
ran one): such a collection holds the GIL throughout, so it shows in a step's time. ``--freeze-gc``
freezes each engine's heap once the engine has loaded (``gc.collect(); gc.freeze()``), as vLLM's
engine does after start-up: the collector then no longer walks the objects made by importing torch
and the engines. ``--no-warm-up`` turns off Stencil's background warm-up thread, which otherwise works
on the schemas' remaining states while the other engines take their turns.

Writes ``bench/results/masks-<tokenizer>.json`` (raw numbers) and ``masks-<tokenizer>-cdf.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers import ENGINES, load_hf_tokenizer, make_adapter, new_bitmask  # noqa: E402

SHARED = HERE.parent.parent / "shared"
PCTS = (50, 90, 99, 99.9)


def load_records(n: int | None, seed: int) -> list[dict]:
    recs = []
    for f in sorted((SHARED / "jsonschemabench" / "dev").glob("*.jsonl")):
        for line in f.open():
            r = json.loads(line)
            valid = [t["data"] for t in r.get("tests", []) if t.get("valid")]
            if valid:
                recs.append({"id": r["id"], "schema": r["schema"], "instances": valid})
    if n is not None and n < len(recs):
        recs = random.Random(seed).sample(recs, n)
    return recs


class FullCollections:
    """The garbage collector's full (generation 2) collections in this process: when each ran and for how long.

    A full collection holds the GIL for as long as it takes to traverse every tracked object (a few
    hundred thousand once torch is imported), so one that lands inside a step shows in the tail.
    """

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                self._start = time.perf_counter()
            else:
                self.pauses.append(time.perf_counter() - self._start)


def worker(engine: str, tok_dir: str, vocab_size: int, opts: dict, conn) -> None:
    """Serve (schema, token lists) jobs for one engine until told to stop. ``opts``: ``model_s``, the
    untimed pause per step; ``freeze_gc``, move every object alive after loading out of the collector's
    reach first; ``warm_up``, Stencil's background warm-up on or off."""
    model_s = opts["model_s"]
    try:
        adapter = make_adapter(engine, Path(tok_dir), vocab_size, warm_up=opts["warm_up"])
    except Exception as e:  # the engine is not installed or cannot load this tokenizer
        conn.send({"fatal": f"{type(e).__name__}: {e}"})
        return
    if opts["freeze_gc"]:  # what vLLM's engine does once it has started (vllm.utils.gc_utils.freeze_gc_heap)
        gc.collect()
        gc.freeze()
    conn.send({"ready": True})
    bitmask = new_bitmask(vocab_size)
    collections = FullCollections()
    while True:
        job = conn.recv()
        if job is None:
            return
        out: dict = {"mask_s": [], "rejected": 0, "error": None, "gc_steps": 0}
        n_gc = len(collections.pauses)
        try:
            t0 = time.perf_counter()
            m = adapter.compile_json_schema(job["schema"])
            adapter.fill(m, bitmask)
            out["ttfm_s"] = time.perf_counter() - t0
            for k, ids in enumerate(job["instances"]):
                if k:
                    m = adapter.compile_json_schema(job["schema"])  # warm: compile caches may answer
                    adapter.fill(m, bitmask)
                if model_s:
                    time.sleep(model_s)  # the forward pass that the first mask goes with, as every later one
                for t in ids:
                    before = len(collections.pauses)
                    t1 = time.perf_counter()
                    ok = adapter.accept(m, t)
                    adapter.fill(m, bitmask)
                    out["mask_s"].append(time.perf_counter() - t1)
                    out["gc_steps"] += len(collections.pauses) > before
                    if model_s:
                        time.sleep(model_s)
                    if not ok:
                        out["rejected"] += 1
                        break
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out["gc_s"] = collections.pauses[n_gc:]
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send(out)


class Engine:
    """A worker process for one engine, restarted after a timeout or crash."""

    def __init__(self, name: str, tok_dir: Path, vocab_size: int, opts: dict):
        self.name, self.tok_dir, self.vocab_size, self.opts = name, tok_dir, vocab_size, opts
        self.fatal = None
        self.peak_rss_mb = 0.0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(self.name, str(self.tok_dir), self.vocab_size, self.opts, child),
                                daemon=True)
        self.proc.start()
        if not self.conn.poll(300):
            self.fatal = "worker did not start in 300 s"
            return
        msg = self.conn.recv()
        self.fatal = msg.get("fatal")

    def run(self, job: dict, timeout: float) -> dict:
        self.conn.send(job)
        if self.conn.poll(timeout):
            try:
                out = self.conn.recv()
                self.peak_rss_mb = max(self.peak_rss_mb, out.get("rss_mb", 0.0))
                return out
            except EOFError:
                pass
            status = "crash"
        else:
            status = "timeout"
        self.proc.kill()
        self.proc.join()
        self._start()
        return {"error": status, "mask_s": [], "rejected": 0, "gc_s": [], "gc_steps": 0}

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    a = np.asarray(xs) * 1e3
    out = {f"p{p:g}": float(np.percentile(a, p)) for p in PCTS}
    out["max"] = float(a.max())
    out["n"] = len(xs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="llama3")
    ap.add_argument("--n", type=int, default=500, help="records to sample (default 500)")
    ap.add_argument("--all", action="store_true", help="every record with valid instances")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per schema and engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-instances", type=int, default=2, help="valid instances replayed per schema")
    ap.add_argument("--model-ms", type=float, default=0.0,
                    help="untimed pause after the first mask and each step, as a model's forward pass "
                         "(default 0: back to back)")
    ap.add_argument("--freeze-gc", action="store_true",
                    help="in every engine's process, gc.freeze() once the engine has loaded, as vLLM's engine does")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="turn off Stencil's background mask warm-up (it then computes every state on first visit)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if args.model_ms < 0:
        ap.error(f"--model-ms must be 0 or more, not {args.model_ms:g}")

    tok_dir = SHARED / "tokenizers" / args.tokenizer
    meta = json.loads((tok_dir / "meta.json").read_text())
    vocab_size = meta["model_vocab_size"]
    hf = load_hf_tokenizer(tok_dir)
    records = load_records(None if args.all else args.n, args.seed)
    for r in records:
        r["token_ids"] = [hf.encode(json.dumps(x), add_special_tokens=False) for x in r["instances"][: args.max_instances]]

    names = [e for e in args.engines.split(",") if e]
    engines = {}
    for name in names:
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        opts = {"model_s": args.model_ms / 1e3, "freeze_gc": args.freeze_gc, "warm_up": not args.no_warm_up}
        engines[name] = Engine(name, tok_dir, vocab_size, opts)
        if engines[name].fatal:
            print(f"  {name} unavailable: {engines[name].fatal}", file=sys.stderr)

    results = {n: {"ttfm_s": [], "mask_s": [], "failures": {}, "per_schema": [], "gc_s": [], "gc_steps": 0}
               for n in names}
    t_start = time.time()
    for i, rec in enumerate(records):
        job = {"schema": rec["schema"], "instances": rec["token_ids"]}
        for name, eng in engines.items():
            if eng.fatal:
                continue
            out = eng.run(job, args.timeout)
            res = results[name]
            res["mask_s"].extend(out["mask_s"])
            res["gc_s"].extend(out["gc_s"])
            res["gc_steps"] += out["gc_steps"]
            if "ttfm_s" in out:
                res["ttfm_s"].append(out["ttfm_s"])
            kind = None
            if out["error"] in ("timeout", "crash"):
                kind = out["error"]
            elif out["error"]:
                kind = "compile_error" if "ttfm_s" not in out else "error"
            elif out["rejected"]:
                kind = "valid_rejected"
            if kind:
                res["failures"][kind] = res["failures"].get(kind, 0) + 1
            res["per_schema"].append({"id": rec["id"], "failure": kind, "detail": out["error"],
                                      "ttfm_s": out.get("ttfm_s"), "n_masks": len(out["mask_s"])})
        done = i + 1
        eta = (time.time() - t_start) / done * (len(records) - done)
        print(f"\r[{done}/{len(records)}] eta {eta:5.0f}s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for eng in engines.values():
        eng.close()

    summary = {}
    for name in names:
        if engines[name].fatal:
            summary[name] = {"unavailable": engines[name].fatal}
            continue
        r = results[name]
        summary[name] = {
            "mask_ms": percentiles(r["mask_s"]),
            "ttfm_ms": percentiles(r["ttfm_s"]),
            "peak_rss_mb": engines[name].peak_rss_mb,
            "failures": r["failures"],
            "full_gc": {"count": len(r["gc_s"]), "max_ms": 1e3 * max(r["gc_s"], default=0.0),
                        "total_ms": 1e3 * sum(r["gc_s"]), "in_steps": r["gc_steps"]},
        }
    gap = (f", {args.model_ms:g} ms model time per step" if args.model_ms else "") + \
        (", heaps frozen after loading" if args.freeze_gc else "") + \
        (", Stencil's warm-up off" if args.no_warm_up else "")
    print(f"\n{len(records)} schemas, tokenizer {args.tokenizer} (vocab {vocab_size}){gap}, times in ms")
    header = f"{'engine':<11} {'mask p50':>9} {'p90':>8} {'p99':>8} {'p99.9':>8} {'max':>8} | {'TTFM p50':>9} {'p90':>8} {'p99':>8} {'max':>8} | {'RSS MB':>7} | failures"
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        if "unavailable" in s:
            print(f"{name:<11} unavailable: {s['unavailable']}")
            continue
        m, t = s["mask_ms"], s["ttfm_ms"]
        f = lambda d, k: f"{d.get(k, float('nan')):.3f}"  # noqa: E731
        print(f"{name:<11} {f(m,'p50'):>9} {f(m,'p90'):>8} {f(m,'p99'):>8} {f(m,'p99.9'):>8} {f(m,'max'):>8} | "
              f"{f(t,'p50'):>9} {f(t,'p90'):>8} {f(t,'p99'):>8} {f(t,'max'):>8} | {s['peak_rss_mb']:7.0f} | {s['failures'] or '-'}")
    print("\nfull garbage collections (generation 2) in each engine's process, during the schemas' work:")
    for name, s in summary.items():
        if "full_gc" in s:
            c = s["full_gc"]
            print(f"  {name:<11} {c['count']:4d}, longest {c['max_ms']:.1f} ms, {c['total_ms']:.0f} ms in all, "
                  f"{c['in_steps']} timed steps ran one")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"masks-{args.tokenizer}" + (f"-model{args.model_ms:g}ms" if args.model_ms else ""))
    raw = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
           "per_schema": {n: results[n]["per_schema"] for n in names},
           "mask_s": {n: results[n]["mask_s"] for n in names}, "ttfm_s": {n: results[n]["ttfm_s"] for n in names}}
    stem.with_suffix(".json").write_text(json.dumps(raw))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            xs = np.sort(np.asarray(results[name]["mask_s"]) * 1e3)
            if xs.size:
                ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("time per mask fill + accept (ms, log scale)")
        ax.set_ylabel("fraction of masks")
        ax.set_title(f"Mask time CDF, {len(records)} MaskBench schemas, {args.tokenizer}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{stem}-cdf.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no CDF plot", file=sys.stderr)
    print(f"\nwrote {stem}.json")


if __name__ == "__main__":
    main()
