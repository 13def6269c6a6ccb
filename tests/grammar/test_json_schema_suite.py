"""The JSON Schema frontend on real data: the official test suite and a fixed sample of MaskBench dev.

Both use the measuring code of ``scripts/json_schema_report.py`` (which prints the full tables).
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import sys
from collections import Counter

import pytest

from tests.conftest import REPO, jsonschemabench_records, shared_path

_spec = importlib.util.spec_from_file_location("json_schema_report", REPO / "scripts" / "json_schema_report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules["json_schema_report"] = report  # dataclasses look their module up while the class is built
_spec.loader.exec_module(report)

# Files whose keywords docs/json_schema.md claims as fully supported: every instance must be right.
CLAIMED = [
    "additionalProperties", "allOf", "anchor", "anyOf", "boolean_schema", "const", "contains", "content", "default",
    "dependentRequired", "enum", "exclusiveMaximum", "exclusiveMinimum", "format", "if-then-else",
    "infinite-loop-detection", "items", "maxContains", "maxItems", "maxLength", "maxProperties", "maximum",
    "minContains", "minItems", "minLength", "minProperties", "minimum", "not", "oneOf", "pattern", "patternProperties",
    "prefixItems", "properties", "propertyNames", "required", "type", "unevaluatedItems", "unevaluatedProperties",
    "dynamicRef",
]
SUITE_TARGET = 0.95


@pytest.fixture(scope="module")
def suite() -> dict[str, Counter]:
    shared_path("json-schema-test-suite", "draft2020-12")
    return {f.stem: report.run_suite_file(f) for f in report.suite_files()}


@pytest.mark.parametrize("name", CLAIMED)
def test_claimed_keywords_are_exact(suite, name):
    c = suite[name]
    assert c["instances"] - c["needs_remotes"] > 0
    assert c["right"] == c["instances"] - c["needs_remotes"], c


def test_suite_never_answers_wrongly(suite):
    """Wrong answers (not compile errors) are soundness or completeness bugs; there may be none."""
    assert sum(c["wrong"] for c in suite.values()) == 0


def test_suite_overall_share(suite):
    """At least 95% right of the instances whose schemas do not need the suite's remotes/ documents."""
    right = sum(c["right"] for c in suite.values())
    local = sum(c["instances"] - c["needs_remotes"] for c in suite.values())
    assert right / local >= SUITE_TARGET, (right, local)


def _sample(per_split: int, max_bytes: int = 40_000) -> list[dict]:
    """A fixed sample: in each split, the records with the smallest sha1(id) among schemas below
    ``max_bytes`` (the report script runs all of them, giants included)."""
    out = []
    for f in sorted(shared_path("jsonschemabench", "dev").glob("*.jsonl")):
        rs = [r for r in jsonschemabench_records(f.stem) if len(json.dumps(r["schema"])) < max_bytes]
        rs.sort(key=lambda r: hashlib.sha1(r["id"].encode()).hexdigest())
        out += rs[:per_split]
    return out


def test_maskbench_sample():
    records = _sample(per_split=6)
    total = Counter()
    for r in records:
        total.update(report.run_record(r))
    assert total["schemas"] >= 100
    assert total["invalid_accepted"] == 0, total
    assert total["compiled"] / total["schemas"] >= 0.90, total
    assert total["valid_rejected"] <= 0.005 * total["valid"], total
    assert total["search_budget"] == 0, total
