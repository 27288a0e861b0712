"""The tutorial of docs/python.md, run as it is written: its marked blocks, in order, in one
directory, against a KMS server set up as its set-up block says."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.csv as pacsv

from conftest import PPML_BIN, developers, sorted_rows

DOCS = Path(__file__).resolve().parents[2] / "docs" / "python.md"
PACKAGE = Path(__file__).resolve().parents[1]


def tutorial_blocks():
    text = DOCS.read_text()
    blocks = re.findall(r"<!-- tutorial -->\n```(python|sh)\n(.*?)```", text, re.S)
    assert len(blocks) == 4, "docs/python.md: the tutorial's four blocks"
    return blocks


def test_the_tutorial_runs_as_written(kms_server):
    work = kms_server.root / "tutorial"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(kms_server.env())
    env["PPML_SIM_PLATFORM_KEY"] = str(work / "sim-platform.pk8")
    env["PYTHONPATH"] = str(PACKAGE)
    env["PATH"] = os.pathsep.join([str(Path(PPML_BIN).parent), env.get("PATH", "")])
    printed = []
    for language, code in tutorial_blocks():
        command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euc", code]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{language} block failed:\n{code}\n{done.stderr}"
        printed.append(done.stdout)
    want = developers(pacsv.read_csv(work / "people.csv"))
    assert sorted_rows(pacsv.read_csv(work / "developers.csv")) == sorted_rows(want)
    assert "attested runtimes" in printed[-1], printed[-1]
