"""Tiny random-weight causal LMs with real tokenizers from ../shared, for runtime tests.

A random model's choices wander: inside a JSON string it would almost never pick the closing quote,
so almost no generation would finish within a small token budget. :func:`structural_bias` is a
fixed ``logit_bias`` (a public ``generate`` argument) that favours tokens made only of JSON
punctuation: ``"`` followed by closers only (``"``, ``""``, ``"}`` ...: they close strings) most,
then ``}``/``]`` (they close containers), then the rest (``,``, ``:``, ``":"`` ...). The grammar
still decides what is allowed; the bias only makes short instances likely, which is what lets tests
assert on *completed* outputs.
"""

from __future__ import annotations

import functools

import torch

from tests.conftest import tokenizer_dir, tokenizer_meta

ARCHS = ("gpt2", "llama", "qwen2")
TOKENIZER_OF = {"gpt2": "gpt2", "llama": "llama3", "qwen2": "qwen2"}


@functools.cache
def tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))


@functools.cache
def tiny_model(arch: str):
    """(model, tokenizer): 2 layers, width 64, random weights (seeded), the arch's real tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer(TOKENIZER_OF[arch])
    meta = tokenizer_meta(TOKENIZER_OF[arch])
    vocab = meta["model_vocab_size"]  # qwen2: wider than the tokenizer
    torch.manual_seed(1234)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=2))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512))
    # What a released checkpoint's generation config says: its stop tokens, and a padding id.
    stops = meta["stop_token_ids"]
    pad = meta.get("pad_token_id") if meta.get("pad_token_id") is not None else stops[0]
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = list(stops), pad, None
    return model.eval(), tok


_STRUCT = frozenset(b'{}[]":,')
_CLOSING = frozenset(b'"}]')


@functools.cache
def structural_bias(arch: str) -> dict[int, float]:
    from stencil.runtime.generate import get_engine

    model, tok = tiny_model(arch)
    info = get_engine(model, tok).tokenizer_info
    bias = {}
    for t, b in enumerate(info.decoded_vocab):
        if b and set(b) <= _STRUCT:
            if b[:1] == b'"' and set(b) <= _CLOSING:
                bias[t] = 20.0
            else:
                bias[t] = 17.0 if set(b) <= _CLOSING else 10.0
    return bias
