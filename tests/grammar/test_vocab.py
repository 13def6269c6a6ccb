"""TokenizerInfo and the token trie, checked against the real tokenizers in ../shared/tokenizers.

Oracles:
* the tokenizer's own encoder: the bytes of the ids it produces must spell the input text;
* the tokenizer's own decoder and transformers' GPT-2 ``bytes_to_unicode`` table: every id's bytes;
* meta.json: stop, special and padding ids;
* brute force over the whole vocabulary: the trie's prefix queries and DFA walks.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stencil.errors import TokenizerError
from stencil.grammar.vocab import (
    TokenizerInfo,
    VocabType,
    trie_dfa_walk,
    trie_find,
)
from tests.conftest import TOKENIZERS, tokenizer_dir, tokenizer_meta

# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=TOKENIZERS)
def tok(request):
    """One real tokenizer: its meta.json, the transformers tokenizer, and our TokenizerInfo of it."""
    from transformers import AutoTokenizer

    name = request.param
    d = tokenizer_dir(name)
    meta = tokenizer_meta(name)
    hf = AutoTokenizer.from_pretrained(str(d))
    info = TokenizerInfo.from_huggingface(hf, vocab_size=meta["model_vocab_size"])
    raw_json = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    special = {t["id"]: t["content"] for t in meta["special_tokens"] if t["special"]}
    added_plain = {t["id"]: t["content"] for t in meta["special_tokens"] if not t["special"]}
    spm = "SentencePiece" in meta["type"]
    return SimpleNamespace(
        name=name,
        dir=d,
        meta=meta,
        hf=hf,
        info=info,
        spm=spm,
        nfc=(raw_json.get("normalizer") or {}).get("type") == "NFC",
        special=special,
        added_plain=added_plain,
        # Regular ids per meta.json: everything the tokenizer has that is not a special token.
        text_ids=np.array([i for i in range(meta["vocab_size"]) if i not in special], dtype=np.int64),
    )


# ----------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------

HAND_WRITTEN = [
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "a  b   c    d",
    "\t\ttabs\tand spaces  \t",
    "line1\nline2\r\nline3\n\n\n",
    "\n",
    " ",
    "   ",
    "café naïve résumé façade",
    "Ünïcödé Çà Ñ ø å ß",
    "e\u0301 a\u0300 o\u0308 combining marks",
    "n\u0303o\u0301\u0327",
    "日本語のテキストです。",
    "中文字符和标点：，。！？",
    "한국어 텍스트",
    "Привет, мир! Ёжик.",
    "Ελληνικά γράμματα",
    "שלום עולם",
    "مرحبا بالعالم",
    "हिन्दी पाठ",
    "emoji 😀😃😄 👍🏽 🇫🇷",
    "family 👨\u200d👩\u200d👧\u200d👦 and 🏳️\u200d🌈",
    "nbsp\u00a0here\u00a0\u00a0twice",
    "zwsp\u200bjoin\u200cnon\u200djoiner",
    "\ufeffbom at start",
    "soft\u00adhyphen",
    '{"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "none": null}',
    '{"nested": {"a": [1, 2.5e-3, -0.0, 1E+10]}, "s": "quote \\" backslash \\\\ \\u00e9"}',
    "[]",
    "{}",
    '""',
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%ann%';",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "$ echo $HOME | grep -v '^#' > /dev/null 2>&1",
    "1234567890 3.14159 -273.15 6.022e23",
    "\x00\x01\x02 control \x1b[31m red \x7f",
    "tab\tcr\rlf\nff\x0cvt\x0b",
    "ﬁ ligature ﬂ and full-width ＡＢＣ１２３",
    "𝕄𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉 𐍈 gothic",
    "'s 't 're 've 'm 'll 'd I'M WE'LL",
    "x" * 200,
    " " * 50,
    "\n" * 20,
    "ab" * 70 + "é" * 30,
]

POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r",
    "!\"#$%&'()*+,-./:;=?@[\\]^_`{|}~",
    "éèêëàâäôöûüçñßøåæœÉÀÖ",
    "\u0300\u0301\u0302\u0303\u0308\u0327",
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学",
    "ひらがなカタカナ",
    "가나다라마바사",
    "αβγδεζηθ",
    "абвгдежз",
    "אבגדה",
    "ابتثجح",
    "😀😎🚀🔥✨❤️👍🏽🎉",
    "\u00a0\u200b\u200c\u200d\u2028\u3000",
]
JSON_BITS = ['{"', '":', ' "', '", ', "[", "]", "{", "}", "null", "true", "false", "-1.5e+3", "0", ", ", "\\n",
             "\\u00e9"]
CODE_BITS = ["def ", "return ", "    ", "if (", ") {", "}\n", "x = ", "==", "!=", "->", "::", "/* c */", "// c\n",
             "#include <x.h>"]


def _random_string(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 10)):
        r = rng.random()
        if r < 0.15:
            parts.append(rng.choice(JSON_BITS))
        elif r < 0.25:
            parts.append(rng.choice(CODE_BITS))
        elif r < 0.35:
            parts.append(rng.choice([" ", "\n", "\t", "\u00a0"]) * rng.randint(1, 8))
        else:
            pool = rng.choice(POOLS)
            parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
    return "".join(parts)


def corpus() -> list[str]:
    rng = random.Random(20261122)
    return HAND_WRITTEN + [_random_string(rng) for _ in range(320)]


def test_corpus_is_large_and_varied():
    c = corpus()
    assert len(c) >= 300 and len(set(c)) >= 300
    text = "".join(c)
    for needle in ("é", "日", "😀", "\u00a0", "\u200b", "\u0301", '{"', "    ", "\n\n"):
        assert needle in text


# ----------------------------------------------------------------------------------------------
# Encoding oracle
# ----------------------------------------------------------------------------------------------


def _expected_bytes(t, s: str) -> bytes:
    """What the tokens of ``s`` must spell.

    Byte-level tokenizers spell ``s`` exactly (Qwen2 first normalizes to NFC). SentencePiece
    tokenizers prepend ``▁`` to the text (normalizer ``Prepend``), so their tokens spell exactly one
    extra leading space: we compare with ``b" " + s`` (not a strip, so a missing or doubled space
    still fails). The empty string encodes to no tokens.
    """
    if t.nfc:
        s = unicodedata.normalize("NFC", s)
    if t.spm and s:
        s = " " + s
    return s.encode("utf-8")


def test_encoding_oracle(tok):
    """For every corpus string, the concatenated bytes of its ids equal its text."""
    avoid = list(tok.special.values())
    if tok.spm:
        # SentencePiece (legacy) re-prepends ▁ after an added token, which is the tokenizer's quirk, not ours.
        avoid += list(tok.added_plain.values())
    strings = [s for s in corpus() if not any(a in s for a in avoid)]
    assert len(strings) >= 300
    if not tok.spm:
        # Byte-level tokenizers emit non-special added tokens verbatim: their content must round-trip.
        strings += [f"a {c} b{c}{c}\n" for c in tok.added_plain.values()]
    dv = tok.info.decoded_vocab
    for s in strings:
        ids = tok.hf.encode(s, add_special_tokens=False)
        got = b"".join(dv[i] for i in ids)
        assert got == _expected_bytes(tok, s), (s, ids)
    if not tok.spm:
        for tid in tok.added_plain:
            assert any(tid in tok.hf.encode(s, add_special_tokens=False) for s in strings), tid


def test_add_prefix_space_and_vocab_type(tok):
    assert tok.info.add_prefix_space == tok.spm
    expected = VocabType.BYTE_FALLBACK if tok.spm else VocabType.BYTE_LEVEL
    assert "byte-level" in tok.meta["type"] or tok.spm
    assert tok.info.vocab_type is expected


# ----------------------------------------------------------------------------------------------
# Every id against the tokenizer's own mapping
# ----------------------------------------------------------------------------------------------


def _gpt2_inverse_table() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def test_every_id_against_convert_ids_to_tokens(tok):
    """Each id's bytes, from the tokenizer's pieces decoded independently of our implementation."""
    info, hf = tok.info, tok.hf
    pieces = hf.convert_ids_to_tokens(list(range(tok.meta["vocab_size"])))
    inverse = _gpt2_inverse_table()
    byte_piece = re.compile(r"<0x([0-9A-Fa-f]{2})>")
    for i, piece in enumerate(pieces):
        if i in tok.special:
            expected = b""
        elif i in tok.added_plain:
            expected = tok.added_plain[i].encode()
        elif tok.spm:
            m = byte_piece.fullmatch(piece)
            expected = bytes.fromhex(m.group(1)) if m else piece.replace("\u2581", " ").encode()
        else:
            expected = bytes(inverse[c] for c in piece)
        assert info.decoded_vocab[i] == expected, (i, piece)


def test_every_id_against_the_decoder(tok):
    """Each id's bytes against the tokenizer's own decoder.

    Decoding ``[anchor, id]`` with anchor = the piece ``a`` keeps SentencePiece's decoder from
    stripping the token's leading space. Bytes that are not valid UTF-8 on their own decode to
    U+FFFD, so we compare with our bytes decoded the same lossy way, and check the raw bytes of
    byte tokens separately by decoding multi-byte characters from them.
    """
    info, backend = tok.info, tok.hf.backend_tokenizer
    anchor = backend.token_to_id("a")
    ids = [int(i) for i in tok.text_ids]
    decoded = backend.decode_batch([[anchor, i] for i in ids], skip_special_tokens=False)
    for i, text in zip(ids, decoded):
        assert text == "a" + info.decoded_vocab[i].decode("utf-8", errors="replace"), i

    if tok.spm:
        # Only byte tokens spell a single byte >= 0x80; found through our table, they must rebuild characters.
        by_byte = {b: i for i in ids if len(info.decoded_vocab[i]) == 1 and (b := info.decoded_vocab[i][0]) >= 0x80}
        assert set(by_byte) == set(range(0x80, 0x100)), "a byte token is missing"
        chars = [chr(c) for c in range(0x80, 0x800, 7)]
        chars += [chr(c) for c in range(0x800, 0x10000, 331) if not 0xD800 <= c < 0xE000]
        chars += [chr(c) for c in range(0x10000, 0x110000, 4099)]
        chars += ["\u00bf", "\u07ff", "\uffff", "\U0010ffff", "\U00040000"]
        lead_and_cont = set()
        for ch in chars:
            bs = ch.encode()
            lead_and_cont.update(bs)
            assert backend.decode([anchor] + [by_byte[b] for b in bs]) == "a" + ch
        assert lead_and_cont >= set(range(0x80, 0xC0)) | set(range(0xC2, 0xF5))


# ----------------------------------------------------------------------------------------------
# Stop, special and padding tokens against meta.json
# ----------------------------------------------------------------------------------------------


def test_special_and_stop_tokens_match_meta(tok):
    info, meta = tok.info, tok.meta
    assert info.special_token_ids == sorted(tok.special)
    assert info.special_token_names == {c: i for i, c in tok.special.items()}
    assert set(info.stop_token_ids) == set(meta["stop_token_ids"])
    for i in tok.special:
        assert info.decoded_vocab[i] == b"" and info.token_node[i] == -1
        assert info.token_kind[i] == TokenizerInfo.KIND_SPECIAL
        assert info.special_token_id(tok.special[i]) == i
    with pytest.raises(TokenizerError, match="no special token named"):
        info.special_token_id("<|definitely not a token|>")


@pytest.mark.parametrize("how", ["from_file_dir", "from_file_json", "raw_tokenizers"])
def test_stop_tokens_from_other_constructors(how):
    """from_file reads eos from tokenizer_config.json; a bare tokenizers.Tokenizer finds end tokens by name."""
    from tokenizers import Tokenizer

    for name in TOKENIZERS:
        d, meta = tokenizer_dir(name), tokenizer_meta(name)
        if how == "from_file_dir":
            info = TokenizerInfo.from_file(d)
        elif how == "from_file_json":
            info = TokenizerInfo.from_file(d / "tokenizer.json")
        else:
            info = TokenizerInfo.from_huggingface(Tokenizer.from_file(str(d / "tokenizer.json")))
        assert set(info.stop_token_ids) == set(meta["stop_token_ids"]), name
        assert info.vocab_size == meta["vocab_size"] and len(info.padding_ids) == 0


def test_padding_ids(tok):
    info, meta = tok.info, tok.meta
    expected = np.arange(meta["vocab_size"], meta["model_vocab_size"])
    assert np.array_equal(info.padding_ids, expected)
    assert {"phi3": 53, "qwen2": 271}.get(tok.name, 0) == len(expected)
    assert info.vocab_size == meta["model_vocab_size"] == len(info.decoded_vocab)
    assert len(info.token_offsets) == info.vocab_size + 1
    for i in expected:
        assert info.decoded_vocab[i] == b"" and info.token_node[i] == -1
        assert info.token_kind[i] == TokenizerInfo.KIND_PADDING
    # The flat byte arrays spell exactly decoded_vocab.
    assert info.token_bytes.tobytes() == b"".join(info.decoded_vocab)


def test_narrower_vocab_size_is_an_error(tok):
    n = tok.meta["vocab_size"]
    with pytest.raises(TokenizerError) as e:
        TokenizerInfo.from_huggingface(tok.hf, vocab_size=n - 1)
    assert str(n - 1) in str(e.value) and str(n) in str(e.value)


def test_vocab_type_override(tok):
    """Forcing RAW keeps pieces as their UTF-8 spelling (so byte-level 'Ġ' stays two bytes)."""
    info = TokenizerInfo.from_huggingface(tok.hf.backend_tokenizer, vocab_type="raw", stop_token_ids=[])
    assert info.vocab_type is VocabType.RAW and info.stop_token_ids == []
    piece = "\u2581" if tok.spm else "\u0120"
    tid = tok.hf.backend_tokenizer.token_to_id(piece)
    assert info.decoded_vocab[tid] == piece.encode() != tok.info.decoded_vocab[tid]


# ----------------------------------------------------------------------------------------------
# The trie on real vocabularies
# ----------------------------------------------------------------------------------------------


def _check_trie(info: TokenizerInfo, text_ids: np.ndarray) -> None:
    """Rebuild what every node spells with a plain Python DFS and compare with the arrays."""
    n = len(info.trie_byte)
    byte, depth, sub = info.trie_byte.tolist(), info.trie_depth.tolist(), info.trie_subtree.tolist()
    ptr, tids = info.trie_tok_ptr.tolist(), info.trie_tok_ids.tolist()
    assert depth[0] == 0 and sub[0] == n and ptr[0] == 0 and ptr[-1] == len(tids)
    spelled: list[bytes] = [b""]
    open_nodes: list[int] = [0]  # the path from the root to the previous node
    last_child_byte: dict[int, int] = {}
    seen: dict[int, bytes] = {}
    for i in range(1, n):
        while depth[open_nodes[-1]] >= depth[i]:
            j = open_nodes.pop()
            assert sub[j] == i - j, j
        parent = open_nodes[-1]
        assert depth[i] == depth[parent] + 1
        assert byte[i] > last_child_byte.get(parent, -1), "children must be sorted by byte, without duplicates"
        last_child_byte[parent] = byte[i]
        spelled[depth[i] :] = [spelled[depth[i] - 1] + bytes([byte[i]])]
        open_nodes.append(i)
        for k in range(ptr[i], ptr[i + 1]):
            seen[tids[k]] = spelled[depth[i]]
            assert info.token_node[tids[k]] == i
        if ptr[i] == ptr[i + 1]:
            assert sub[i] > 1, "a leaf must end a token"
    for j in open_nodes:
        assert sub[j] == n - j
    assert ptr[1] == 0, "no token is empty"
    assert sorted(seen) == sorted(text_ids.tolist())
    assert len(tids) == len(seen)
    for t, b in seen.items():
        assert b == info.decoded_vocab[t]
    assert info.max_token_len == max(depth)


def test_trie_structure(tok):
    _check_trie(tok.info, tok.text_ids)


def test_trie_find_spells_every_token(tok):
    info = tok.info
    for t in tok.text_ids[:: max(1, len(tok.text_ids) // 4000)]:
        node = trie_find(info.trie_byte, info.trie_subtree, np.frombuffer(info.decoded_vocab[t], np.uint8))
        assert node == info.token_node[t]


def test_tokens_with_prefix_against_brute_force(tok):
    info = tok.info
    rng = random.Random(7)
    text = [(int(t), info.decoded_vocab[t]) for t in tok.text_ids]
    prefixes = [b"", b" ", b"\xe4", b"\xf0\x9f", b'{"', b"\x00", b"zzzzzzzzzzzz", b" the"]
    for _ in range(25):
        b = rng.choice(text)[1]
        prefixes.append(b[: rng.randint(1, len(b))])
    prefixes += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 3))) for _ in range(10)]
    for p in prefixes:
        got = info.tokens_with_prefix(p)
        assert sorted(got.tolist()) == [t for t, b in text if b.startswith(p)], p
        assert len(set(got.tolist())) == len(got)


def _brute_force_dfa(decoded: list[bytes], ids, trans: np.ndarray, start: int) -> set[int]:
    """Run the DFA over every token at once, one byte position at a time (numpy, no trie)."""
    ids = np.asarray(ids)
    if len(ids) == 0:
        return set()
    lens = np.array([len(decoded[i]) for i in ids])
    mat = np.zeros((len(ids), max(lens.max(), 1)), np.uint8)
    for r, i in enumerate(ids):
        mat[r, : lens[r]] = np.frombuffer(decoded[i], np.uint8)
    state = np.full(len(ids), start, np.int64)
    for pos in range(mat.shape[1]):
        live = (pos < lens) & (state >= 0)
        state[live] = trans[state[live], mat[live, pos]]
    return set(ids[state >= 0].tolist())


def _dfas(rng: np.random.Generator) -> list[np.ndarray]:
    """A few DFAs (state x byte -> state or -1) with different shapes of rejected subtrees."""
    out = []
    json_str = np.full((1, 256), -1, np.int64)  # inside a JSON string: no quote, backslash or control
    json_str[0, 0x20:] = 0
    json_str[0, [0x22, 0x5C]] = -1
    out.append(json_str)
    digits = np.full((2, 256), -1, np.int64)  # an optional space, then digits
    digits[0, 0x20] = 1
    digits[0, 0x30:0x3A] = 1
    digits[1, 0x30:0x3A] = 1
    out.append(digits)
    out.append(np.where(rng.random((4, 256)) < 0.8, rng.integers(0, 4, (4, 256)), -1))
    return out


def test_dfa_walk_against_brute_force(tok):
    info = tok.info
    for trans in _dfas(np.random.default_rng(3)):
        for start in range(trans.shape[0]):
            out = np.zeros(info.vocab_size, np.bool_)
            trie_dfa_walk(
                info.trie_byte, info.trie_subtree, info.trie_depth, info.trie_tok_ptr, info.trie_tok_ids,
                info.max_token_len, trans, start, out,
            )
            assert set(np.flatnonzero(out).tolist()) == _brute_force_dfa(info.decoded_vocab, tok.text_ids, trans, start)


# ----------------------------------------------------------------------------------------------
# The raw constructor, property-based
# ----------------------------------------------------------------------------------------------

small_token = st.binary(min_size=0, max_size=5).map(lambda b: bytes(x % 4 * 60 for x in b))  # bytes 0, 60, 120, 180


@settings(max_examples=150, deadline=None)
@given(
    vocab=st.lists(small_token, min_size=1, max_size=40),
    extra=st.integers(0, 5),
    data=st.data(),
)
def test_raw_vocab_trie_property(vocab, extra, data):
    n = len(vocab)
    special = data.draw(st.sets(st.integers(0, n - 1), max_size=3))
    stop = data.draw(st.lists(st.integers(0, n - 1), max_size=2))
    info = TokenizerInfo(vocab, vocab_size=n + extra, special_token_ids=special, stop_token_ids=stop)
    # Empty tokens, stop tokens and the given special tokens are matched by id only.
    expected_special = set(special) | set(stop) | {i for i, b in enumerate(vocab) if not b}
    assert info.special_token_ids == sorted(expected_special)
    assert info.stop_token_ids == list(dict.fromkeys(stop))
    assert np.array_equal(info.padding_ids, np.arange(n, n + extra))
    text_ids = np.array([i for i in range(n) if i not in expected_special], np.int64)
    for i in range(n + extra):
        assert info.decoded_vocab[i] == (vocab[i] if i in set(text_ids.tolist()) else b"")
    _check_trie(info, text_ids)
    for p in [b"", b"\x00", b"<", b"\x00<", b"x"] + [v[:k] for v in vocab for k in range(len(v) + 1)]:
        assert sorted(info.tokens_with_prefix(p).tolist()) == [int(t) for t in text_ids if vocab[t].startswith(p)]
    row = st.lists(st.integers(-1, 2), min_size=256, max_size=256)
    trans = np.array(data.draw(st.lists(row, min_size=3, max_size=3)))
    out = np.zeros(info.vocab_size, np.bool_)
    trie_dfa_walk(
        info.trie_byte, info.trie_subtree, info.trie_depth, info.trie_tok_ptr, info.trie_tok_ids,
        info.max_token_len, trans, 0, out,
    )
    expected = _brute_force_dfa(info.decoded_vocab, text_ids, trans, 0) if len(text_ids) else set()
    assert set(np.flatnonzero(out).tolist()) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=20))
def test_byte_level_pieces_round_trip(raw):
    """Pieces written with transformers' GPT-2 table decode back to the bytes they were made from."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    pieces = ["".join(table[b] for b in r) for r in raw]
    info = TokenizerInfo(pieces, VocabType.BYTE_LEVEL)
    assert info.decoded_vocab == raw


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 255), st.text(min_size=1, max_size=5)), min_size=1, max_size=20))
def test_byte_fallback_pieces(items):
    pieces = [f"<0x{x:02X}>" if isinstance(x, int) else x for x in items]
    info = TokenizerInfo(pieces, "byte_fallback", add_prefix_space=True)
    assert info.add_prefix_space
    for x, got in zip(items, info.decoded_vocab):
        if isinstance(x, int):
            assert got == bytes([x])
        else:
            assert got == x.replace("\u2581", " ").encode()


def test_raw_str_and_names():
    info = TokenizerInfo(["a", "é", b"\xff", "<eos>", None, "▁x"], stop_token_ids=[3], vocab_size=8)
    assert info.decoded_vocab == [b"a", "é".encode(), b"\xff", b"", b"", "▁x".encode(), b"", b""]
    assert info.special_token_names == {"<eos>": 3} and info.stop_token_ids == [3]
    assert info.padding_ids.tolist() == [4, 6, 7]
    assert info.token_string(3) == "<special <eos>>" and info.token_string(4) == "<padding 4>"
    assert info.token_string(2) == repr(b"\xff")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(encoded_vocab=[]), "empty"),
        (dict(encoded_vocab=["a", "b"], vocab_size=1), "narrower"),
        (dict(encoded_vocab=["a", "b"], vocab_size="2"), "integer"),
        (dict(encoded_vocab=["a", "b"], stop_token_ids=[2]), r"outside \[0, 2\)"),
        (dict(encoded_vocab=["a", "b"], stop_token_ids=["1"]), "not an integer"),
        (dict(encoded_vocab=["a", None], stop_token_ids=[1]), "has no token"),
        (dict(encoded_vocab=["a", "b"], special_token_ids=[-1]), "outside"),
        (dict(encoded_vocab=["a", 3]), "token 1"),
        (dict(encoded_vocab=["a"], vocab_type="wordpiece"), "unknown vocab_type"),
    ],
)
def test_bad_input_raises_typed_error(kwargs, match):
    with pytest.raises(TokenizerError, match=match):
        TokenizerInfo(**kwargs)


def test_bad_sources_raise_typed_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        TokenizerInfo.from_file(tmp_path / "nothing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a loadable"):
        TokenizerInfo.from_file(tmp_path)
    with pytest.raises(TokenizerError, match="cannot read a vocabulary"):
        TokenizerInfo.from_huggingface(object())


def test_from_file_reads_model_configs(tmp_path):
    """A model folder's config.json sets the logits width and generation_config.json adds stop tokens."""
    src = tokenizer_dir("llama2")
    (tmp_path / "tokenizer.json").symlink_to(src / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").symlink_to(src / "tokenizer_config.json")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32100}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    info = TokenizerInfo.from_file(tmp_path)
    assert info.vocab_size == 32100 and info.padding_ids.tolist() == list(range(32000, 32100))
    assert set(info.stop_token_ids) == {1, 2}
    assert TokenizerInfo.from_file(tmp_path, vocab_size=32000, stop_token_ids=[2]).stop_token_ids == [2]


def test_fingerprint_tells_vocabularies_apart():
    a = TokenizerInfo(["a", "b", "c"])
    assert a.fingerprint == TokenizerInfo(["a", "b", "c"]).fingerprint
    assert a.fingerprint != TokenizerInfo(["a", "b", "d"]).fingerprint
    assert a.fingerprint != TokenizerInfo(["a", "b", "c"], stop_token_ids=[2]).fingerprint
    assert a.fingerprint != TokenizerInfo(["a", "b", "c"], vocab_size=4).fingerprint


# ----------------------------------------------------------------------------------------------
# Detection on small tokenizers built with the tokenizers library
# ----------------------------------------------------------------------------------------------


def _word_level(vocab: dict[str, int]):
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel(vocab=vocab, unk_token=next(iter(vocab))))


def test_detects_metaspace_as_byte_fallback_with_prefix_space():
    from tokenizers import pre_tokenizers

    t = _word_level({"<unk>": 0, "\u2581hi": 1, "<0x0A>": 2, "x": 3})
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.add_special_tokens(["<|im_end|>"])
    info = TokenizerInfo.from_huggingface(t)
    assert info.vocab_type is VocabType.BYTE_FALLBACK and info.add_prefix_space
    assert info.decoded_vocab == [b"<unk>", b" hi", b"\n", b"x", b""]
    assert info.stop_token_ids == [4] and info.special_token_names == {"<|im_end|>": 4}


def test_plain_vocab_is_raw_and_holes_are_padding():
    t = _word_level({"a": 0, "c": 2, "\u0120b": 3})
    with pytest.warns(UserWarning, match="no stop token"):
        info = TokenizerInfo.from_huggingface(t, vocab_size=6)
    assert info.vocab_type is VocabType.RAW and not info.add_prefix_space
    assert info.decoded_vocab[:4] == [b"a", b"", b"c", "\u0120b".encode()]
    assert info.padding_ids.tolist() == [1, 4, 5] and info.stop_token_ids == []
    assert info.token_node[1] == -1


def test_context_dependent_decoders_are_refused():
    from tokenizers import decoders

    t = _word_level({"a": 0, "##b": 1})
    t.decoder = decoders.WordPiece()
    with pytest.raises(TokenizerError, match="WordPiece"):
        TokenizerInfo.from_huggingface(t)
    assert TokenizerInfo.from_huggingface(t, vocab_type=VocabType.RAW, stop_token_ids=1).decoded_vocab == [b"a", b""]
