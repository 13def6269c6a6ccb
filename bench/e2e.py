"""End-to-end decode throughput with and without constraints: ``stencil.generate`` at batch 1, 8, 64.

    python bench/e2e.py                      # CPU: the packaged default model
    python bench/e2e.py --batches 1 8 --tokens 32 --out bench/results/e2e-cpu.json

Every configuration generates exactly ``--tokens`` tokens per row, so the runs compare like for like:

* ``unconstrained``: the stop tokens get a ``-inf`` logit bias, so no row ends early;
* ``json (check-first)`` and ``json (mask)``: an array of at least 1000 person objects
  (``examples/person.json``) is a grammar that cannot finish within the budget; the two samplers
  are the engine's ``"awrs"`` (check the model's own choice first) and ``"mask"`` (full mask,
  filled on the worker thread during the forward pass).

Same model, prompts, lengths and sampler settings (temperature 0.7, seed 0) in every row.
Reported: tokens per second (all rows), time per step, grammar seconds (all grammar work, on any
thread), and the seconds the loop *waited* for grammar work that the forward pass did not hide.
When CUDA is available the same table is produced for a random-weight Llama of about 1B parameters
(bf16) with the llama3 tokenizer from ../shared; without CUDA that part is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stencil.runtime.generate import generate, get_engine, load_model  # noqa: E402

PERSON = json.loads((REPO / "examples" / "person.json").read_text())
ENDLESS = {"type": "array", "items": PERSON, "minItems": 1000}
PROMPT = [{"role": "user", "content": "Give me a list of people as JSON."}]


def _cases(engine):
    never_stop = {t: float("-inf") for t in engine.stop_ids}
    return [
        ("unconstrained", dict(logit_bias=never_stop)),
        ("json (check-first)", dict(schema=ENDLESS, sampler="awrs")),
        ("json (mask)", dict(schema=ENDLESS, sampler="mask")),
    ]


def run(model, tok, prompt, batches, tokens, repeats):
    """Best-of-``repeats`` per (case, batch); the cases take turns within each repeat, so a busy
    machine slows them alike instead of whichever happened to run during the noise."""
    engine = get_engine(model, tok)
    cases = _cases(engine)
    for _, kw in cases:
        # Warm-up at full length: numba kernels, and the mask-cache entries of every state the run reaches.
        generate(model, prompt, tokenizer=tok, max_new_tokens=tokens, temperature=0.7, seed=0, **kw)
    rows = []
    for b in batches:
        best: dict[str, dict] = {}
        for _ in range(repeats):
            for name, kw in cases:
                t0 = time.perf_counter()
                outs = generate(model, [prompt] * b, tokenizer=tok, max_new_tokens=tokens, temperature=0.7, seed=0, **kw)
                wall = time.perf_counter() - t0
                n = sum(len(o.token_ids) for o in outs)
                assert all(o.finish_reason == "length" for o in outs), "a row ended early: lengths would differ"
                if name not in best or wall < best[name]["wall_s"]:
                    st = outs[0].stats
                    best[name] = {"case": name, "batch": b, "tokens": n, "wall_s": round(wall, 3),
                                  "tokens_per_s": round(n / wall, 1), "ms_per_row_token": round(1000 * wall / tokens, 2),
                                  "grammar_s": round(st.grammar_seconds, 3),
                                  "grammar_wait_s": round(st.grammar_wait_seconds, 3)}
        for name, _ in cases:
            rows.append(best[name])
            print(json.dumps(best[name]), flush=True)
    return rows


def table(rows) -> str:
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["case"] == "unconstrained"}
    lines = ["| case | batch | tokens/s | vs unconstrained | ms per row-token | grammar s | waited s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = r["tokens_per_s"] / base[r["batch"]] if base.get(r["batch"]) else float("nan")
        lines.append(f"| {r['case']} | {r['batch']} | {r['tokens_per_s']} | {rel:.0%} | {r['ms_per_row_token']} | "
                     f"{r['grammar_s']} | {r['grammar_wait_s']} |")
    return "\n".join(lines)


def gpu_model():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(REPO.parent / "shared" / "tokenizers" / "llama3"))
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                      eos_token_id=[128001, 128008, 128009], bos_token_id=128000, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits a small model on a shared box)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    machine = f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, {args.threads} thread(s)"
    print(f"CPU, packaged default model ({machine})", flush=True)
    model, tok = load_model(None)
    results = {"cpu": {"machine": machine, "model": "packaged default (GPT-2, 4 layers, d=192)",
                       "rows": run(model, tok, PROMPT, args.batches, args.tokens, args.repeats)}}
    print(table(results["cpu"]["rows"]))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        print(f"GPU: {name}, random-weight Llama ~1B (bf16), llama3 tokenizer", flush=True)
        model, tok = gpu_model()
        prompt = "Give me a list of people as JSON:"
        results["gpu"] = {"device": name, "model": "Llama ~1.2B random weights, bf16",
                          "rows": run(model, tok, prompt, args.batches, args.tokens, args.repeats)}
        print(table(results["gpu"]["rows"]))
    else:
        print("no CUDA device here: the GPU benchmark (~1B Llama) was skipped")
        results["gpu"] = None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
