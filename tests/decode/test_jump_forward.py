"""Jump-forward: forced bytes against a brute-force oracle, forced tokens canonical with the six tokenizers.

The canonical-safety oracle is the tokenizer itself. For many grammar states with a forced run,
and for several continuations the grammar allows after it (the rest of a sampled sentence, and
random walks), the tokenizer's own encoding of ``forced text + continuation`` must start with the
forced tokens. The same must hold for the whole output ``prefix + forced + continuation`` wherever
that encoding has a token boundary at the end of the prefix. Encodings are mid-text (the forced
text follows earlier output). For the SentencePiece tokenizers the oracle is the tokenizer with its
``Prepend("▁")`` normalizer step removed. This is a different mechanism from the anchors
:class:`TextEncoder` uses.
"""

from __future__ import annotations

import functools
import json
import random

import pytest
from tokenizers import Tokenizer

from stencil.decode.jump_forward import TextEncoder, jump_forward_bytes, jump_forward_tokens
from stencil.decode.matcher import GrammarMatcher
from stencil.decode.parser import Recognizer
from stencil.errors import StencilError
from stencil.grammar.compiler import GrammarCompiler, bind
from stencil.grammar.ir import GrammarBuilder, Special, lit, seq
from stencil.grammar.vocab import TokenizerInfo
from tests.conftest import TOKENIZERS, tokenizer_dir

# Grammars with forced runs of every kind: literals between free fields, choices sharing
# prefixes, a regex with literals, a JSON schema (compact: keys and punctuation are forced), and
# non-ASCII literals with whitespace runs.
GRAMMARS = {
    "ebnf_json": (
        "ebnf",
        r'root ::= "{\"name\": \"" [a-z]+ "\", \"age\": " [0-9]+ ", \"tags\": [" '
        r'( "\"" [a-z]* "\"" ( ", \"" [a-z]* "\"" )* )? "]}"',
    ),
    "choice": ("choice", ["yes", "yesterday", "no", "nonsense", "Paris, France", "Paris, Texas", "   indented"]),
    "regex": ("regex", r"(\d{3})-(\d{4}) ext\. [0-9]+|call me at \d+( please)?"),
    "schema": (
        "schema",
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "isActive": {"type": "boolean"}, "count": {"type": "integer"}},
            "required": ["name", "isActive", "count"],
            "additionalProperties": False,
        },
    ),
    "unicode": ("ebnf", 'root ::= "héllo wörld: " [a-c]+ " ✓ done\\n\\n  next" ("!" | "?")'),
}

# A vocabulary of the 256 single bytes: grammars compiled with it are the tokenizer-independent
# reference (the Grammar IR does not depend on the vocabulary).
BYTES_INFO = TokenizerInfo([bytes([b]) for b in range(256)] + ["<|end|>", "<|stop|>"], "raw",
                           special_token_ids=[256], stop_token_ids=[257])


def compile_grammar(compiler: GrammarCompiler, name: str):
    kind, src = GRAMMARS[name]
    if kind == "ebnf":
        return compiler.compile_grammar(src)
    if kind == "choice":
        return compiler.compile_choice(src)
    if kind == "regex":
        return compiler.compile_regex(src)
    return compiler.compile_json_schema(src, whitespace="compact")


@functools.cache
def bytes_compiler() -> GrammarCompiler:
    return GrammarCompiler(BYTES_INFO, warm_up=False)


# ----------------------------------------------------------------------------------------------
# Brute force over the recognizer
# ----------------------------------------------------------------------------------------------


def next_symbols(rec: Recognizer) -> list[int]:
    """Every symbol (byte or special) the recognizer accepts next, tried one by one."""
    out = []
    for s in range(256 + len(rec.grammar.special_tokens)):
        if rec.accept_symbol(s):
            rec.rollback_bytes(1)
            out.append(s)
    return out


def brute_forced_bytes(rec: Recognizer) -> bytes:
    """The definition: while not complete, take the next byte while it is the only possible symbol."""
    out = bytearray()
    while not rec.is_accepting():
        nxt = next_symbols(rec)
        if len(nxt) != 1 or nxt[0] > 255:
            break
        rec.accept_symbol(nxt[0])
        out.append(nxt[0])
    rec.rollback_bytes(len(out))
    return bytes(out)


_PRINTABLE = list(range(0x20, 0x7F))
_OTHER = [b for b in range(256) if b not in _PRINTABLE]


def random_walk(rec: Recognizer, rng: random.Random, max_len: int, complete: bool) -> bytes | None:
    """Random bytes the grammar allows from ``rec`` (printable ASCII preferred); ``rec`` is restored.

    Each byte is the first one ``rec`` accepts in a shuffled order, which is a uniform draw from the
    allowed printable bytes (or, if none, from all allowed ones). ``complete``: end only at an
    accepting state (None if none is reached within ``max_len``); otherwise stop anywhere.
    """
    out = bytearray()
    try:
        while len(out) < max_len:
            if rec.is_accepting() and rng.random() < 0.25:
                return bytes(out)
            for b in rng.sample(_PRINTABLE, len(_PRINTABLE)) + rng.sample(_OTHER, len(_OTHER)):
                if rec.accept_symbol(b):
                    out.append(b)
                    break
            else:
                break
        if not complete or rec.is_accepting():
            return bytes(out)
        return None
    finally:
        rec.rollback_bytes(len(out))


def whole_chars(data: bytes) -> bytes:
    """The longest prefix of ``data`` made of complete UTF-8 characters."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data[: e.start]
    return data


def char_starts(data: bytes) -> list[int]:
    return [i for i in range(len(data) + 1) if i == len(data) or (data[i] & 0xC0) != 0x80]


@functools.cache
def sentences(name: str) -> tuple[bytes, ...]:
    """A few random complete sentences of a grammar (seeded)."""
    g = compile_grammar(bytes_compiler(), name).grammar
    rng = random.Random(name)
    found: list[bytes] = []
    for _ in range(40):
        s = random_walk(Recognizer(g), rng, 150, complete=True)
        if s is not None and s not in found:
            found.append(s)
        if len(found) == 3:
            break
    assert found, f"no sentence sampled from {name}"
    return tuple(found)


@functools.cache
def forced_states(name: str) -> tuple:
    """(prefix, forced bytes, continuations after the forced text) at states of sampled sentences with a forced run.

    Continuations start after the forced bytes' whole-character prefix: the rest of the sentence,
    and two random walks that stop anywhere.
    """
    cg = compile_grammar(bytes_compiler(), name)
    rng = random.Random(name + "/states")
    out = []
    for s in sentences(name):
        m = GrammarMatcher(cg)
        rec = Recognizer(cg.grammar)
        done = 0
        for i in char_starts(s):
            assert rec.accept_bytes(s[done:i]) and m.accept_bytes(s[done:i])
            done = i
            forced = jump_forward_bytes(m)  # equal to the brute force (test_forced_bytes_match_brute_force)
            if not forced:
                continue
            usable = len(whole_chars(forced))
            assert rec.accept_bytes(forced[:usable])
            conts = [s[i + usable :]]
            for _ in range(2):
                w = random_walk(rec, rng, rng.randint(0, 24), complete=False)
                if w is not None:
                    conts.append(whole_chars(w))
            rec.rollback_bytes(usable)
            out.append((s[:i], forced, tuple(conts)))
    rng.shuffle(out)
    return tuple(out[:24])


# ----------------------------------------------------------------------------------------------
# Forced bytes
# ----------------------------------------------------------------------------------------------


def chart_snapshot(m: GrammarMatcher) -> tuple:
    rec = m._rec
    n = int(rec._meta[0])
    return m.num_accepted_tokens, m.is_completed(), n, rec._st[: rec._row_ptr[n]].tobytes()


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_forced_bytes_match_brute_force(name):
    cg = compile_grammar(bytes_compiler(), name)
    checked = forced_runs = 0
    for s in sentences(name):
        m = GrammarMatcher(cg)
        rec = Recognizer(cg.grammar)
        for i in range(len(s) + 1):  # every byte position, mid-character ones included
            if i:
                assert m.accept_bytes(s[i - 1 : i]) and rec.accept_bytes(s[i - 1 : i])
            before = chart_snapshot(m)
            got = jump_forward_bytes(m)
            assert chart_snapshot(m) == before, "jump_forward_bytes changed the matcher"
            assert got == brute_forced_bytes(rec), (name, s[:i])
            assert s[i:].startswith(got)  # a sentence through this state goes on with the forced bytes
            checked += 1
            forced_runs += bool(got)
    assert forced_runs >= 5 and checked > forced_runs


def test_forced_bytes_stop_at_special_tokens_completion_and_the_limit():
    b = GrammarBuilder()
    b.rule("root", seq(lit("ab"), Special("<|end|>"), lit("cd" * 20)))
    m = GrammarMatcher(bind(b.build("root"), BYTES_INFO))
    assert jump_forward_bytes(m) == b"ab"
    assert m.accept_string("ab") and jump_forward_bytes(m) == b""  # a special token is next: not bytes
    assert m.accept_token(256)
    assert jump_forward_bytes(m) == m.jump_forward_bytes() == b"cd" * 20
    assert m.jump_forward_tokens(lambda text: list(text.encode())) == list(b"cd" * 20)  # single-byte vocabulary
    assert jump_forward_bytes(m, max_bytes=5) == b"cdcdc"
    assert jump_forward_bytes(m, max_bytes=0) == b""
    with pytest.raises(StencilError):
        jump_forward_bytes(m, max_bytes=-1)
    assert m.accept_string("cd" * 20) and m.is_completed()
    assert jump_forward_bytes(m) == b""

    # Complete but able to go on: stopping is possible, so nothing is forced.
    m = GrammarMatcher(bytes_compiler().compile_choice(["yes", "yes, indeed"]))
    assert jump_forward_bytes(m) == b"yes"
    assert m.accept_string("yes") and jump_forward_bytes(m) == b""
    assert m.accept_string(",") and jump_forward_bytes(m) == b" indeed"
    assert m.accept_string(" indeed") and m.accept_token(257) and m.is_terminated()
    assert jump_forward_bytes(m) == b"" and jump_forward_tokens(m, lambda text: []) == []


def test_forced_bytes_grow_the_chart():
    """A forced run longer than the chart's first allocation (256 rows, 4096 items) grows it."""
    m = GrammarMatcher(bytes_compiler().compile_grammar('root ::= "' + "abcdefgh" * 200 + '" [xy]'))
    assert jump_forward_bytes(m) == b"abcdefgh" * 200
    assert m.accept_string("abcdefgh" * 200 + "x") and m.is_completed()


# ----------------------------------------------------------------------------------------------
# Forced tokens: canonical with real tokenizers
# ----------------------------------------------------------------------------------------------


@functools.cache
def tokenizer_bundle(name: str):
    """(TokenizerInfo, its tokenizers.Tokenizer, the mid-text oracle tokenizer, a compiler) for one of the six."""
    d = tokenizer_dir(name)
    info = TokenizerInfo.from_file(d)
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    norm = spec.get("normalizer")
    if norm and norm.get("type") == "Sequence":  # SentencePiece: no "▁" in front of mid-text pieces
        norm["normalizers"] = [n for n in norm["normalizers"] if n.get("type") != "Prepend"]
        oracle = Tokenizer.from_str(json.dumps(spec))
        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    else:
        oracle = tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    return info, tokenizer, oracle, GrammarCompiler(info, warm_up=False)


def spell(info: TokenizerInfo, ids) -> bytes:
    return b"".join(info.decoded_vocab[t] for t in ids)


@pytest.mark.parametrize("tok", TOKENIZERS)
def test_forced_tokens_are_canonical(tok):
    info, tokenizer, oracle, compiler = tokenizer_bundle(tok)
    encode = TextEncoder(tokenizer, info)
    n_states = n_tokens = n_direct = n_in_context = 0
    for name in GRAMMARS:
        cg = compile_grammar(compiler, name)
        for prefix, forced, conts in forced_states(name):
            m = GrammarMatcher(cg)
            assert m.accept_bytes(prefix)
            assert jump_forward_bytes(m) == forced
            before = chart_snapshot(m)
            ids = jump_forward_tokens(m, encode)
            assert chart_snapshot(m) == before, "jump_forward_tokens changed the matcher"
            text = spell(info, ids)
            assert forced.startswith(text) and all(info.token_kind[t] == info.KIND_TEXT for t in ids)
            assert m.validate_tokens(ids) == len(ids)
            usable = len(whole_chars(forced))
            n_states += usable > 0
            n_tokens += bool(ids)
            for cont in conts:
                tail = forced[:usable] + cont
                want = oracle.encode(tail.decode("utf-8"), add_special_tokens=False).ids
                if spell(info, want) != tail:
                    continue  # the tokenizer rewrote the text (normalizer): not a tokenization of these bytes
                assert want[: len(ids)] == ids, (tok, name, prefix, forced, cont,
                                                 [info.decoded_vocab[t] for t in want[:8]])
                n_direct += 1
                # The whole output: where its encoding has a boundary at the end of the prefix, the
                # forced tokens come next.
                whole = oracle.encode((prefix + tail).decode("utf-8"), add_special_tokens=False).ids
                at, k = 0, 0
                while k < len(whole) and at < len(prefix):
                    at += len(info.decoded_vocab[whole[k]])
                    k += 1
                if at == len(prefix):
                    assert whole[k : k + len(ids)] == ids, (tok, name, prefix, forced, cont)
                    n_in_context += 1
    # Not vacuous: most forced runs give tokens, and both checks ran many times.
    assert n_tokens >= 0.6 * n_states, (n_tokens, n_states)
    assert n_direct >= 150 and n_in_context >= 50, (n_direct, n_in_context)


def test_tokenizing_the_forced_bytes_alone_is_not_canonical():
    """The back-off is needed: encoding the forced text as it stands fails the oracle on these grammars."""
    info, tokenizer, oracle, compiler = tokenizer_bundle("gpt2")
    encode = TextEncoder(tokenizer, info)
    bad = 0
    for name in GRAMMARS:
        for _, forced, conts in forced_states(name):
            usable = len(whole_chars(forced))
            naive = encode(forced[:usable].decode("utf-8")) or []
            for cont in conts:
                want = oracle.encode((forced[:usable] + cont).decode("utf-8"), add_special_tokens=False).ids
                bad += want[: len(naive)] != naive
    assert bad >= 20


def test_incomplete_characters_and_special_spellings_are_not_forced():
    info, tokenizer, _, compiler = tokenizer_bundle("gpt2")
    # Two choices that share only the first byte of a character: that byte is forced, but no token can be.
    m = GrammarMatcher(compiler.compile_choice(["é1", "è2"]))
    assert jump_forward_bytes(m) == "é".encode()[:1]
    assert jump_forward_tokens(m, tokenizer) == []
    # The forced text spells a special token: the HF tokenizer turns it into the special id, which
    # does not spell the bytes, so nothing is forced rather than a special token.
    m = GrammarMatcher(compiler.compile_grammar('root ::= "<|endoftext|>" [a-z]'))
    assert jump_forward_bytes(m) == b"<|endoftext|>"
    ids = jump_forward_tokens(m, tokenizer)
    assert b"<|endoftext|>".startswith(spell(info, ids)) and all(info.token_kind[t] == info.KIND_TEXT for t in ids)


def test_text_encoder_inputs():
    from transformers import AutoTokenizer

    info, backend, oracle, _ = tokenizer_bundle("llama2")
    by_hf = TextEncoder(AutoTokenizer.from_pretrained(str(tokenizer_dir("llama2"))), info)
    by_backend = TextEncoder(backend, info)
    by_callable = TextEncoder(lambda text: oracle.encode(text, add_special_tokens=False).ids, info)
    for text in ["name", " name", "\n\nx", '{"a": 1}', "  indented", "héllo ✓"]:
        want = oracle.encode(text, add_special_tokens=False).ids
        assert by_hf(text) == by_backend(text) == by_callable(text) == want, text
        assert spell(info, want) == text.encode()
    # A callable whose tokens do not spell the text is not trusted.
    assert TextEncoder(lambda text: [info.special_token_ids[0]], info)("x") is None
    with pytest.raises(StencilError):
        TextEncoder(42, info)
