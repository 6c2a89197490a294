"""refnet reproduce: every registered script exists, and the summary renders safe tables."""

import importlib
import json

import pytest

from refnet.cli import main
from refnet.cli.reproduce import write_summary
from refnet.validation import SCRIPTS
from refnet.validation.common import check_row, md_cell


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_script_has_main(name):
    module = importlib.import_module(f"refnet.validation.{name}")
    assert callable(module.main)


def test_table_cells_are_escaped():
    assert md_cell("|a - b| <= 1\nnext") == "\\|a - b\\| <= 1 next"
    row = check_row({"name": "n", "paper": "|x|", "refnet": "1", "criterion": "c", "holds": False, "note": ""})
    assert row == "| n | \\|x\\| | 1 | c | **no** |"


def test_summary_gathers_results_and_marks_missing(tmp_path):
    d = tmp_path / "theory"
    d.mkdir()
    res = {"title": "T", "status": "done", "settings": {"mode": "quick"}, "seconds": 3.2,
           "checks": [{"name": "a", "paper": "1", "refnet": "1.0", "criterion": "|d| < 1", "holds": True, "note": ""}],
           "figures": [{"file": "f.png", "caption": "cap"}]}
    (d / "results.json").write_text(json.dumps(res))
    text = write_summary(tmp_path, ["theory", "lenet"]).read_text()
    assert "| [theory](#theory) | done (quick) | 1 hold, 0 do not | 3 s |" in text
    assert "| [lenet](#lenet) | not run |" in text
    assert "\\|d\\| < 1" in text and "![cap](theory/f.png)" in text


def test_reproduce_list_and_unknown_name(capsys):
    assert main(["reproduce", "--list"]) == 0
    assert "sg_gamma" in capsys.readouterr().out
    assert main(["reproduce", "nonsense"]) == 2
    assert "unknown script" in capsys.readouterr().err
