"""The ``stencil`` command line.

    stencil generate --schema examples/person.json --prompt "Give me a person as JSON."
    stencil generate --regex "[0-9]{3}-[0-9]{4}" --prompt "Give me a phone number." --json
    stencil compile --schema examples/person.json --tokenizer ../shared/tokenizers/llama3

Without ``--model`` the packaged default model runs, offline, on the CPU. User errors (a missing
file, an invalid schema, an unsupported keyword, a model that cannot be found) print one line on
stderr and exit with status 1 (2 for bad command-line usage); progress goes to stderr when it is a
terminal, so stdout carries only the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, Sequence

from stencil.errors import StencilError

__all__ = ["main"]


class _UserError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stencil", description="Structured generation and constrained decoding for LLMs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text constrained by a schema, grammar, regex or choices")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--schema", type=Path, metavar="FILE", help="JSON Schema file")
    which.add_argument("--grammar", type=Path, metavar="FILE", help="EBNF/GBNF or Lark grammar file")
    which.add_argument("--regex", metavar="R", help="regular expression the whole output must match")
    which.add_argument("--choices", metavar="A,B", help="comma-separated list of allowed outputs")
    g.add_argument("--model", metavar="PATH", help="local model folder or cached hub name (default: the packaged model)")
    g.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="tokenizer, if not the model's own")
    g.add_argument("--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    g.add_argument("--json", action="store_true", help="print a JSON object with text, value, finish reason and stats")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 is greedy (default: 0.7 for the packaged model, 1.0 otherwise)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P")
    g.add_argument("--top-k", type=int, default=0, metavar="K")
    g.add_argument("--seed", type=int, default=0, metavar="S")
    g.add_argument("--sampler", default="auto", choices=["auto", "mask", "awrs"])
    g.add_argument("--stop", action="append", default=None, metavar="STRING", help="stop string (repeatable)")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")

    c = sub.add_parser("compile", help="compile a schema, grammar or regex and report what came out")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--schema", type=Path, metavar="FILE")
    which.add_argument("--grammar", type=Path, metavar="FILE")
    which.add_argument("--regex", metavar="R")
    c.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="tokenizer folder / tokenizer.json / cached hub name (default: the packaged model's)")
    c.add_argument("--lenient", action="store_true", help="compile a superset instead of failing on unsupported keywords")
    return p


class _Status:
    """Progress on stderr, only when it is a terminal."""

    def __init__(self) -> None:
        self.on = sys.stderr.isatty()

    def step(self, what: str):
        status = self

        class _Step:
            def __enter__(self):
                self.t0 = time.perf_counter()
                if status.on:
                    print(f"{what} ...", end="", file=sys.stderr, flush=True)
                return self

            def __exit__(self, exc_type, *_):
                if status.on:
                    print(" done" if exc_type is None else " failed",
                          f"({time.perf_counter() - self.t0:.1f} s)", file=sys.stderr, flush=True)

        return _Step()


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise _UserError(f"cannot read {what} file {str(path)!r}: {e.strerror or e}") from e


def _read_schema(path: Path) -> Any:
    text = _read_text(path, "schema")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def _generate(args: argparse.Namespace) -> int:
    import torch

    from stencil.runtime.generate import default_model_path, generate, load_model

    constraint: dict[str, Any] = {}
    if args.schema is not None:
        constraint["schema"] = _read_schema(args.schema)
    elif args.grammar is not None:
        constraint["grammar"] = _read_text(args.grammar, "grammar")
    elif args.regex is not None:
        constraint["regex"] = args.regex
    elif args.choices is not None:
        choices = args.choices.split(",")
        if not all(choices):
            raise _UserError("--choices needs a comma-separated list of non-empty strings")
        constraint["choices"] = choices
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    default = args.model is None
    if default and not torch.cuda.is_available():
        # The packaged model is tiny: one intra-op thread is fastest (no thread barriers on small
        # matrices) and leaves a core to the grammar worker.
        torch.set_num_threads(1)
    status = _Status()
    with status.step(f"loading {'the packaged model' if default else args.model}"):
        model, tokenizer = load_model(args.model, args.tokenizer)
    if not args.raw and getattr(tokenizer, "chat_template", None):
        prompt = [{"role": "user", "content": prompt}]
    temperature = args.temperature if args.temperature is not None else (0.7 if default else 1.0)
    kwargs = dict(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, sampler=args.sampler, stop=args.stop, **constraint)
    if args.stream:
        stream = generate(model, prompt, stream=True, **kwargs)
        for piece in stream:
            print(piece, end="", flush=True)
        out = stream.result
        if not args.json:
            print(flush=True)
    else:
        with status.step("generating"):
            out = generate(model, prompt, **kwargs)
    if args.json:
        stats = asdict(out.stats)
        stats["checks_per_token"] = out.stats.checks_per_token
        print(json.dumps({"text": out.text, "value": out.value, "finish_reason": out.finish_reason,
                          "token_ids": out.token_ids, "model": str(args.model or default_model_path()),
                          "stats": stats}, ensure_ascii=False))
    elif not args.stream:
        print(out.text)
    if out.finish_reason == "length" and constraint:
        print(f"stencil: warning: stopped at --max-new-tokens {args.max_new_tokens} before the output was complete",
              file=sys.stderr)
    return 0


def _tokenizer_info(name: str | None):
    from stencil.grammar.vocab import TokenizerInfo
    from stencil.runtime.generate import default_model_path, load_tokenizer

    source = Path(name) if name else default_model_path()
    if source.exists():
        return TokenizerInfo.from_file(source), str(source)
    tok = load_tokenizer(name)
    return TokenizerInfo.from_huggingface(tok), name


def _compile(args: argparse.Namespace) -> int:
    from stencil.decode.bitmask import allocate_token_bitmask, unpack_bitmask
    from stencil.decode.matcher import GrammarMatcher
    from stencil.grammar.compiler import GrammarCompiler

    status = _Status()
    with status.step("loading the tokenizer"):
        info, tok_name = _tokenizer_info(args.tokenizer)
    compiler = GrammarCompiler(info)
    loosened: list[str] = []
    t0 = time.perf_counter()
    if args.schema is not None:
        schema = _read_schema(args.schema)
        what = f"JSON Schema {args.schema}"
        if isinstance(schema, dict) and isinstance(schema.get("title"), str):
            what += f" ({schema['title']!r})"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cg = compiler.compile_json_schema(schema, lenient=args.lenient)
        for w in caught:
            loosened += [line.strip() for line in str(w.message).splitlines()[1:] if line.strip()]
    elif args.grammar is not None:
        what = f"grammar {args.grammar}"
        cg = compiler.compile_grammar(_read_text(args.grammar, "grammar"))
    else:
        what = f"regex {args.regex!r}"
        cg = compiler.compile_regex(args.regex)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    with status.step("first token mask"):
        mask = allocate_token_bitmask(1, info.vocab_size)
        GrammarMatcher(cg).fill_next_token_bitmask(mask, 0)
    t_mask = time.perf_counter() - t0
    allowed = int(unpack_bitmask(mask[0], info.vocab_size).sum())
    g = cg.grammar
    print(f"compiled {what}")
    print(f"  grammar: {g.n_rules} rules, {g.n_states} automaton states")
    print(f"  tokenizer: {tok_name} ({info.vocab_size} token ids, {info.vocab_type.value})")
    print(f"  compile time: {t_compile * 1000:.1f} ms; first token mask: {t_mask * 1000:.1f} ms "
          f"({allowed} tokens allowed at the start)")
    if loosened:
        print(f"  unsupported keywords, loosened (--lenient): {len(loosened)}")
        for line in loosened:
            print(f"    {line}")
    elif args.schema is not None:
        print("  unsupported keywords: none")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stencil`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return _generate(args) if args.command == "generate" else _compile(args)
    except (StencilError, _UserError) as e:
        print(f"stencil: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stencil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
