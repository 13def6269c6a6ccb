"""Long-context decode: TokenSelect sparse attention against dense SDPA.

Two measurements, both at decode (one new token per step, batch 1):

1. **Attention step**: one Llama-3-8B-shaped attention layer (32 query heads, 8 KV heads, head dim 128) over a
   context of N cached tokens, timed per step: transformers' SDPA attention vs ``sparse_attention`` (what
   TokenSelect's attention function runs once the context exceeds the budget) in three cache regimes: "miss"
   (threshold above 1: every step scores every key), "hit" (threshold -1: every step after the first reuses
   the selection) and "drift" (the configured threshold, queries drifting randomly:
   q_t = q_{t-1} + r_t |q| u_t, renormalized, u_t a random unit vector and r_t uniform in [0, 2 * drift], so
   consecutive cosines are about 1 / sqrt(1 + r_t^2)). Also the relative error of the attention output against
   dense, ||o_sparse - o_dense|| / ||o_dense||, on synthetic data (keys N(0, 1), queries N(0, sigma^2): a larger
   sigma makes attention more peaked; random keys are a hard case with no structure to exploit), and
   the dense attention mass that lands on the selected keys (the error bound is 2 (1 - mass) max |v|).
2. **End-to-end decode**: a random-weight LlamaForCausalLM with Llama-3-8B-shaped layers (``--layers`` of them)
   whose KV cache is pre-filled with N random tokens; decode tokens/s with SDPA vs TokenSelect (miss / hit /
   configured threshold).

Attention variants take turns step by step, so load swings on a shared machine hit them alike; on CPU one torch
thread is used by default (``--threads``). Percentiles (p50, p90, p99, max) are over steps. Results go to ``bench/results/longctx-<device>-<time>.json``.
Progress goes to stderr. Never run by the test suite.

    python bench/longctx.py                          # CPU defaults: 2k and 8k context, 2 layers, float32
    python bench/longctx.py --contexts 8192,32768,131072 --layers 32 --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from stencil.runtime.tokenselect import (  # noqa: E402
    LayerCache,
    TokenSelectConfig,
    TokenSelectStats,
    sparse_attention,
    tokenselect,
)

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=262144)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentiles(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
            "steps": len(ms)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _AttentionLayer(torch.nn.Module):
    """Stands in for a model's attention module: what the attention functions read from it."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.layer_idx = 0
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True
        self.scaling = head_dim ** -0.5


def selected_mass(query: torch.Tensor, keys: torch.Tensor, record: list, scaling: float) -> float:
    """Dense attention mass on the selected keys, averaged over heads (1.0 when the step attended densely)."""
    if not record:
        return 1.0
    _, _, idx, valid = record[0]
    chosen = idx[0][valid[0]]
    groups = query.shape[1] // keys.shape[1]
    logits = torch.einsum("hd,hkd->hk", query[0, :, 0].float(), keys[0].float().repeat_interleave(groups, 0))
    weights = torch.softmax(logits * scaling, dim=-1)
    return float(weights[:, chosen].sum(dim=-1).mean())


def bench_attention(args, n_ctx: int, device: torch.device, dtype: torch.dtype) -> dict:
    heads, kv_heads, dim = LLAMA3_8B["num_attention_heads"], LLAMA3_8B["num_key_value_heads"], LLAMA3_8B["head_dim"]
    steps = args.attn_steps
    g = torch.Generator(device="cpu").manual_seed(0)
    keys = torch.randn(1, kv_heads, n_ctx + steps, dim, generator=g).to(device, dtype)
    values = torch.randn(1, kv_heads, n_ctx + steps, dim, generator=g).to(device, dtype)
    q0 = torch.randn(1, heads, 1, dim, generator=g) * args.sigma
    queries = [q0]
    for _ in range(steps - 1):
        prev = queries[-1]
        noise = torch.randn(prev.shape, generator=g)
        ratio = 2 * args.drift * float(torch.rand(1, generator=g))
        nxt = prev + ratio * prev.norm() * noise / noise.norm()
        queries.append(nxt / nxt.norm() * q0.norm())
    queries = [q.to(device, dtype) for q in queries]
    layer = _AttentionLayer(heads, kv_heads, dim).to(device)

    def dense(q, k, v, record):
        return sdpa_attention_forward(layer, q, k, v, None, scaling=layer.scaling)[0].transpose(1, 2)

    variants = {"dense": (dense, None, None)}
    for kernel in args.kernels:
        for regime, threshold in (("miss", 2.0), ("hit", -1.0), ("drift", args.threshold)):
            config = TokenSelectConfig(n_sink=args.n_sink, n_local=args.n_local, top_k=args.top_k,
                                       threshold=threshold, kernel=kernel)
            cache, stats = LayerCache(), TokenSelectStats()

            def sparse(q, k, v, record, config=config, cache=cache, stats=stats):
                return sparse_attention(q, k, v, None, scaling=layer.scaling, config=config, cache=cache,
                                        stats=stats, record=record)

            variants[f"{kernel}/{regime}"] = (sparse, stats, threshold)

    # Variants take turns step by step, so load swings on a shared machine hit them all alike.
    times = {name: [] for name in variants}
    outs = {name: [] for name in variants}
    records = {name: [] for name in variants}
    for t in range(steps + args.warmup):
        i = max(t - args.warmup, 0)
        # Contiguous, as a transformers DynamicCache hands them over.
        k, v = keys[:, :, : n_ctx + i + 1].contiguous(), values[:, :, : n_ctx + i + 1].contiguous()
        for name, (fn, stats, _) in variants.items():
            if t == args.warmup and stats is not None:
                stats.reset()  # hit rates over the timed steps only
            record: list = []
            sync(device)
            start = time.perf_counter()
            out = fn(queries[i], k, v, record)
            sync(device)
            if t >= args.warmup:
                times[name].append(time.perf_counter() - start)
                outs[name].append(out.float())
                records[name].append(record)
        if t >= args.warmup and (t - args.warmup) % 8 == 7:
            log(f"  attention n={n_ctx} step {t - args.warmup + 1}/{steps}")

    result = {"context": n_ctx, "dense": percentiles(times["dense"]), "sparse": {}}
    log(f"  attention n={n_ctx} {'sdpa (dense)':<26} p50 {np.median(times['dense']) * 1e3:9.3f} ms")
    for name, (_, stats, threshold) in variants.items():
        if stats is None:
            continue
        errors = [float((o - d).norm() / d.norm()) for o, d in zip(outs[name], outs["dense"])]
        masses = [selected_mass(queries[i], keys[:, :, : n_ctx + i + 1], rec, layer.scaling)
                  for i, rec in enumerate(records[name])]
        speedup = float(np.median(times["dense"]) / np.median(times[name]))
        result["sparse"][name] = {
            **percentiles(times[name]), "threshold": threshold, "hit_rate": stats.hit_rate, "speedup_p50": speedup,
            "rel_error_mean": float(np.mean(errors)), "rel_error_max": float(np.max(errors)),
            "selected_mass_mean": float(np.mean(masses)), "selected_mass_min": float(np.min(masses)),
        }
        log(f"  attention n={n_ctx} {'tokenselect ' + name:<26} p50 {np.median(times[name]) * 1e3:9.3f} ms "
            f"x{speedup:.2f} hit {stats.hit_rate:.2f} mass {np.mean(masses):.3f}")
    return result


def build_model(args, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    shape = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    if args.vocab:
        shape["vocab_size"] = args.vocab
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an 8B model in float32 would not fit twice
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def bench_decode(args, model, n_ctx: int, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(1)
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, n_ctx, cfg.head_dim, generator=g).to(device, dtype)
        v = torch.randn(1, cfg.num_key_value_heads, n_ctx, cfg.head_dim, generator=g).to(device, dtype)
        cache.update(k, v, layer)
    first = torch.randint(0, cfg.vocab_size, (1, 1), generator=g).to(device)

    def run(label, state=None):
        grown = cache.get_seq_length() - n_ctx
        if grown:
            cache.crop(-grown)  # back to the pre-filled context (5.x crop takes the count to drop)
        token, times = first, []
        for t in range(args.decode_steps + args.warmup):
            if t == args.warmup and state is not None:
                state.reset_stats()  # hit rates over the timed steps only
            sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                out = model(input_ids=token, past_key_values=cache, use_cache=True,
                            position_ids=torch.tensor([[n_ctx + t]], device=device))
            token = out.logits[:, -1:].argmax(-1)
            sync(device)
            if t >= args.warmup:
                times.append(time.perf_counter() - start)
        log(f"  decode    n={n_ctx} {label:<24} {1 / np.median(times):8.2f} tok/s")
        return times

    dense = run("sdpa (dense)")
    result = {"context": n_ctx, "layers": cfg.num_hidden_layers,
              "dense": {**percentiles(dense), "tokens_per_s": float(1 / np.median(dense))}, "sparse": {}}
    for regime, threshold in (("miss", 2.0), ("hit", -1.0), ("configured", args.threshold)):
        config = TokenSelectConfig(n_sink=args.n_sink, n_local=args.n_local, top_k=args.top_k, threshold=threshold,
                                   kernel=args.kernels[-1])
        with tokenselect(model, config) as state:
            times = run(f"tokenselect {regime}", state)
        result["sparse"][regime] = {
            **percentiles(times), "threshold": threshold, "tokens_per_s": float(1 / np.median(times)),
            "speedup_p50": float(np.median(dense) / np.median(times)), "hit_rate": state.total_stats().hit_rate,
        }
    return result


def main() -> None:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="8192,32768,131072" if on_gpu else "2048,8192",
                   help="comma-separated context lengths")
    p.add_argument("--layers", type=int, default=32 if on_gpu else 2, help="decoder layers in the e2e model")
    p.add_argument("--vocab", type=int, default=0 if on_gpu else 8192,
                   help="vocabulary of the e2e model (0: Llama-3's 128256)")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--attn-steps", type=int, default=64 if on_gpu else 24)
    p.add_argument("--decode-steps", type=int, default=32 if on_gpu else 8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n-sink", type=int, default=128)
    p.add_argument("--n-local", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2048)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--kernels", default="fused" if on_gpu else "reference,fused",
                   help="TokenSelect kernels for the attention step; the last one is used end to end")
    p.add_argument("--sigma", type=float, default=2.0, help="query scale of the synthetic attention data")
    p.add_argument("--drift", type=float, default=0.35, help="mean per-step query drift of the 'drift' regime")
    p.add_argument("--threads", type=int, default=0 if on_gpu else 1,
                   help="torch intra-op threads (0: torch's default). One on a shared CPU: with two threads, "
                        "every op waits on a preempted OpenMP worker and small ops slow down 10-100x")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.kernels = args.kernels.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    contexts = [int(c) for c in args.contexts.split(",")]

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine = {"load_average_at_start": load,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
    if device.type != "cuda":
        log("NOTE: no GPU: these are CPU numbers at small sizes; the H100 targets (>=5x decode attention, >=1.5x "
            "end-to-end at 128k) are NOT measured by this run.")
    log(f"machine: {machine}")
    results = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine,
               "gpu_measured": device.type == "cuda", "args": vars(args), "attention": [], "decode": []}
    for n in contexts:
        log(f"[attention] context {n}")
        results["attention"].append(bench_attention(args, n, device, dtype))
    if not args.skip_e2e:
        log(f"[decode] building a {args.layers}-layer Llama-3-8B-shaped model ({args.dtype}, {args.device})")
        model = build_model(args, device, dtype)
        for n in contexts:
            log(f"[decode] context {n}")
            results["decode"].append(bench_decode(args, model, n, device, dtype))

    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" / f"longctx-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps(results, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
