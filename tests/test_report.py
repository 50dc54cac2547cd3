"""`bitnest report`: one HTML page with the quality table next to FP, perplexity vs bits (Pareto front, Mix'n'Match
points), the per-layer precision map and training curves — opened in headless Chromium, which must load every
figure."""
import json
import re
import shutil
import subprocess

import pytest

from bitnest.cli import main
from bitnest.report import _pareto


def test_pareto_front():
    pts = [(2.0, 50.0), (3.0, 40.0), (3.0, 45.0), (4.0, 41.0), (8.0, 30.0), (6.0, 35.0)]
    assert _pareto(pts) == [(2.0, 50.0), (3.0, 40.0), (6.0, 35.0), (8.0, 30.0)]


@pytest.fixture(scope="module")
def report_dir(ref10m_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    mq = root / "mq"
    assert main(["quantize", "--model", str(ref10m_path), "--method", "matquant", "--bits", "8,4,2", "-o", "steps=3",
                 "-o", "batch=2", "-o", "n_calib=2", "-o", "calib_len=32", "--out", str(mq), "--no-progress"]) == 0
    rtn = root / "rtn4"
    assert main(["quantize", "--model", str(ref10m_path), "--method", "rtn", "--bits", "4", "--group-size", "64",
                 "--out", str(rtn), "--no-progress"]) == 0
    out = root / "rep"
    assert main(["report", str(mq), str(rtn), "--out", str(out), "--limit", "2", "--data", "c4", "--budgets", "3",
                 "--tasks", "copa", "--task-limit", "10", "--no-progress"]) == 0
    return out


def test_report_files_and_rows(report_dir):
    data = json.loads((report_dir / "report.json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows)[0] == "FP" and rows["FP"]["bits_per_weight"] == 16
    assert {"mq @int8", "mq @int4", "mq @int2", "mq @mix≤3", "rtn4"} <= set(rows)
    assert rows["mq @int8"]["bits_per_weight"] > rows["mq @int4"]["bits_per_weight"] > rows["mq @int2"]["bits_per_weight"]
    assert rows["mq @mix≤3"]["bits_per_weight"] <= 3.0
    assert all(r["ppl_c4"] > 1 and 0 <= r["tasks"]["copa"]["acc"] <= 1 for r in rows.values())
    assert rows["mq @int2"]["ppl_c4"] > rows["FP"]["ppl_c4"]
    pngs = sorted(p.name for p in report_dir.glob("*.png"))
    assert "ppl_vs_bits.png" in pngs and any(p.startswith("training_") for p in pngs)  # MatQuant QAT has a curve
    assert sum(p.startswith("layers_") for p in pngs) >= 3  # mq, its mix, rtn4
    md = (report_dir / "report.md").read_text()
    assert md.count("![") == len(pngs) and "| FP |" in md


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    page = (report_dir / "report.html").resolve()
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    n_png = len(list(report_dir.glob("*.png")))
    m = re.search(r'data-figures-loaded="(\d+)"', dom)
    assert m, dom[:500]
    assert int(m.group(1)) == n_png and dom.count("<img") == n_png  # every figure decoded by the browser
    shot = tmp_path / "shot.png"
    subprocess.run(args + [f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000  # a page with a table and plots, not a blank one


def test_report_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    for argv in (["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
                 ["report", str(tmp_path), "--out", str(tmp_path / "full")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("bitnest: error:") and err.count("\n") == 1
    assert (tmp_path / "full" / "x").read_text() == "keep me"
