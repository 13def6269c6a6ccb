"""Measure the JSON Schema frontend on the official test suite and on MaskBench (JSONSchemaBench) dev.

    python scripts/json_schema_report.py suite              # per-file table of JSON-Schema-Test-Suite 2020-12
    python scripts/json_schema_report.py maskbench          # per-split counts on ../shared/jsonschemabench/dev
    python scripts/json_schema_report.py maskbench --split Github_easy --limit 100 --failures

Acceptance is decided by the byte-level recognizer on ``json.dumps`` output. With the default
``any_order=False`` the grammar fixes the order of declared properties, so an instance is tried in
every key order that the grammar's prefixes allow (a depth-first search that feeds the recognizer
and rolls back); with ``any_order=True`` the original order is used as is.

The functions here are also imported by ``tests/grammar/test_json_schema_suite.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stencil.decode.parser import Recognizer  # noqa: E402
from stencil.errors import StencilError  # noqa: E402
from stencil.grammar.json_schema import UnsatisfiableSchemaError, json_schema_to_grammar  # noqa: E402

SHARED = Path(os.environ.get("STENCIL_SHARED", REPO.parent / "shared"))
SUITE_DIR = SHARED / "json-schema-test-suite" / "draft2020-12"
BENCH_DIR = SHARED / "jsonschemabench" / "dev"


# ----------------------------------------------------------------------------------------------
# Serializing an instance in an order the grammar accepts
# ----------------------------------------------------------------------------------------------


class SearchBudget(Exception):
    """The key-order search gave up (too many orders to try)."""


@dataclass
class _Style:
    indent: int | None
    item_sep: str
    key_sep: str
    ensure_ascii: bool


STYLES = {
    "default": _Style(None, ", ", ": ", True),
    "compact": _Style(None, ",", ":", True),
    "indent2": _Style(2, ",", ": ", True),
}


def _feed(rec: Recognizer, text: str) -> bool:
    return rec.accept_bytes(text.encode("utf-8"))


def _serializations(rec: Recognizer, v: Any, st: _Style, level: int, budget: list[int]) -> Iterator[None]:
    """Yield once per serialization of ``v`` (key orders vary) that ``rec`` accepts; rolls back on resume."""
    budget[0] -= 1
    if budget[0] < 0:
        raise SearchBudget
    if isinstance(v, dict) and v:
        yield from _members(rec, v, list(v), st, level, True, budget)
    elif isinstance(v, list) and v:
        yield from _items(rec, v, 0, st, level, budget)
    else:
        text = json.dumps(v, ensure_ascii=st.ensure_ascii)
        if _feed(rec, text):
            yield
            rec.rollback_bytes(len(text.encode()))


def _open_sep(st: _Style, level: int, first: bool) -> str:
    if st.indent is None:
        return "" if first else st.item_sep
    return ("" if first else st.item_sep) + "\n" + " " * (st.indent * (level + 1))


def _close(st: _Style, level: int, bracket: str) -> str:
    return bracket if st.indent is None else "\n" + " " * (st.indent * level) + bracket


def _members(rec, v: dict, remaining: list, st: _Style, level: int, first: bool, budget) -> Iterator[None]:
    if first:
        if not _feed(rec, "{"):
            return
    if not remaining:
        close = _close(st, level, "}")
        if _feed(rec, close):
            yield
            rec.rollback_bytes(len(close.encode()))
    # Two passes: first only placements that leave every key that could come next now still able to
    # come next (with declared properties in a fixed order and the rest anywhere, that finds the
    # grammar's order greedily), then the others, so the search stays exhaustive.
    can_next = _viable(rec, remaining, st, level, first, budget)
    for safe_pass in (True, False):
        for k in remaining:
            pre = _open_sep(st, level, first) + json.dumps(k, ensure_ascii=st.ensure_ascii) + st.key_sep
            if not _feed(rec, pre):
                continue
            rest = [x for x in remaining if x != k]
            for _ in _serializations(rec, v[k], st, level + 1, budget):
                safe = set(_viable(rec, rest, st, level, False, budget)) >= (set(can_next) - {k})
                if safe == safe_pass:
                    yield from _members(rec, v, rest, st, level, False, budget)
            rec.rollback_bytes(len(pre.encode()))
    if first:
        rec.rollback_bytes(1)


def _viable(rec, keys: list, st: _Style, level: int, first: bool, budget) -> list:
    """The keys that could be the next member."""
    out = []
    for j in keys:
        budget[0] -= 1
        probe = _open_sep(st, level, first) + json.dumps(j, ensure_ascii=st.ensure_ascii) + st.key_sep
        if _feed(rec, probe):
            rec.rollback_bytes(len(probe.encode()))
            out.append(j)
    return out


def _items(rec, v: list, i: int, st: _Style, level: int, budget) -> Iterator[None]:
    if i == len(v):
        close = _close(st, level, "]")
        if _feed(rec, close):
            yield
            rec.rollback_bytes(len(close.encode()))
        return
    pre = ("[" if i == 0 else "") + _open_sep(st, level, i == 0)
    if not _feed(rec, pre):
        return
    for _ in _serializations(rec, v[i], st, level + 1, budget):
        yield from _items(rec, v, i + 1, st, level, budget)
    rec.rollback_bytes(len(pre.encode()))


def accepts(grammar, value: Any, style: str = "default", reorder: bool = True, budget: int = 20_000) -> bool:
    """True iff the grammar accepts ``value`` serialized in ``style`` (in some key order if ``reorder``).

    Raises :class:`SearchBudget` if the key-order search needs more than ``budget`` steps.
    """
    st = STYLES[style]
    rec = Recognizer(grammar)
    if not reorder:
        if st.indent is None:
            text = json.dumps(value, ensure_ascii=st.ensure_ascii, separators=(st.item_sep, st.key_sep))
        else:
            text = json.dumps(value, ensure_ascii=st.ensure_ascii, indent=st.indent)
        return rec.accept_bytes(text.encode()) and rec.is_accepting()
    b = [budget]
    for _ in _serializations(rec, value, st, 0, b):
        if rec.is_accepting():
            return True
    return False


# ----------------------------------------------------------------------------------------------
# JSON-Schema-Test-Suite
# ----------------------------------------------------------------------------------------------


def compile_schema(schema: Any, **kw) -> tuple[Any, str | None]:
    """(grammar or None, error class name or None). Unsatisfiable schemas return ("UNSAT", None)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return json_schema_to_grammar(schema, **kw), None
    except UnsatisfiableSchemaError:
        return "UNSAT", None
    except StencilError as e:
        return None, f"{type(e).__name__}: {e}"


def suite_files() -> list[Path]:
    return sorted(SUITE_DIR.glob("*.json"))


def run_suite_file(path: Path, failures: list | None = None) -> Counter:
    """Counts for one test-suite file: instances right/wrong in both order modes, compile errors.

    An instance is right when, in both modes (ordered with key-order search, any_order on the
    original order), the grammar accepts it exactly when it is valid. A schema the compiler proves
    unsatisfiable (UnsatisfiableSchemaError) rejects every instance.
    """
    out: Counter = Counter()
    for group in json.loads(path.read_text()):
        # The suite follows 2020-12's default vocabulary, where format is an annotation.
        g_ord, err1 = compile_schema(group["schema"], formats="annotate")
        g_any, err2 = compile_schema(group["schema"], any_order=True, formats="annotate")
        meta = group["schema"].get("$schema", "") if isinstance(group["schema"], dict) else ""
        if "localhost:1234" in meta or any(e and "outside this document (http://localhost:1234" in e for e in (err1, err2)):
            # Needs the suite's remotes/ documents (served at localhost:1234), which ../shared lacks.
            out["instances"] += len(group["tests"])
            out["needs_remotes"] += len(group["tests"])
            if failures is not None:
                failures.append((path.name, group["description"], "*", "needs remotes/"))
            continue
        for t in group["tests"]:
            out["instances"] += 1
            if err1 or err2:
                out["compile_error"] += 1
                if failures is not None:
                    failures.append((path.name, group["description"], t["description"], err1 or err2))
                continue
            gs = _Grammars(group["schema"], g_ord, formats="annotate")
            gs._free = g_any
            a1 = gs.accepts_valid(t["data"], "default") if t["valid"] else gs.accepts_invalid(t["data"], "default")
            a2 = False if g_any == "UNSAT" else accepts(g_any, t["data"], "default", reorder=False)
            ok = a1 == t["valid"] and a2 == t["valid"]
            out["right" if ok else "wrong"] += 1
            if not ok and failures is not None:
                failures.append((path.name, group["description"], t["description"],
                                 f"valid={t['valid']} ordered={a1} any_order={a2}"))
    return out


def suite_report(verbose: bool = False) -> dict[str, Counter]:
    table = {}
    fails: list = []
    for f in suite_files():
        table[f.stem] = run_suite_file(f, fails if verbose else None)
    total = Counter()
    print(f"| {'file':24} | {'instances':>9} | {'right':>6} | {'wrong':>6} | {'compile error':>13} | "
          f"{'needs remotes':>13} | {'right, of local':>15} |")
    print("|" + "---|" * 7)

    def row(name: str, c: Counter) -> None:
        local = c["instances"] - c["needs_remotes"]
        print(f"| {name:24} | {c['instances']:9d} | {c['right']:6d} | {c['wrong']:6d} | {c['compile_error']:13d} | "
              f"{c['needs_remotes']:13d} | {c['right'] / max(local, 1):15.1%} |")

    for name, c in table.items():
        total.update(c)
        row(name, c)
    row("**total**", total)
    print(f"\nright: {total['right']}/{total['instances']} = {total['right'] / total['instances']:.1%} of all instances, "
          f"{total['right'] / (total['instances'] - total['needs_remotes']):.1%} of those not needing remotes/")
    if verbose:
        for f in fails:
            print(" | ".join(f))
    return table


# ----------------------------------------------------------------------------------------------
# MaskBench (JSONSchemaBench) dev records
# ----------------------------------------------------------------------------------------------


def bench_records(split: str | None = None) -> list[dict]:
    files = [BENCH_DIR / f"{split}.jsonl"] if split else sorted(BENCH_DIR.glob("*.jsonl"))
    out = []
    for f in files:
        with f.open() as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    r["split"] = f.stem
                    out.append(r)
    return out


class _Grammars:
    """The ordered grammar of a schema, and its any_order twin compiled only when needed."""

    def __init__(self, schema: Any, ordered: Any, **kw) -> None:
        self.schema, self.ordered, self.kw, self._free = schema, ordered, kw, None

    def free(self) -> Any:
        if self._free is None:
            self._free, _ = compile_schema(self.schema, any_order=True, **self.kw)
        return self._free

    def accepts_valid(self, value: Any, style: str) -> bool | None:
        """Does some key order of ``value`` pass the ordered grammar? None if the search gave up."""
        if self.ordered == "UNSAT":
            return False
        try:
            return accepts(self.ordered, value, style)
        except SearchBudget:
            return None

    def accepts_invalid(self, value: Any, style: str) -> bool:
        """Does any key order of ``value`` pass the ordered grammar?

        The any_order grammar accepts every permutation of what the ordered one accepts, so when the
        exhaustive search is too long, its verdict on the original order settles the question.
        """
        if self.ordered == "UNSAT":
            return False
        try:
            return accepts(self.ordered, value, style, budget=300)
        except SearchBudget:
            free = self.free()
            return free != "UNSAT" and free is not None and accepts(free, value, style, reorder=False)


def run_record(rec: dict, failures: list | None = None) -> Counter:
    """Counts for one MaskBench record (compile; valid in compact+indent2 accepted; invalid rejected)."""
    c: Counter = Counter(schemas=1)
    t0 = time.perf_counter()
    g, err = compile_schema(rec["schema"])
    c["compile_ms"] += int(1000 * (time.perf_counter() - t0))
    if err:
        c["compile_error"] += 1
        if failures is not None:
            failures.append((rec["id"], "compile", err[:300]))
        return c
    c["compiled"] += 1
    gs = _Grammars(rec["schema"], g)
    for t in rec["tests"]:
        if t["valid"]:
            c["valid"] += 1
            for style in ("compact", "indent2"):
                ok = gs.accepts_valid(t["data"], style)
                if ok is None:
                    c["search_budget"] += 1
                elif not ok:
                    c["valid_rejected"] += 1
                    if failures is not None:
                        failures.append((rec["id"], f"valid rejected ({style})", json.dumps(t["data"])[:300]))
                    break
        else:
            c["invalid"] += 1
            if gs.accepts_invalid(t["data"], "compact"):
                c["invalid_accepted"] += 1
                if failures is not None:
                    failures.append((rec["id"], "INVALID ACCEPTED", json.dumps(t["data"])[:300]))
    return c


def maskbench_report(split: str | None = None, limit: int | None = None, show_failures: bool = False) -> dict:
    records = bench_records(split)
    if limit:
        records = records[:limit]
    per: dict[str, Counter] = defaultdict(Counter)
    fails: list = []
    t0 = time.time()
    for i, r in enumerate(records):
        n = len(fails)
        t1 = time.time()
        per[r["split"]].update(run_record(r, fails if show_failures else None))
        if time.time() - t1 > 30:
            print(f"  ... slow: {r['id']} took {time.time() - t1:.0f}s", file=sys.stderr, flush=True)
        for f in fails[n:]:
            print("FAIL | " + " | ".join(f), flush=True)
        if (i + 1) % 100 == 0:
            print(f"  ... {i + 1}/{len(records)} schemas, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    total = Counter()
    print(f"{'split':24} {'schemas':>7} {'compiled':>8} {'share':>7} {'valid':>6} {'rejected':>8} "
          f"{'invalid':>7} {'accepted':>8} {'budget':>6}")
    for name in sorted(per):
        c = per[name]
        total.update(c)
        print(f"{name:24} {c['schemas']:7d} {c['compiled']:8d} {c['compiled'] / c['schemas']:7.1%} {c['valid']:6d} "
              f"{c['valid_rejected']:8d} {c['invalid']:7d} {c['invalid_accepted']:8d} {c['search_budget']:6d}")
    c = total
    print(f"{'TOTAL':24} {c['schemas']:7d} {c['compiled']:8d} {c['compiled'] / max(c['schemas'], 1):7.1%} "
          f"{c['valid']:6d} {c['valid_rejected']:8d} {c['invalid']:7d} {c['invalid_accepted']:8d} {c['search_budget']:6d}")
    print(f"compile time: {c['compile_ms'] / 1000:.1f}s total; wall {time.time() - t0:.0f}s")
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["suite", "maskbench"])
    ap.add_argument("--split")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--failures", action="store_true", help="list every failing instance")
    args = ap.parse_args()
    if args.what == "suite":
        suite_report(args.failures)
    else:
        maskbench_report(args.split, args.limit, args.failures)


if __name__ == "__main__":
    main()
