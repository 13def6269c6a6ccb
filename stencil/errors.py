"""Typed errors. Every user-facing failure is one of these, and says what is wrong and where."""

from __future__ import annotations


class StencilError(Exception):
    """Base class of every error Stencil raises on purpose."""


class TokenizerError(StencilError, ValueError):
    """A tokenizer or vocabulary cannot be used as given (e.g. a model vocab narrower than the tokenizer)."""


class GrammarError(StencilError, ValueError):
    """A grammar is malformed. ``line``/``column`` (1-based) point into the grammar text when known."""

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None):
        self.message = message
        self.line = line
        self.column = column
        where = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(message + where)


class RegexError(GrammarError):
    """A regex is malformed or uses a construct Stencil cannot honour; ``position`` is a 0-based offset."""

    def __init__(self, message: str, *, pattern: str, position: int):
        self.pattern = pattern
        self.position = position
        StencilError.__init__(self, f"{message} at position {position} of regex {pattern!r}")
        self.message = message
        self.line = None
        self.column = None


class SchemaError(StencilError, ValueError):
    """A JSON Schema is invalid or uses a keyword that cannot be enforced exactly; ``pointer`` is its JSON pointer."""

    def __init__(self, message: str, *, pointer: str = ""):
        self.message = message
        self.pointer = pointer
        super().__init__(f"{message} at {pointer or '/'}")


class ParserLimitError(StencilError, RuntimeError):
    """The recognizer hit an explicit limit (items per row, total work) instead of stalling."""


class TokenSelectError(StencilError, ValueError):
    """Token-level sparse attention cannot run as asked: an invalid ``TokenSelectConfig`` (``field`` names the
    offending setting) or a model / attention call it does not support."""

    def __init__(self, message: str, *, field: str | None = None):
        self.message = message
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
