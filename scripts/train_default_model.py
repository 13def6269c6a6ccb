"""Train Stencil's default model: a small GPT-2 on the project's own corpus, packaged into the wheel.

    python scripts/train_default_model.py                 # writes stencil/data/default_model/
    python scripts/train_default_model.py --steps 20 --out /tmp/m    # a quick smoke run

Reproducible: the corpus comes from ``scripts/make_corpus.py`` with a fixed seed, and every random
choice (initialisation, batch order) is seeded; the same command on the same software gives the
same weights on CPU. Progress (loss, tokens/s, ETA) goes to stdout every ``--log-every`` steps.

The restricted softmax. The gpt2 vocabulary has 50,257 tokens but the corpus uses about 9,000, and
on a CPU the output layer over the full vocabulary costs more than the rest of the model. So the
embedding rows of tokens the corpus never uses are fixed at zero (input and tied output alike):
each then has logit exactly 0, and their ``n_unused`` terms add ``n_unused * e^0`` to the softmax
normaliser. Training computes the logits of the used tokens only, plus one constant column equal to
``log(n_unused)``: the loss is *exactly* the full-vocabulary cross-entropy of the exported model,
at a fifth of the cost. Unused tokens therefore keep a small, honest probability at inference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "stencil" / "data" / "default_model"
TOKENIZER = "gpt2"

# The chat format the corpus is written in (see make_corpus.chat). Tools are listed by name only:
# the model is small and its context short. The comment names the tool-call format the model
# writes by default (the corpus has all three), where stencil's format detection looks for it.
CHAT_TEMPLATE = (
    "{#- tool calls: <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call> (hermes format) -#}"
    "{%- if tools %}system: tools: {% for t in tools %}{% set f = t.function if t.function is defined else t %}"
    "{{ f.name }}{% if not loop.last %}, {% endif %}{% endfor %}{{ '\\n' }}{% endif %}"
    "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{%- if add_generation_prompt %}assistant:\n{% endif %}"
)


def _load_make_corpus():
    spec = importlib.util.spec_from_file_location("make_corpus", Path(__file__).with_name("make_corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pack(examples: list[list[int]], seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole examples (each ending in eos) into rows of ``seq_len``; labels -100 on the padding."""
    rows, labels, cur = [], [], []
    for ids in examples:
        ids = ids[:seq_len]
        if len(cur) + len(ids) > seq_len:
            rows.append(cur + [pad] * (seq_len - len(cur)))
            labels.append(cur + [-100] * (seq_len - len(cur)))
            cur = []
        cur = cur + ids
    if cur:
        rows.append(cur + [pad] * (seq_len - len(cur)))
        labels.append(cur + [-100] * (seq_len - len(cur)))
    return torch.tensor(rows), torch.tensor(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description="Train and package Stencil's default model.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-positions", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, loaded box)")
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()

    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    tok_dir = args.shared / "tokenizers" / TOKENIZER
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    vocab_size = tokenizer.get_vocab_size()

    t0 = time.time()
    mc = _load_make_corpus()
    rows = mc.build_corpus(args.shared, args.seed)
    examples = [e.ids + [eos] for e in tokenizer.encode_batch([r["text"] for r in rows])]
    n_tokens = sum(map(len, examples))
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"corpus: {len(rows)} examples, {n_tokens} tokens, kinds {kinds}, {time.time() - t0:.1f}s", flush=True)

    used = torch.tensor(sorted({t for ids in examples for t in ids}))
    n_unused = vocab_size - used.numel()
    remap = torch.full((vocab_size,), -100, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    inputs, labels = pack(examples, args.seq_len, eos)
    print(f"{used.numel()} tokens used of {vocab_size}; {inputs.shape[0]} packed rows of {args.seq_len}", flush=True)

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=args.n_positions, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    wte = model.transformer.wte.weight
    unused_mask = torch.ones(vocab_size, dtype=torch.bool)
    unused_mask[used] = False
    with torch.no_grad():
        wte[unused_mask] = 0.0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 {args.n_layer} layers, d={args.n_embd}, {args.n_head} heads, {n_params / 1e6:.1f}M parameters",
          flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wte" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    log_unused = math.log(n_unused) if n_unused else -math.inf
    order_rng = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(inputs.shape[0], generator=order_rng)
    cursor = 0
    model.train()
    t_start = time.time()
    seen = 0
    loss_avg = None
    for step in range(args.steps):
        if cursor + args.batch > order.numel():
            order = torch.randperm(inputs.shape[0], generator=order_rng)
            cursor = 0
        idx = order[cursor:cursor + args.batch]
        cursor += args.batch
        x, y = inputs[idx], labels[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        hidden = model.transformer(input_ids=x).last_hidden_state[:, :-1]
        target = y[:, 1:]
        keep = target != -100
        h = hidden[keep]
        logits = h @ wte[used].T
        if n_unused:
            logits = torch.cat([logits, torch.full((h.shape[0], 1), log_unused)], dim=1)
        loss = torch.nn.functional.cross_entropy(logits, remap[target[keep]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            wte[unused_mask] = 0.0
        seen += int(keep.sum())
        loss_val = loss.item()
        loss_avg = loss_val if loss_avg is None else 0.9 * loss_avg + 0.1 * loss_val
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.time() - t_start
            eta = el / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps} loss {loss_avg:.3f} lr {lr_at(step):.2e} "
                  f"{seen / el:.0f} tok/s elapsed {el:.0f}s eta {eta:.0f}s", flush=True)
    train_s = time.time() - t_start

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(out, safe_serialization=True)
    shutil.copyfile(tok_dir / "tokenizer.json", out / "tokenizer.json")
    shutil.copyfile(tok_dir / "LICENSE", out / "LICENSE.gpt2-tokenizer")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": args.n_positions,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    recipe = {
        "command": "python scripts/train_default_model.py " + " ".join(sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "shared")},
        "tokenizer": f"../shared/tokenizers/{TOKENIZER} (Modified MIT, see LICENSE.gpt2-tokenizer)",
        "corpus": {
            "generator": "scripts/make_corpus.py (build_corpus(shared, seed))",
            "examples": len(rows), "tokens": n_tokens, "kinds": kinds,
            "sha256": mc.corpus_digest(rows), "tokens_used": int(used.numel()),
        },
        "training": {
            "steps": args.steps, "tokens_seen": seen, "epochs": round(seen / n_tokens, 2),
            "final_loss_ema": round(loss_avg, 4), "seconds": round(train_s, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
            "torch": torch.__version__,
        },
        "parameters": n_params,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"saved to {out} ({size:.1f} MB) in {train_s:.0f}s of training", flush=True)


if __name__ == "__main__":
    main()
