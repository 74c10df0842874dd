"""Every file a command writes on request, when it cannot be written (here /dev/full: every write
fails with ENOSPC, as on a full disk): one line naming it and exit code 1, never a traceback."""

from __future__ import annotations

import pytest

from backend.tools.conll import build_units, read_conll
from tests.conftest import cli_on_fake, gazetteer_for, wikigold_slice, write_config

FULL = "/dev/full"


@pytest.mark.parametrize("command, output", [
    ("compare", ["--json", FULL]),
    ("compare", ["--html", FULL]),
    ("simulate", ["--json", FULL]),
    ("predict-conll", ["--out", FULL]),
    ("predict-conll", ["--json", FULL]),
    ("doctor", ["--json", FULL]),
])
def test_an_unwritable_output_is_one_line_naming_it(tmp_path, llm, command, output):
    source = wikigold_slice(tmp_path, 2)
    llm.gazetteer = gazetteer_for(build_units(read_conll(source)), drop_label="MISC")
    arguments = {
        "compare": [str(source), "--config", str(write_config(tmp_path, "one", "LLM_MODEL=fake\n")), "--quiet"],
        "simulate": [str(source), "--schedule", "0,1", "--quiet"],
        "predict-conll": [str(source), "--quiet"] + ([] if "--out" in output else ["--out", str(tmp_path / "out.conll")]),
        "doctor": [],
    }[command]
    done = cli_on_fake(llm, tmp_path, command, *arguments, *output)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("llm-ner:")]
    assert len(errors) == 1 and FULL in errors[0] and "No space left on device" in errors[0], done.stderr
