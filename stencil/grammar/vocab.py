"""The vocabulary: every token id as exact bytes, its special and stop tokens, and the token trie.

A constrained decoder reasons about the *bytes* a token adds to the output, so the first job is to
turn each id into bytes, whatever way the tokenizer spells its pieces:

* ``BYTE_LEVEL`` (GPT-2, Llama-3, Qwen2): each piece is written with the GPT-2 byte-to-unicode
  alphabet (``Ġ`` is the space byte, ``Ċ`` is ``\\n`` ...); inverting that table gives the bytes.
* ``BYTE_FALLBACK`` (SentencePiece: Llama-2, Mistral, Phi-3): ``<0xHH>`` pieces are one raw byte,
  ``▁`` stands for a space, everything else is UTF-8 text.
* ``RAW``: pieces are the text itself (``str`` as UTF-8, or ``bytes`` as given).

Special tokens (bos, eos, chat markers, ...) are matched by id only; their spelling never matches
text, so they decode to ``b""`` here and are reachable from a grammar only by name
(:attr:`TokenizerInfo.special_token_names`). Stop tokens are always special. Ids the model's logits
have but the tokenizer lacks (a padded ``vocab_size``) are padding: never allowed.

The trie
--------
All other tokens (non-empty, not special, not padding) are stored once in a byte-sorted trie laid
out as flat arrays in depth-first preorder, so that a kernel can walk it as a branch-light loop:

* node 0 is the root (depth 0); the children of a node follow it, sorted by byte;
* ``trie_byte[i]``: the byte on the edge into node ``i`` (0 for the root);
* ``trie_depth[i]``: the number of bytes from the root to ``i`` (the length of its path);
* ``trie_subtree[i]``: the number of nodes in ``i``'s subtree, ``i`` included, so ``i + 1`` is
  the first child (when ``trie_subtree[i] > 1``) and ``i + trie_subtree[i]`` is the next node
  outside the subtree: skipping a rejected prefix is one addition;
* ``trie_tok_ptr[i] .. trie_tok_ptr[i + 1]`` index ``trie_tok_ids``: the token ids whose bytes are
  exactly the path to ``i`` (several ids may share bytes). Because nodes are in preorder, the
  tokens of a whole subtree are the contiguous slice ``trie_tok_ptr[i] .. trie_tok_ptr[i +
  trie_subtree[i]]``;
* ``token_node[t]``: the node of token ``t``, or -1 when ``t`` is not in the trie.

Walking it with per-depth state needs no explicit stack: at node ``i`` of depth ``d`` the state
after its parent is ``state[d - 1]``; store the new one in ``state[d]``. The next node visited is a
child (depth ``d + 1``) or lies at depth ``<= d``, whose parent state is already in place.
:func:`trie_dfa_walk` is that loop, and the model for the mask kernels.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numba
import numpy as np

from stencil.errors import TokenizerError

__all__ = [
    "VocabType",
    "TokenizerInfo",
    "trie_find",
    "trie_tokens_with_prefix",
    "trie_dfa_walk",
]

# Names of special tokens that end a turn or a document, in the tokenizers we know. When the caller
# gives no stop tokens we take the eos token plus any *special* added token with one of these
# names (a plain BPE piece spelled ``</s>``, as in Qwen2, is not a stop token).
_END_TOKEN_NAMES = frozenset(
    {
        "</s>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
    }
)

SPIECE_SPACE = "\u2581"  # '▁', SentencePiece's stand-in for a space


class VocabType(enum.Enum):
    """How a tokenizer spells its pieces (see the module docstring)."""

    RAW = "raw"
    BYTE_LEVEL = "byte_level"
    BYTE_FALLBACK = "byte_fallback"


@functools.cache
def _byte_level_decode_table() -> dict[int, str]:
    """``str.translate`` table from the GPT-2 byte alphabet back to latin-1 code points.

    GPT-2 keeps the 188 printable latin-1 bytes as themselves and moves the other 68 (controls,
    space, DEL, NBSP, soft hyphen ...) to U+0100 and up, in byte order. Code points below 256 that
    are *not* in the alphabet map to U+FFFF, so a piece that is not byte-level text fails the
    latin-1 encode instead of passing through unchanged.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    moved = 0x100
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[moved] = chr(b)
            table[b] = "\uffff"
            moved += 1
    return table


def _decode_pieces(pieces: list[str], vocab_type: VocabType) -> list[bytes]:
    """:func:`_decode_piece` over many pieces; byte-level ones go through one ``translate`` call."""
    if vocab_type is VocabType.BYTE_LEVEL:
        try:
            # Every byte-level character is one byte, so character offsets are byte offsets.
            data = "".join(pieces).translate(_byte_level_decode_table()).encode("latin-1")
        except UnicodeEncodeError:
            pass  # some piece is literal text: decode them one by one
        else:
            ends = list(itertools.accumulate(map(len, pieces)))
            return [data[a:b] for a, b in zip([0] + ends, ends)]
    return [_decode_piece(p, vocab_type) for p in pieces]


def _decode_piece(piece: str, vocab_type: VocabType) -> bytes:
    """The bytes a piece stands for. A piece outside its type's alphabet is literal text."""
    if vocab_type is VocabType.BYTE_LEVEL:
        try:
            return piece.translate(_byte_level_decode_table()).encode("latin-1")
        except UnicodeEncodeError:
            return piece.encode("utf-8")
    if vocab_type is VocabType.BYTE_FALLBACK:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes((int(piece[3:5], 16),))
            except ValueError:
                pass
        return piece.replace(SPIECE_SPACE, " ").encode("utf-8")
    return piece.encode("utf-8")


def _as_vocab_type(v: VocabType | str) -> VocabType:
    if isinstance(v, VocabType):
        return v
    if isinstance(v, str):
        for t in VocabType:
            if v.lower() in (t.value, t.name.lower()):
                return t
    raise TokenizerError(f"unknown vocab_type {v!r}; expected one of {[t.name for t in VocabType]}")


def _check_ids(ids: Iterable[int] | int | None, what: str, limit: int, limit_what: str) -> list[int]:
    """Distinct ids in first-seen order, each an integer in [0, limit); a single int is one id."""
    if ids is None:
        return []
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [ids]
    out: list[int] = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TokenizerError(f"{what}: {i!r} is not an integer token id")
        i = int(i)
        if not 0 <= i < limit:
            raise TokenizerError(f"{what}: id {i} is outside [0, {limit}) ({limit_what})")
        if i not in out:
            out.append(i)
    return out


class TokenizerInfo:
    """A tokenizer's vocabulary as exact bytes per id, with its special, stop and padding ids and trie.

    Attributes (read-only by convention; arrays are shared with the numba kernels):

    * ``vocab_size``: the logits width (>= the tokenizer's size); every per-token array has it.
    * ``tokenizer_size``: ids ``0 .. tokenizer_size - 1`` belong to the tokenizer.
    * ``decoded_vocab``: ``list[bytes]``, the exact bytes of each id; ``b""`` for special and padding.
    * ``vocab_type``, ``add_prefix_space``: how pieces were decoded; ``add_prefix_space`` is True when
      the tokenizer puts a ``▁`` before the text it encodes (so the first word's token starts with a
      space, which the detokenizer strips).
    * ``stop_token_ids``: ``list[int]``, the tokens that end generation (all special).
    * ``special_token_ids``: ``list[int]``, sorted: tokens matched by id only (includes the stop
      tokens and any token that decodes to no bytes).
    * ``special_token_names``: ``dict[str, int]``, spelling -> id of the special tokens, for grammars
      that name one explicitly.
    * ``padding_ids``: ``int32`` array of the ids that have no token (never allowed).
    * ``token_bytes`` (``uint8``) / ``token_offsets`` (``int64``, length ``vocab_size + 1``): the
      bytes of id ``t`` are ``token_bytes[token_offsets[t]:token_offsets[t + 1]]``.
    * ``token_kind``: ``uint8`` per id: :attr:`KIND_TEXT`, :attr:`KIND_SPECIAL` or :attr:`KIND_PADDING`.
    * The trie (module docstring): ``trie_byte`` (``uint8``), ``trie_depth``, ``trie_subtree``,
      ``trie_tok_ptr``, ``trie_tok_ids``, ``token_node`` (all ``int32``), and ``max_token_len``
      (the deepest node's depth, i.e. the longest text token in bytes).
    """

    KIND_TEXT = 0
    KIND_SPECIAL = 1
    KIND_PADDING = 2

    def __init__(
        self,
        encoded_vocab: Sequence[bytes | str | None],
        vocab_type: VocabType | str = VocabType.RAW,
        *,
        vocab_size: int | None = None,
        stop_token_ids: Iterable[int] | int | None = None,
        special_token_ids: Iterable[int] | None = None,
        add_prefix_space: bool = False,
    ):
        """Build from the tokenizer's pieces, indexed by id.

        ``encoded_vocab[i]`` is the piece of id ``i`` as the tokenizer spells it (what
        ``convert_ids_to_tokens`` returns): a ``str`` is decoded according to ``vocab_type``
        (a ``str`` outside that type's alphabet, e.g. an added token's content, is taken as
        literal UTF-8 text); ``bytes`` are taken as the token's exact bytes; ``None`` marks an id
        with no token (it becomes padding). For the ids in ``special_token_ids`` and
        ``stop_token_ids`` the entry is the token's name instead (what a grammar calls it).

        ``vocab_size`` is the model's logits width (default ``len(encoded_vocab)``); a narrower one
        raises :class:`TokenizerError`, a wider one makes the extra ids padding. ``stop_token_ids``
        default to none for a raw vocabulary.
        """
        vt = _as_vocab_type(vocab_type)
        n = len(encoded_vocab)
        if n == 0:
            raise TokenizerError("the vocabulary is empty")
        if vocab_size is None:
            vocab_size = n
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise TokenizerError(f"vocab_size must be an integer, got {vocab_size!r}")
        vocab_size = int(vocab_size)
        if vocab_size < n:
            raise TokenizerError(
                f"model vocab_size {vocab_size} is narrower than the tokenizer, which has {n} token ids "
                f"(0..{n - 1}); the model cannot produce ids {vocab_size}..{n - 1}. Pass the logits width "
                "(model.config.vocab_size), which must be at least the tokenizer's size."
            )
        holes = [i for i, p in enumerate(encoded_vocab) if p is None]
        hole_set = set(holes)
        stops = _check_ids(stop_token_ids, "stop_token_ids", n, f"the tokenizer has {n} tokens")
        specials = set(_check_ids(special_token_ids, "special_token_ids", n, f"the tokenizer has {n} tokens"))
        for what, ids in (("stop token", stops), ("special token", specials)):
            bad = sorted(hole_set.intersection(ids))
            if bad:
                raise TokenizerError(f"{what} id {bad[0]} has no token in the vocabulary")
        specials.update(stops)

        decoded: list[bytes] = [b""] * vocab_size
        str_ids: list[int] = []
        for i, piece in enumerate(encoded_vocab):
            if piece is None or i in specials:
                continue
            if isinstance(piece, str):
                str_ids.append(i)
            elif isinstance(piece, (bytes, bytearray, memoryview)):
                decoded[i] = bytes(piece)
            else:
                raise TokenizerError(f"token {i}: expected bytes, str or None, got {type(piece).__name__}")
        for i, b in zip(str_ids, _decode_pieces([encoded_vocab[i] for i in str_ids], vt)):
            decoded[i] = b
        # A token that adds no bytes cannot be constrained by text: match it by id only.
        specials.update(i for i, b in enumerate(decoded[:n]) if not b and i not in hole_set)

        names: dict[str, int] = {}
        for i in sorted(specials):
            piece = encoded_vocab[i]
            name = piece.decode("utf-8", "backslashreplace") if isinstance(piece, (bytes, bytearray)) else piece
            if isinstance(name, str) and name and name not in names:
                names[name] = i

        self.vocab_size: int = vocab_size
        self.tokenizer_size: int = n
        self.vocab_type: VocabType = vt
        self.add_prefix_space: bool = bool(add_prefix_space)
        self.decoded_vocab: list[bytes] = decoded
        self.stop_token_ids: list[int] = stops
        self.special_token_ids: list[int] = sorted(specials)
        self.special_token_names: dict[str, int] = names
        self.padding_ids: np.ndarray = np.array(holes + list(range(n, vocab_size)), dtype=np.int32)

        kind = np.full(vocab_size, self.KIND_TEXT, dtype=np.uint8)
        kind[np.array(self.special_token_ids, dtype=np.int64)] = self.KIND_SPECIAL
        kind[self.padding_ids] = self.KIND_PADDING
        self.token_kind: np.ndarray = kind

        lengths = np.fromiter((len(b) for b in decoded), dtype=np.int64, count=vocab_size)
        offsets = np.zeros(vocab_size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self.token_offsets: np.ndarray = offsets
        self.token_bytes: np.ndarray = np.frombuffer(b"".join(decoded), dtype=np.uint8).copy()

        text_ids = np.flatnonzero(kind == self.KIND_TEXT)
        # Python's sort on bytes is lexicographic and stable, so ties keep ascending ids.
        order = np.array(sorted(text_ids.tolist(), key=decoded.__getitem__), dtype=np.int32)
        (
            self.trie_byte,
            self.trie_depth,
            self.trie_subtree,
            self.trie_tok_ptr,
            self.trie_tok_ids,
            self.token_node,
        ) = _build_trie(self.token_bytes, self.token_offsets, order, vocab_size)
        self.max_token_len: int = int(self.trie_depth.max())
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------------------------------
    # Constructors from real tokenizers
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_huggingface(
        cls,
        tokenizer: Any,
        vocab_size: int | None = None,
        stop_token_ids: Iterable[int] | int | None = None,
        vocab_type: VocabType | str | None = None,
    ) -> "TokenizerInfo":
        """From a transformers fast tokenizer (``AutoTokenizer.from_pretrained``) or a ``tokenizers.Tokenizer``.

        The vocab type and ``add_prefix_space`` are read from the tokenizer's decoder, pre-tokenizer,
        normalizer and model; ``vocab_type`` overrides the detection. Without ``stop_token_ids``,
        the stop tokens are the eos token (transformers tokenizers only) plus the special tokens
        that end a turn in known chat formats (``<|eot_id|>``, ``<|im_end|>``, ``<|end|>``, ...).
        """
        return cls._from_backend(*_backend_of(tokenizer), vocab_size, stop_token_ids, vocab_type, ())

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        vocab_size: int | None = None,
        stop_token_ids: Iterable[int] | int | None = None,
        vocab_type: VocabType | str | None = None,
    ) -> "TokenizerInfo":
        """From a ``tokenizer.json`` file, or a folder holding one.

        From a folder it also reads, when present: ``tokenizer_config.json`` (its ``eos_token`` is
        a stop token), ``generation_config.json`` (its ``eos_token_id``, an id or a list, are stop
        tokens) and ``config.json`` (its ``vocab_size`` is the default logits width).
        """
        from tokenizers import Tokenizer

        p = Path(path)
        folder = p if p.is_dir() else None
        file = p / "tokenizer.json" if folder else p
        if not file.is_file():
            raise TokenizerError(f"{file} does not exist (expected a tokenizer.json or a folder holding one)")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises bare Exceptions
            raise TokenizerError(f"{file}: not a loadable tokenizer.json ({e})") from e

        eos_names: list[str] = []
        eos_ids: list[int] = []
        if folder is not None:
            cfg = _read_json(folder / "tokenizer_config.json")
            eos = cfg.get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                eos_names.append(eos)
            gen = _read_json(folder / "generation_config.json").get("eos_token_id")
            eos_ids.extend(gen if isinstance(gen, list) else [] if gen is None else [gen])
            if vocab_size is None:
                vocab_size = _read_json(folder / "config.json").get("vocab_size")
        for name in eos_names:
            tid = backend.token_to_id(name)
            if tid is None:
                raise TokenizerError(f"{folder}/tokenizer_config.json: eos_token {name!r} is not in the vocabulary")
            eos_ids.insert(0, tid)
        return cls._from_backend(backend, None, vocab_size, stop_token_ids, vocab_type, eos_ids)

    @classmethod
    def _from_backend(
        cls,
        backend: Any,
        hf: Any,
        vocab_size: int | None,
        stop_token_ids: Iterable[int] | int | None,
        vocab_type: VocabType | str | None,
        eos_ids: Sequence[int],
    ) -> "TokenizerInfo":
        pieces = backend.get_vocab(with_added_tokens=False)
        added = backend.get_added_tokens_decoder()
        n = max(max(pieces.values(), default=-1), max(added, default=-1)) + 1
        if hf is not None:
            n = max(n, len(hf))
        encoded: list[bytes | str | None] = [None] * n
        for piece, i in pieces.items():
            encoded[i] = piece
        special: set[int] = set()
        for i, tok in added.items():
            if tok.special:
                special.add(i)
                encoded[i] = tok.content
            else:
                # The detokenizer emits an added token's content verbatim, whatever the vocab type.
                encoded[i] = tok.content.encode("utf-8")
        if hf is not None:
            special.update(i for i in hf.all_special_ids if i is not None and 0 <= i < n)

        components = _components(backend)
        if vocab_type is None:
            vt = _detect_vocab_type(components, backend)
        else:
            vt = _as_vocab_type(vocab_type)
        add_prefix_space = vt is VocabType.BYTE_FALLBACK and _prepends_space(components)

        stops = stop_token_ids
        if stops is None:
            found = ([hf.eos_token_id] if hf is not None and hf.eos_token_id is not None else []) + list(eos_ids)
            found += sorted(i for i in special if i in added and added[i].content in _END_TOKEN_NAMES)
            stops = list(dict.fromkeys(found))
            if not stops:
                warnings.warn(
                    "no stop token found (no eos token, no known end-of-turn token); "
                    "pass stop_token_ids= or generation can only end by length",
                    stacklevel=3,
                )
        return cls(
            encoded,
            vt,
            vocab_size=vocab_size,
            stop_token_ids=stops,
            special_token_ids=special,
            add_prefix_space=add_prefix_space,
        )

    # ------------------------------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------------------------------

    def special_token_id(self, name: str) -> int:
        """The id of the special token spelled ``name``; :class:`TokenizerError` if there is none."""
        try:
            return self.special_token_names[name]
        except KeyError:
            known = sorted(self.special_token_names)
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise TokenizerError(f"no special token named {name!r} in this vocabulary (known: {shown})") from None

    def tokens_with_prefix(self, prefix: bytes) -> np.ndarray:
        """Ids (``int32``, in byte order) of the text tokens whose bytes start with ``prefix``."""
        return trie_tokens_with_prefix(
            self.trie_byte, self.trie_subtree, self.trie_tok_ptr, self.trie_tok_ids, np.frombuffer(prefix, np.uint8)
        )

    def token_string(self, token_id: int) -> str:
        """A readable spelling of a token for debugging: text tokens as a Python bytes literal."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside [0, {self.vocab_size})")
        kind = self.token_kind[token_id]
        if kind == self.KIND_PADDING:
            return f"<padding {token_id}>"
        if kind == self.KIND_SPECIAL:
            for name, i in self.special_token_names.items():
                if i == token_id:
                    return f"<special {name}>"
            return f"<special {token_id}>"
        return repr(self.decoded_vocab[token_id])

    @property
    def fingerprint(self) -> str:
        """A hash of everything that decides masks (bytes per id, kinds, stop tokens), for caches."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            for a in (self.token_offsets, self.token_bytes, self.token_kind, np.array(self.stop_token_ids, np.int64)):
                h.update(np.ascontiguousarray(a).tobytes())
                h.update(b"|")
            h.update(json.dumps(sorted(self.special_token_names.items())).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"TokenizerInfo(vocab_size={self.vocab_size}, tokenizer_size={self.tokenizer_size}, "
            f"vocab_type={self.vocab_type.name}, add_prefix_space={self.add_prefix_space}, "
            f"stop_token_ids={self.stop_token_ids}, special={len(self.special_token_ids)}, "
            f"padding={len(self.padding_ids)}, trie_nodes={len(self.trie_byte)})"
        )


# ----------------------------------------------------------------------------------------------
# Reading Hugging Face tokenizers
# ----------------------------------------------------------------------------------------------


def _backend_of(tokenizer: Any) -> tuple[Any, Any]:
    """(the ``tokenizers.Tokenizer``, the transformers tokenizer or None)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer, None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend, tokenizer
    raise TokenizerError(
        f"cannot read a vocabulary from {type(tokenizer).__name__}: expected a transformers fast tokenizer "
        "(with .backend_tokenizer) or a tokenizers.Tokenizer; for other tokenizers build "
        "TokenizerInfo(encoded_vocab, vocab_type, ...) from their pieces"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: unreadable JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _components(backend: Any) -> list[dict]:
    """The JSON of the normalizer, pre-tokenizer and decoder, flattened out of any Sequence."""
    out: list[dict] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                out.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for comp in (backend.normalizer, backend.pre_tokenizer, backend.decoder):
        if comp is not None:
            walk(json.loads(comp.__getstate__()))
    return out


def _detect_vocab_type(components: list[dict], backend: Any) -> VocabType:
    types = {c["type"] for c in components}
    if "ByteLevel" in types:
        return VocabType.BYTE_LEVEL
    if types & {"WordPiece", "CTC", "BPEDecoder"}:
        raise TokenizerError(
            f"the tokenizer's decoder ({sorted(types & {'WordPiece', 'CTC', 'BPEDecoder'})}) joins pieces with "
            "context-dependent rules, so its tokens have no fixed bytes; pass vocab_type= to force one"
        )
    spm = (
        getattr(backend.model, "byte_fallback", False)
        or "ByteFallback" in types
        or "Metaspace" in types
        or any(c["type"] == "Replace" and c.get("content") == SPIECE_SPACE for c in components)
    )
    return VocabType.BYTE_FALLBACK if spm else VocabType.RAW


def _prepends_space(components: list[dict]) -> bool:
    for c in components:
        if c["type"] == "Prepend" and c.get("prepend") == SPIECE_SPACE:
            return True
        if c["type"] == "Metaspace":
            scheme = c.get("prepend_scheme")
            if scheme in ("always", "first") or (scheme is None and c.get("add_prefix_space")):
                return True
    return False


# ----------------------------------------------------------------------------------------------
# The trie (numba)
# ----------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _build_trie(token_bytes, token_offsets, order, vocab_size):
    """Trie arrays from the text tokens ``order`` sorted by (bytes, id); see the module docstring.

    Sorted strings visit their trie in preorder, so each token adds the nodes for its bytes past
    its longest common prefix with the previous token, in order, and the token ids in sorted order
    already are the CSR payload.
    """
    m = order.shape[0]
    lcp = np.zeros(m, np.int64)
    total = 1
    max_len = 0
    for k in range(m):
        t = order[k]
        a0 = token_offsets[t]
        la = token_offsets[t + 1] - a0
        if k > 0:
            p = order[k - 1]
            b0 = token_offsets[p]
            lim = min(la, token_offsets[p + 1] - b0)
            c = 0
            while c < lim and token_bytes[a0 + c] == token_bytes[b0 + c]:
                c += 1
            lcp[k] = c
        total += la - lcp[k]
        max_len = max(max_len, la)

    trie_byte = np.zeros(total, np.uint8)
    trie_depth = np.zeros(total, np.int32)
    trie_subtree = np.zeros(total, np.int32)
    tok_node = np.zeros(m, np.int32)
    path = np.zeros(max_len + 1, np.int32)  # node at each depth along the current token's path
    n = 1
    for k in range(m):
        t = order[k]
        a0 = token_offsets[t]
        la = token_offsets[t + 1] - a0
        for d in range(lcp[k], la):
            trie_byte[n] = token_bytes[a0 + d]
            trie_depth[n] = d + 1
            path[d + 1] = n
            n += 1
        tok_node[k] = path[la]

    # A node's subtree ends at the first later node that is no deeper than it.
    open_nodes = np.zeros(max_len + 1, np.int32)
    top = -1
    for j in range(total):
        d = trie_depth[j]
        while top >= 0 and trie_depth[open_nodes[top]] >= d:
            trie_subtree[open_nodes[top]] = j - open_nodes[top]
            top -= 1
        top += 1
        open_nodes[top] = j
    while top >= 0:
        trie_subtree[open_nodes[top]] = total - open_nodes[top]
        top -= 1

    tok_ptr = np.zeros(total + 1, np.int32)
    for k in range(m):
        tok_ptr[tok_node[k] + 1] += 1
    for j in range(total):
        tok_ptr[j + 1] += tok_ptr[j]

    token_node = np.full(vocab_size, -1, np.int32)
    for k in range(m):
        token_node[order[k]] = tok_node[k]
    return trie_byte, trie_depth, trie_subtree, tok_ptr, order.copy(), token_node


@numba.njit(cache=True, nogil=True)
def trie_find(trie_byte, trie_subtree, prefix):
    """The node whose path spells ``prefix`` (``uint8`` array), or -1 if no text token starts with it."""
    node = 0
    for b in prefix:
        child = node + 1
        end = node + trie_subtree[node]
        found = -1
        while child < end:
            cb = trie_byte[child]
            if cb == b:
                found = child
                break
            if cb > b:  # children are sorted by byte
                break
            child += trie_subtree[child]
        if found < 0:
            return -1
        node = found
    return node


@numba.njit(cache=True, nogil=True)
def trie_tokens_with_prefix(trie_byte, trie_subtree, trie_tok_ptr, trie_tok_ids, prefix):
    """Ids of the text tokens whose bytes start with ``prefix``: one contiguous slice of ``trie_tok_ids``."""
    node = trie_find(trie_byte, trie_subtree, prefix)
    if node < 0:
        return trie_tok_ids[:0].copy()
    return trie_tok_ids[trie_tok_ptr[node] : trie_tok_ptr[node + trie_subtree[node]]].copy()


@numba.njit(cache=True, nogil=True)
def trie_dfa_walk(trie_byte, trie_subtree, trie_depth, trie_tok_ptr, trie_tok_ids, max_token_len, trans, start, out):
    """Mark in ``out`` (bool per id) every text token that a DFA can read whole from ``start``.

    ``trans[state, byte]`` is the next state, or -1 where the DFA rejects. A rejected node skips
    its whole subtree. This is the shape of the mask kernels: one state per depth, no stack.
    Returns the number of nodes visited.
    """
    state = np.empty(max_token_len + 1, np.int64)
    state[0] = start
    n = trie_byte.shape[0]
    visited = 0
    i = 1
    while i < n:
        d = trie_depth[i]
        s = trans[state[d - 1], trie_byte[i]]
        visited += 1
        if s < 0:
            i += trie_subtree[i]
            continue
        state[d] = s
        for k in range(trie_tok_ptr[i], trie_tok_ptr[i + 1]):
            out[trie_tok_ids[k]] = True
        i += 1
    return visited
