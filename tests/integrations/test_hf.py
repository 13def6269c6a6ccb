"""stencil.integrations.hf.LogitsProcessor inside ``model.generate``.

Oracles: ``stencil.generate``'s greedy output (mask sampler, no jump-forward: the same decisions a
logits processor can make) for greedy decoding; the grammar's own recognizer and Python's ``re``
for sampled, multi-sequence and beam-search outputs, whose rows ``transformers`` repeats and
reorders.
"""

from __future__ import annotations

import re

import pytest
import torch

from stencil.integrations.hf import LogitsProcessor
from stencil.runtime.generate import generate, get_engine
from tests.runtime.tiny_models import ARCHS, tiny_model

PATTERN = r"[0-9]{1,3}(\.[0-9]{1,2})?|(yes|no)!"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pad_id(tok):
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _generated(out, prompt_len, stop_ids, pad_id):
    """Generated ids per row, without the stop token and the padding after it."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        ids = []
        for t in row:
            if t in stop_ids:
                break
            ids.append(t)
        rows.append(ids)
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_stencil_generate(arch):
    model, tok = tiny_model(arch)
    engine = get_engine(model, tok)
    cg = engine.compiler.compile_regex(PATTERN)
    proc = LogitsProcessor(cg)  # one instance, reused across calls and batch shapes
    prompts = ["The answer is", "Q: how many? A:", "x"]
    stop = set(engine.stop_ids)
    for p in prompts:
        ours = generate(model, p, tokenizer=tok, regex=PATTERN, temperature=0.0, sampler="mask", jump_forward=False,
                        max_new_tokens=12)
        enc = tok(p, return_tensors="pt")
        out = model.generate(**enc, logits_processor=[proc], do_sample=False, max_new_tokens=12,
                             pad_token_id=_pad_id(tok))
        [hf] = _generated(out, enc.input_ids.shape[1], stop, _pad_id(tok))
        assert hf == ours.token_ids, p
    # A left-padded batch through the same processor, against stencil's own batch.
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, logits_processor=[proc], do_sample=False, max_new_tokens=12, pad_token_id=_pad_id(tok))
    ours = generate(model, prompts, tokenizer=tok, regex=PATTERN, temperature=0.0, sampler="mask", jump_forward=False,
                    max_new_tokens=12)
    assert _generated(out, enc.input_ids.shape[1], stop, _pad_id(tok)) == [o.token_ids for o in ours]


def _texts(engine, rows):
    info = engine.tokenizer_info
    return [b"".join(info.decoded_vocab[t] for t in ids).decode("utf-8") for ids in rows]


def test_sampling_with_several_sequences_per_prompt_and_per_prompt_grammars():
    model, tok = tiny_model("gpt2")
    engine = get_engine(model, tok)
    grammars = [engine.compiler.compile_regex(r"[0-9]{2,4}"), engine.compiler.compile_choice(["alpha", "beta", "gamma"])]
    proc = LogitsProcessor(grammars)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    enc = tok(["Number:", "Greek letter please:"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, logits_processor=[proc], do_sample=True, num_return_sequences=4, max_new_tokens=8,
                         pad_token_id=tok.eos_token_id)
    texts = _texts(engine, _generated(out, enc.input_ids.shape[1], set(engine.stop_ids), tok.eos_token_id))
    assert len(texts) == 8
    for i, text in enumerate(texts):
        if i < 4:
            assert re.fullmatch(r"[0-9]{2,4}", text), text
        else:
            assert text in ("alpha", "beta", "gamma"), text


def test_beam_search_keeps_state_per_prefix():
    model, tok = tiny_model("llama")
    engine = get_engine(model, tok)
    pattern = r"(ab|abc|b)[0-9]{1,2}"
    proc = LogitsProcessor(engine.compiler.compile_regex(pattern))
    enc = tok("Code:", return_tensors="pt")
    out = model.generate(**enc, logits_processor=[proc], num_beams=4, num_return_sequences=4, do_sample=False,
                         max_new_tokens=8, pad_token_id=_pad_id(tok))
    texts = _texts(engine, _generated(out, enc.input_ids.shape[1], set(engine.stop_ids), _pad_id(tok)))
    assert len(texts) == 4
    for text in texts:
        assert re.fullmatch(pattern, text), text


def test_padded_vocabulary_never_yields_padding_ids():
    model, tok = tiny_model("qwen2")  # logits are 151936 wide, the tokenizer has 151665 ids
    engine = get_engine(model, tok)
    assert engine.vocab_size > len(tok)
    with torch.no_grad():
        model.lm_head.weight[len(tok):] *= 50.0  # make the padding ids the model's favourites
    try:
        proc = LogitsProcessor(engine.compiler.compile_regex(r"[a-z]{1,5}"))
        enc = tok("word:", return_tensors="pt")
        out = model.generate(**enc, logits_processor=[proc], do_sample=False, max_new_tokens=6,
                             pad_token_id=_pad_id(tok), eos_token_id=engine.stop_ids)
        ids = out[0, enc.input_ids.shape[1]:].tolist()
        assert all(t < len(tok) for t in ids)
        [text] = _texts(engine, _generated(out, enc.input_ids.shape[1], set(engine.stop_ids), _pad_id(tok)))
        assert re.fullmatch(r"[a-z]{1,5}", text)
    finally:
        with torch.no_grad():
            model.lm_head.weight[len(tok):] /= 50.0
