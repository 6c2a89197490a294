"""The validation scripts' Run (refnet/validation/common.py): units of work shown through the one
progress helper (a bar counting units, a line per unit done), or logged when there is no bar."""

import io
import logging
from types import SimpleNamespace

from refnet.validation import common


def make_run(tmp_path, progress):
    args = SimpleNamespace(out=str(tmp_path), mode="tiny", seed=0, data="digits", engine=None, fresh=True,
                           progress=progress)
    return common.Run("demo", args, "Demo")


def test_units_on_a_bar_with_a_line_per_unit(tmp_path, capsys):
    # planted bug seen failing: the bar not advanced after a unit
    buf = io.StringIO()
    run = make_run(tmp_path, buf)
    assert run._progress  # passed on to the scripts' training runs
    assert run.unit("a/seed0", lambda: 1) == 1 and run.unit("b/seed0", lambda: 2) == 2
    assert run.unit("a/seed0", lambda: 3) == 1  # done already: not computed, not counted
    assert run.finish() == 0
    out = buf.getvalue()
    assert "demo: a/seed0 done in" in out and "demo: b/seed0 done in" in out
    assert "demo 2 units" in out and "demo 3 units" not in out and out.endswith("\n")
    assert "demo: 0 checks hold" in capsys.readouterr().out  # the command's output stays on stdout


def test_units_logged_without_a_bar(tmp_path, capsys, caplog):
    # planted bug seen failing: the lines dropped when there is no bar
    with caplog.at_level(logging.INFO, logger="refnet.validation"):
        run = make_run(tmp_path, False)
        run.unit("a/seed0", lambda: 1)
        run.finish()
    assert not run._progress
    assert [r.getMessage()[:20] for r in caplog.records if r.name == "refnet.validation"] == ["demo: a/seed0 done i"]
    run = make_run(tmp_path, None)  # default: a bar only on a terminal, and pytest's stderr is not one
    run.unit("b/seed0", lambda: 1)
    run.finish()
    assert capsys.readouterr().err == ""
