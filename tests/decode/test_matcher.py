"""GrammarMatcher with real tokenizers: token round trips, rejection without trace, stop/special/padding ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stencil.decode.matcher import GrammarMatcher
from stencil.errors import GrammarError, ParserLimitError, StencilError
from stencil.grammar.compiler import GrammarCompiler, bind
from stencil.grammar.ir import GrammarBuilder, Ref, Special, alt, chars, lit, plus, seq, star
from stencil.grammar.vocab import TokenizerInfo
from tests.conftest import tokenizer_dir, tokenizer_meta


@pytest.fixture(scope="module")
def phi3():
    """phi3: SentencePiece byte fallback, two stop tokens, and 53 padding ids past the tokenizer."""
    meta = tokenizer_meta("phi3")
    return TokenizerInfo.from_file(tokenizer_dir("phi3"), vocab_size=meta["model_vocab_size"])


def list_grammar():
    """A small JSON-ish list grammar with recursion: [1,[2,3],[]]"""
    b = GrammarBuilder()
    b.rule("root", Ref("v"))
    b.rule("v", alt(plus(chars(("0", "9"))), seq(lit("["), alt(lit(""), seq(Ref("v"), star(seq(lit(","), Ref("v"))))), lit("]"))))
    return b.build()


def greedy_tokens(info: TokenizerInfo, text: str) -> list[int]:
    """Longest-match tokenization over the vocabulary's bytes: valid tokens, independent of the tokenizer's merges."""
    by_bytes = {}
    for t in range(info.tokenizer_size):
        if info.token_kind[t] == info.KIND_TEXT:
            by_bytes.setdefault(info.decoded_vocab[t], t)
    data, out, i = text.encode(), [], 0
    while i < len(data):
        j = max(k for k in range(i + 1, len(data) + 1) if data[i:k] in by_bytes)
        out.append(by_bytes[data[i:j]])
        i = j
    return out


def snapshot(m: GrammarMatcher) -> tuple:
    return (m.num_accepted_tokens, m.is_completed(), m.is_terminated(), m.brute_force_mask().tobytes())


def test_token_round_trip_rollback_and_fork(phi3):
    m = GrammarMatcher(bind(list_grammar(), phi3))
    text = "[12,[3,45],[],[[6]]]"
    ids = greedy_tokens(phi3, text)
    assert b"".join(phi3.decoded_vocab[t] for t in ids) == text.encode() and len(ids) > 8
    snaps = []
    for t in ids:
        snaps.append(snapshot(m))
        assert m.try_token(t) and snapshot(m) == snaps[-1]  # try changes nothing
        assert m.accept_token(t)
    assert m.is_completed() and not m.is_terminated()
    fork = m.fork()
    stop = phi3.stop_token_ids[0]
    assert fork.accept_token(stop) and fork.is_terminated()
    assert not fork.accept_token(ids[0]) and fork.brute_force_mask().sum() == 0
    assert not m.is_terminated()  # the fork did not touch the original
    for i in range(len(ids) - 1, -1, -1):
        m.rollback(1)
        assert snapshot(m) == snaps[i]


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, 32063), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_random_tokens_rejected_leave_no_trace(phi3, ids, rnd):
    m = GrammarMatcher(bind(list_grammar(), phi3))
    for t in ids:
        before = snapshot(m)
        allowed = bool(m.brute_force_mask()[t])
        assert m.accept_token(t) == allowed
        if not allowed:
            assert snapshot(m) == before
        elif rnd.random() < 0.3:
            m.rollback(1)
            assert snapshot(m) == before


def test_stop_special_and_padding_ids(phi3):
    m = GrammarMatcher(bind(list_grammar(), phi3))
    assert phi3.stop_token_ids == [32000, 32007]
    mask = m.brute_force_mask()
    assert not mask[phi3.stop_token_ids].any()  # not complete yet
    assert not mask[phi3.special_token_ids].any()
    assert not mask[32011:].any() and len(mask) == 32064  # padding ids
    with pytest.raises(StencilError, match="outside the vocabulary"):
        m.accept_token(32064)
    assert m.accept_string("[1]") and m.is_completed()
    mask = m.brute_force_mask()
    assert mask[phi3.stop_token_ids].all()
    others = [t for t in phi3.special_token_ids if t not in phi3.stop_token_ids]
    assert not mask[others].any()
    for stop in phi3.stop_token_ids:
        f = m.fork()
        assert f.accept_token(stop) and f.is_terminated() and f.is_completed()
        f.rollback(1)
        assert not f.is_terminated()


def test_grammar_can_name_a_special_token(phi3):
    b = GrammarBuilder()
    b.rule("root", seq(lit("ok"), Special("<|end|>"), lit("!")))
    m = GrammarMatcher(bind(b.build(), phi3))
    end_id = phi3.special_token_names["<|end|>"]
    assert m.accept_string("ok")
    mask = m.brute_force_mask()
    assert np.flatnonzero(mask).tolist() == [end_id]  # named special: allowed mid-grammar; text never spells it
    assert m.accept_token(end_id) and not m.is_terminated() and m.accept_string("!") and m.is_completed()
    b = GrammarBuilder()
    b.rule("root", Special("<|no_such_token|>"))
    with pytest.raises(GrammarError, match="lacks"):
        bind(b.build(), phi3)


def test_matcher_limit_on_pathological_grammar(phi3):
    b = GrammarBuilder()
    b.rule("root", Ref("e"))
    b.rule("e", alt(lit("a"), seq(Ref("e"), Ref("e")), seq(Ref("e"), Ref("e"), Ref("e"))))
    m = GrammarMatcher(bind(b.build(), phi3), max_items_per_row=300)
    with pytest.raises(ParserLimitError):
        m.accept_string("a" * 500)
    assert m.num_accepted_tokens == 0 and m.accept_string("aaa")


def test_choice_compiler_and_cache(phi3):
    c = GrammarCompiler(phi3)
    cg = c.compile_choice(["yes", "no"])
    assert c.compile_choice(["yes", "no"]) is cg
    m = GrammarMatcher(cg)
    allowed = {phi3.decoded_vocab[t] for t in np.flatnonzero(m.brute_force_mask())}
    assert allowed == {b for b in set(phi3.decoded_vocab) if b and (b"yes".startswith(b) or b"no".startswith(b))}
    with pytest.raises(GrammarError):
        c.compile_choice([])


def test_validate_tokens_counts_the_accepted_prefix(phi3):
    m = GrammarMatcher(bind(list_grammar(), phi3))
    good = greedy_tokens(phi3, "[1,2]")
    bad = greedy_tokens(phi3, "x")[0]
    assert m.validate_tokens(good + [bad] + good) == len(good)
    assert m.num_accepted_tokens == 0
