"""The ``stencil`` command line: results on stdout, one-line errors on stderr, exit codes.

Most cases call :func:`stencil.cli.main` in-process; one runs the real ``python -m stencil.cli``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from stencil.cli import main

REPO = Path(__file__).resolve().parents[1]
PERSON = REPO / "examples" / "person.json"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # `stencil generate` sets one thread for the packaged model


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_schema_json_output(capsys):
    code, out, err = run(capsys, "generate", "--schema", str(PERSON), "--prompt", "Give me a person as JSON.",
                         "--json", "--seed", "3")
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "stop"
    jsonschema.validate(result["value"], json.loads(PERSON.read_text()))
    assert result["value"] == json.loads(result["text"])
    assert result["stats"]["generated_tokens"] == len(result["token_ids"]) > 0


def test_generate_plain_text_regex_choices_and_grammar(capsys):
    code, out, _ = run(capsys, "generate", "--regex", "[0-9]{3}-[0-9]{4}", "--prompt", "Give me a phone number.")
    assert code == 0 and re.fullmatch(r"[0-9]{3}-[0-9]{4}\n", out)
    code, out, _ = run(capsys, "generate", "--choices", "yes,no", "--prompt", "Is rain wet?", "--temperature", "0")
    assert code == 0 and out in ("yes\n", "no\n")
    code, out, _ = run(capsys, "generate", "--grammar", str(REPO / "examples" / "arith.gbnf"), "--prompt",
                       "Write a sum of three numbers.", "--stream")
    assert code == 0 and re.fullmatch(r"[0-9+\-*/() ]+\n", out), out


def test_compile_reports_grammar_time_and_keywords(capsys, tmp_path):
    code, out, _ = run(capsys, "compile", "--schema", str(PERSON))
    assert code == 0
    assert "rules" in out and "compile time" in out and "unsupported keywords: none" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"code": {"type": "string", "pattern": "(?=x)y"}}}))
    code, out, err = run(capsys, "compile", "--schema", str(bad))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "/properties/code/pattern" in err and err.startswith("stencil: error:")
    code, out, _ = run(capsys, "compile", "--schema", str(bad), "--lenient")
    assert code == 0 and "/properties/code/pattern" in out
    code, out, err = run(capsys, "compile", "--regex", "(?=a)")
    assert code == 1 and out == "" and err.count("\n") == 1 and "position 0" in err


def test_user_errors_are_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--schema", str(tmp_path / "missing.json"), "--prompt", "x")
    assert code == 1 and out == "" and err.count("\n") == 1 and "missing.json" in err
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "object",')
    code, _, err = run(capsys, "generate", "--schema", str(broken), "--prompt", "x")
    assert code == 1 and err.count("\n") == 1 and "line 1" in err
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "no-model"), "--prompt", "x")
    assert code == 1 and err.count("\n") == 1 and "never downloads" in err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--regex", "a", "--choices", "a,b", "--prompt", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not allowed with" in err


def test_console_entry_point_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "stencil.cli", "generate", "--choices", "alpha,beta", "--prompt",
                           "Pick one.", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["text"] in ("alpha", "beta"), (proc.stdout, proc.stderr[-2000:])
