"""examples/report_after_training.py runs as a test."""

from __future__ import annotations

import runpy
from pathlib import Path

import relu_doctor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "report_after_training.py"


def test_example_writes_a_report_from_the_run_directory(tmp_path: Path, capsys) -> None:
    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    report = main(["--out", str(tmp_path), "--steps", "40"])
    out = capsys.readouterr().out
    assert report == tmp_path / "report.html" and report.is_file()
    assert f"Report: {report}" in out
    run = relu_doctor.load_run(tmp_path / "run")
    assert sorted(run.history["step"].unique()) == [10, 20, 30, 40]
    page = report.read_text(encoding="utf-8")
    assert 'id="rd-verdict"' in page and page.count("<img ") >= 3
    for site in run.history["site"].unique():
        assert f"<code>{site}</code>" in page
