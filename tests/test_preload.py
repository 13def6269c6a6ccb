"""GrammarCompiler loads every numba kernel a compile and decode use when it is constructed.

Each case runs in a fresh interpreter (this one has loaded the kernels already) that records every
kernel of ours numba loads or compiles, and when: while the compiler is constructed, or afterwards,
while MaskBench schemas, a regex and a Lark grammar are compiled, real instances decoded token by
token and the background warm-up's first calls made. With ``load_kernels=True`` nothing may load
afterwards; with ``load_kernels=False`` the same workload must load kernels afterwards (else the
recording would prove nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, jsonschemabench_records, tokenizer_dir

_SCRIPT = r"""
import json, sys
import numba.core.dispatcher as dispatcher

phase = ["import"]
loads = {"import": [], "construct": [], "after": []}
compile_one = dispatcher.Dispatcher.compile

def recording(self, sig):
    if self.py_func.__module__.startswith("stencil"):
        loads[phase[0]].append(self.py_func.__qualname__)
    return compile_one(self, sig)

dispatcher.Dispatcher.compile = recording

import stencil as st
from tokenizers import Tokenizer

tok_dir, preload, cases = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
info = st.TokenizerInfo.from_file(tok_dir)
encode = Tokenizer.from_file(tok_dir + "/tokenizer.json")
phase[0] = "construct"
compiler = st.GrammarCompiler(info, warm_up=False, load_kernels=preload)
phase[0] = "after"
compiler.compile_regex(r"(foo|ba[rz])+\.txt")
compiler.compile_grammar('start: "a" start | "b"\n', syntax="lark")
bitmask = st.allocate_token_bitmask(1, info.vocab_size)
accepted = tokens = 0
for schema, text in cases:
    m = st.GrammarMatcher(compiler.compile_json_schema(schema))
    m.fill_next_token_bitmask(bitmask, 0)
    for t in encode.encode(text, add_special_tokens=False).ids:
        accepted += m.accept_token(t)
        tokens += 1
        m.fill_next_token_bitmask(bitmask, 0)
from stencil.decode.matcher import fill_next_token_bitmasks
fill_next_token_bitmasks([m, st.GrammarMatcher(m.compiled)], st.allocate_token_bitmask(2, info.vocab_size))
m.compiled.mask_cache.frontier()  # the background warm-up's first call (the thread is off here)
m.compiled.mask_cache.lookup_states()
print(json.dumps({"loads": loads, "accepted": accepted, "tokens": tokens}))
"""


# Large objects: decoding their instances grows a grammar's state-structure table.
_LARGE = ("Github_medium---o42286.json", "JsonSchemaStore---minecraft-dimension.json")


def _cases(n: int = 5) -> list[tuple[dict, str]]:
    """The first ``n`` MaskBench dev records that have a valid instance, and the large ones above."""
    out = []
    for rec in jsonschemabench_records():
        valid = [t["data"] for t in rec.get("tests", []) if t.get("valid")]
        if valid and (len(out) < n or rec["id"] in _LARGE):
            out.append((rec["schema"], json.dumps(valid[0])))
    assert len(out) == n + len(_LARGE)
    return out


def _run(preload: bool) -> dict:
    cases = _cases()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tokenizer_dir("llama3")), "1" if preload else "0",
                           json.dumps(cases)], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The instances were decoded for real: every token of every (valid) instance accepted.
    assert out["accepted"] == out["tokens"] > 100
    return out["loads"]


@pytest.mark.parametrize("preload", [True, False])
def test_kernels_load_at_construction(preload: bool) -> None:
    loads = _run(preload)
    if preload:
        assert loads["construct"], "constructing the compiler loaded no kernel"
        assert loads["after"] == [], f"kernels first loaded after construction: {loads['after']}"
    else:
        assert loads["construct"] == []
        assert len(loads["after"]) >= 10, loads["after"]
