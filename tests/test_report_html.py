"""distill.report: the SVG charts, the HTML and Markdown report of a run, `compare_runs`, and the page in Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import tiny_recipe
from distill.errors import DistillError
from distill.report import plots
from distill.report.compare import compare_runs, load_run
from distill.report.html import curve_series, render_html, suite_rows, write_report
from distill.report.table import ROWS, format_table, lm_eval_rows

CANARY = '<img src="http://example.invalid/canary.png"> & "quotes"'


# ---------------------------------------------------------------- SVG builders


def _svg(text: str) -> ET.Element:
    """Parse a chart: it must be well-formed XML (so every label was escaped)."""
    return ET.fromstring(text)


def _plot_box(svg: ET.Element) -> tuple[float, float, float, float]:
    rect = next(e for e in svg.iter("rect") if e.get("class") == "plot-box")
    x, y = float(rect.get("x")), float(rect.get("y"))
    return x, y, x + float(rect.get("width")), y + float(rect.get("height"))


def _points(svg: ET.Element) -> list[tuple[float, float]]:
    return [(float(c.get("cx")), float(c.get("cy"))) for c in svg.iter("circle") if c.get("class") == "point"]


def _inside(points, box) -> bool:
    left, top, right, bottom = box
    return all(left <= x <= right and top <= y <= bottom for x, y in points)


def test_log_scale_is_monotone_and_even_per_decade():
    lo, hi = plots.log_domain([2e4, 1.3e8])
    scale = plots.Scale(lo, hi, 100.0, 500.0, log=True)
    values = [2e4, 1e5, 1e6, 1e7, 1e8, 1.3e8]
    pixels = [scale(v) for v in values]
    assert pixels == sorted(pixels) and len(set(pixels)) == len(pixels)
    decade = [scale(10.0 ** e) for e in range(5, 9)]
    gaps = [b - a for a, b in zip(decade, decade[1:])]
    assert max(gaps) - min(gaps) < 1e-6  # each decade is the same width
    ticks = scale.ticks()
    assert ticks == [1e5, 1e6, 1e7, 1e8] and all(lo <= t <= hi for t in ticks)
    assert plots.tick_labels(ticks) == ["100k", "1M", "10M", "100M"]


def test_linear_domain_covers_values_without_inventing_a_sign():
    for values in ([180, 27790], [0.5, 0.66, 0.74], [-5, -1], [3.0, 3.0], [0, 0]):
        lo, hi = plots.linear_domain(values)
        assert lo < hi and lo <= min(values) and hi >= max(values)
        if min(values) > 0:
            assert lo >= 0
    ticks = plots.linear_ticks(*plots.linear_domain([2.5, 2.5000001]))
    labels = plots.tick_labels(ticks)
    assert len(set(labels)) == len(labels)  # more digits where the ticks are close together


def test_scatter_points_land_inside_the_plot_box_on_a_log_axis():
    points = [plots.Point("teacher", 1.35e8, 100.0, "teacher"), plots.Point("a", 3.0e7, 78.0, "students"),
              plots.Point("b", 1.2e6, 41.0, "students"), plots.Point("zero", 0.0, 50.0, "students")]
    svg = _svg(plots.scatter_chart(points, title="q", x_label="params", y_label="%", log_x=True,
                                   y_reference=(100.0, "teacher")))
    drawn = _points(svg)
    assert len(drawn) == 3  # a zero cannot sit on a log axis: left out, not a crash
    assert _inside(drawn, _plot_box(svg))
    teacher, a, b = drawn  # drawn in the order given
    assert b[0] < a[0] < teacher[0]  # smaller models further left
    assert teacher[1] < a[1] < b[1]  # higher quality further up (SVG y grows downwards)
    labels = [t.text for t in svg.iter("text")]
    assert "100M" in labels and "params" in labels and "teacher" in labels  # tick, axis label, legend
    assert any(e.get("class") == "frontier" for e in svg.iter("polyline"))


def test_pareto_front_keeps_only_undominated_points():
    p = plots.Point
    points = [p("big", 100, 100, "t"), p("small-good", 10, 80, "s"), p("small-bad", 12, 40, "s"),
              p("tiny", 1, 20, "s"), p("same-size-worse", 10, 70, "s")]
    assert [q.label for q in plots.pareto_front(points)] == ["tiny", "small-good", "big"]


def test_line_chart_skips_missing_values_and_stays_in_the_box():
    series = [plots.Series("train", [(1, 5.0), (2, 4.0), (3, None), (4, float("nan")), (5, 2.0)]),
              plots.Series("eval", [(2, 4.5), (5, 3.0)]), plots.Series("empty", [])]
    svg = _svg(plots.line_chart(series, title="loss", x_label="step", y_label="loss"))
    box = _plot_box(svg)
    lines = [e for e in svg.iter("polyline") if e.get("class") == "series"]
    assert len(lines) == 2  # the empty series draws nothing
    coords = [tuple(map(float, pair.split(","))) for pair in lines[0].get("points").split()]
    assert len(coords) == 3 and _inside(coords, box)
    assert coords[0][0] < coords[1][0] < coords[2][0] and coords[0][1] < coords[2][1]  # loss falls: y pixel grows
    assert _inside(_points(svg), box)
    assert "no data" in plots.line_chart([], title="t", x_label="x", y_label="y")


def test_labels_are_escaped():
    hostile = '<script>alert("x")</script> & co'
    svg_text = plots.scatter_chart([plots.Point(hostile, 1.0, 2.0, hostile)], title=hostile, x_label=hostile,
                                   y_label=hostile)
    svg = _svg(svg_text)
    assert not list(svg.iter("script"))
    assert hostile in [t.text for t in svg.iter("text")]  # shown as text, literally
    assert "<script>" not in svg_text


def _calibration(shift: float) -> dict:
    bins = [{"lo": i / 10, "hi": (i + 1) / 10, "count": 10 * i, "confidence": (i + 0.5) / 10,
             "accuracy": max(0.0, (i + 0.5) / 10 - shift)} for i in range(10)]
    bins[3].update(count=0, confidence=None, accuracy=None)  # an empty bin has nothing to plot
    return {"ece": shift, "bins": bins}


def test_reliability_diagram_from_the_calibration_shape():
    svg = _svg(plots.reliability_diagram({"teacher": _calibration(0.02), "student": _calibration(0.15)}))
    drawn = _points(svg)
    assert len(drawn) == 2 * 8  # bins 0 (count 0) and 3 (empty) are skipped for each model
    assert _inside(drawn, _plot_box(svg))
    texts = [t.text for t in svg.iter("text")]
    assert "student (ECE 0.150)" in texts and "perfect calibration" in texts
    assert any(e.get("class") == "diagonal" for e in svg.iter("line"))


# ---------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_teacher_dir) -> Path:
    """A run trained and evaluated by the real pipeline functions on the fixture teacher."""
    from distill import stages
    from distill.recipe import recipe_from_dict

    base = tmp_path_factory.mktemp("report_run")
    data = base / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                        "response": f"The answer is {2 * i}."}) + "\n" for i in range(24)))
    recipe = recipe_from_dict(tiny_recipe(base / "run", tiny_teacher_dir, data, train={"steps": 4}))
    stages.prepare_run_dir(recipe)
    stages.train(recipe, progress=False)
    stages.evaluate(recipe, progress=False)
    return recipe.run_dir


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("student*", "checkpoints")))


def test_report_of_a_real_run(real_run, tmp_path):
    run = _copy(real_run, tmp_path, "run")
    path = write_report(run)
    assert path == run / "report.html"
    page, summary = path.read_text(), (run / "report.md").read_text()
    report = json.loads((run / "report.json").read_text())
    table = format_table(report)
    # the HTML table shows the CLI table's cells, not numbers of its own
    for row in ROWS:
        value = report["student"].get(row.key)  # reward_* rows: dpo runs only
        if value is not None:
            assert f">{row.fmt(value)}<" in page, row.key
    quality = report["ratios"]["quality_pct_of_teacher"]
    assert quality is not None and f"{quality:.1f}%" in page
    assert table in summary
    for title in ("total loss", "KD loss", "cross-entropy", "Quality vs parameters", "Quality vs decode latency"):
        assert f"<title>{title}</title>" in page, title
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"] in page for s in samples)
    assert "4 trained of 4" in page and "4 trained of 4" in summary
    assert 'class="missing"' not in page  # every core part is there
    assert "http://" not in page and "https://" not in page


def test_curves_take_every_numeric_key_and_pair_eval_with_train():
    metrics = [{"step": 1, "loss": 3.0, "kd": 1.0, "grad_norm": None, "eval_loss": 3.5},
               {"step": 2, "loss": 2.0, "kd": 0.5, "hidden": 0.1}, {"loss": 9.0}]
    curves = curve_series(metrics)
    assert list(curves) == ["loss", "kd", "hidden"]  # known names first; grad_norm was never a number
    assert curves["loss"] == {"train": [(1, 3.0), (2, 2.0)], "eval": [(1, 3.5)]}  # the line without a step is out


def test_half_finished_run_says_what_is_missing(real_run, tmp_path):
    run = _copy(real_run, tmp_path, "killed")
    (run / "report.json").unlink()
    (run / "samples.jsonl").unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 2.')  # a line cut short by a kill
    page = write_report(run).read_text()
    assert page.count('class="missing"') == 3  # table, Pareto charts, samples
    assert "No report.json" in page and "distill eval" in page and "No samples.jsonl" in page
    assert "<title>total loss</title>" in page and "1 unreadable line skipped" in page
    summary = (run / "report.md").read_text()
    assert "## Missing" in summary and "report.json" in summary and "## Teacher vs student" not in summary

    (run / "metrics.jsonl").unlink()  # killed before its first logged step
    page = write_report(run).read_text()
    assert "No metrics.jsonl" in page and "distill train" in page and "none trained yet" in page


def test_not_a_run_directory(tmp_path):
    with pytest.raises(DistillError, match="not a run directory"):
        write_report(tmp_path)
    with pytest.raises(DistillError, match="not found"):
        compare_runs([tmp_path / "absent"])


def test_broken_report_json_is_named_not_fatal(real_run, tmp_path):
    run = _copy(real_run, tmp_path, "broken")
    (run / "report.json").write_text('{"teacher": ')
    page = render_html(load_run(run))
    assert "report.json could not be read: not valid JSON (line 1" in page


def test_optional_sections_from_report_json(real_run, tmp_path):
    run = _copy(real_run, tmp_path, "extras")
    report = json.loads((run / "report.json").read_text())
    report["calibration"] = {"teacher": _calibration(0.02), "student": _calibration(0.15)}
    report["student"]["suites"] = {"arith <b>": {"add": 0.5, "mul": 0.25}}
    report["teacher"]["suites"] = {"arith <b>": {"add": 1.0}}
    report["judge"] = {"judge": "judge-model", "prompt": "Which is better?\n<A>{a}</A>", "win_rate": 0.35,
                       "wins": 30, "ties": 10, "losses": 60, "n": 100}
    report["lm_eval"] = {"version": "0.4.13", "tasks": "facts=f.jsonl:multiple_choice", "limit": None,
                         "num_fewshot": None,
                         "teacher": {"facts": {"acc": 0.8, "acc_stderr": 0.1, "n": 10}},
                         "student": {"facts": {"acc": 0.6, "acc_stderr": 0.15, "n": 10}}}
    (run / "report.json").write_text(json.dumps(report))
    page = write_report(run).read_text()
    for anchor in ("calibration", "suites", "lm_eval", "judge"):
        assert f'<section id="{anchor}">' in page, anchor
    assert "Reliability diagram" in page and "student (ECE 0.150)" in page
    assert "arith &lt;b&gt;" in page and "50.0%" in page  # escaped suite name; 0.5 / 1.0
    assert "Which is better?\n&lt;A&gt;{a}&lt;/A&gt;" in page and "35.0%" in page
    assert "student better: 30 (30.0%)" in page
    assert suite_rows(report) == [("arith <b>", "add", 1.0, 0.5), ("arith <b>", "mul", None, 0.25)]
    assert suite_rows({"suites": {"mmlu": {"math": 0.4}}}) == [("mmlu", "math", None, 0.4)]  # student's alone
    summary = (run / "report.md").read_text()
    assert "## Task suites" in summary and "student wins 35.0%" in summary
    assert "facts=f.jsonl:multiple_choice" in page and "75.0%" in page  # lm-eval: 0.6 / 0.8, the task spec shown
    assert lm_eval_rows(report) == [("facts", "acc", 0.8, 0.6, 10)]  # standard errors stay in the JSON
    assert "facts acc: teacher 0.800, student 0.600 (n = 10)" in format_table(report)
    assert "facts acc: teacher 0.800" in summary  # report.md carries the table


def test_compare_runs_and_pareto_across_runs(real_run, tmp_path):
    base, other = _copy(real_run, tmp_path, "base"), _copy(real_run, tmp_path, "wider")
    report = json.loads((other / "report.json").read_text())
    report["student"].update(params=123_456, decode_tokens_per_s=987.6)
    report["ratios"]["quality_pct_of_teacher"] = 55.5
    (other / "report.json").write_text(json.dumps(report))
    unevaluated = _copy(real_run, tmp_path, "unevaluated")
    (unevaluated / "report.json").unlink()

    text = compare_runs([base, other, unevaluated])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "student", "params"]
    wider = next(line for line in lines if line.startswith("wider"))
    assert "0.12" in wider and "987.6" in wider and "55.5%" in wider
    assert re.match(r"unevaluated\s+—", next(line for line in lines if line.startswith("unevaluated ")))
    assert "unevaluated: no report.json; run `distill eval`" in text

    page = write_report(base, out=tmp_path / "out" / "cmp.html", compare_with=[other, unevaluated]).read_text()
    assert (tmp_path / "out" / "cmp.md").is_file() and not (base / "report.html").exists()
    assert "other runs&#x27; students" in page and ">wider</text>" in page
    assert "unevaluated: no report.json, not plotted" in page


# ---------------------------------------------------------------- in a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def _chromium(page: Path, tmp_path: Path, tag: str) -> tuple[str, set[str]]:
    """(the DOM after loading, the http(s) URLs the page itself asked for) from headless Chromium's net log."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not on PATH: the page is not checked in a browser")
    net_log = tmp_path / f"{tag}-net.json"
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / (tag + '-profile')}",
                             f"--log-net-log={net_log}", "--dump-dom", page.resolve().as_uri()],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    events = json.loads(net_log.read_text())["events"]
    # the browser's own background traffic has no file:// page behind it; the page's requests do
    requested = {e["params"]["url"] for e in events if "url" in (e.get("params") or {})
                 and "file://" in str(e["params"].get("network_isolation_key", ""))
                 and not e["params"]["url"].startswith("file:")}
    return result.stdout, requested


def test_page_renders_in_chromium_without_fetching_anything(real_run, tmp_path):
    run = _copy(real_run, tmp_path, "browser")
    with (run / "samples.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": CANARY, "reference": "r", "teacher": "t", "student": "s"}) + "\n")
    dom, requested = _chromium(write_report(run), tmp_path, "report")
    assert requested == set()
    charts = re.findall(r'<svg class="plot"', dom)
    assert len(charts) >= 5  # total, KD and CE losses, lr, ..., and the two Pareto charts
    assert "<circle" in dom and "<polyline" in dom
    assert "&lt;img src=\"http://example.invalid/canary.png\"&gt;" in dom  # the sample is text, not an image
    assert "<img" not in dom

    # the check above can fail: a page that does load an outside image shows up in the same net log
    control = tmp_path / "control.html"
    control.write_text('<html><body><img src="http://example.invalid/control.png"></body></html>')
    _, requested = _chromium(control, tmp_path, "control")
    assert "http://example.invalid/control.png" in requested


# ---------------------------------------------------------------- hostile names in report.md

HOSTILE = '<img src=x onerror="alert(1)"> [link](http://example.invalid) *bold* | `code`'


def _outside_fences(markdown: str) -> str:
    """The Markdown text with fenced code blocks (shown verbatim by any renderer) cut out."""
    kept, fence = [], None
    for line in markdown.splitlines():
        opener = re.match(r"(`{3,})", line)
        if fence is None and opener:
            fence = opener.group(1)
        elif fence is not None and line.startswith(fence) and not line.strip("`"):
            fence = None
        elif fence is None:
            kept.append(line)
    return "\n".join(kept)


def test_report_md_shows_hostile_names_as_text(tmp_path):
    run = tmp_path / HOSTILE.replace("/", "_")
    run.mkdir()
    recipe = {"teacher": {"model": HOSTILE}, "student": {"model": f"org/{HOSTILE}"}, "method": {"kind": "sft"},
              "train": {"steps": 2}, "data": {"train": HOSTILE + "\n# a heading?\n<script>"}}
    (run / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5, HOSTILE: 1.0}) + "\n")
    (run / "samples.jsonl").write_text('{"prompt": ' + "\n")  # its problem message quotes nothing hostile, but is shown
    write_report(run, out=tmp_path / "out" / "report.html")
    summary = (tmp_path / "out" / "report.md").read_text()
    assert "<img" not in summary and "<script" not in summary
    assert not re.search(r"(?<!\\)\]\(", summary) and "\\[link\\](http" in summary  # no link, only its text
    assert "&lt;img src=x onerror=\"alert(1)\"&gt;" in summary  # the name is kept, as text
    assert "\\*bold\\*" in summary and "\\| \\`code\\`" in summary
    assert "\n# a heading" not in summary  # a newline in a value does not start a block
    assert "out/report.html" not in summary and "report.html beside this file" in summary

    # Suite and judge names also reach the table, which sits in a code fence: no backtick run in them closes it.
    report = {"teacher": {"suites": {HOSTILE: {"t": 1.0}}}, "student": {"suites": {HOSTILE: {"t": 0.5}}},
              "ratios": {}, "judge": {"judge": "```\n" + HOSTILE, "win_rate": 0.5, "judged": 2}}
    (run / "report.json").write_text(json.dumps(report))
    write_report(run)
    summary = (run / "report.md").read_text()
    outside = _outside_fences(summary)
    assert "<img" not in outside and "## Task suites" in outside and "student wins 50.0%" in outside
    assert format_table(report).rstrip("\n") in summary  # the table itself is kept verbatim inside the fence


def test_held_out_rows_are_a_second_line_and_counted_apart(tmp_path):
    """metrics.jsonl with train.eval_every rows ("split": "eval"): paired curves, the summary tells them apart."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "kd": 1.0, "ce": 2.0} for s in range(1, 5)]
    rows.insert(2, {"step": 2, "split": "eval", "eval_loss": 3.1, "eval_kd": 1.1, "eval_ce": 2.2,
                    "eval_agreement": 0.25})
    rows.append({"step": 4, "split": "eval", "eval_loss": 2.9, "eval_kd": 1.0, "eval_ce": 2.1,
                 "eval_agreement": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = curve_series(rows)
    assert curves["loss"] == {"train": [(1, 2.9), (2, 2.8), (3, 2.7), (4, 2.6)], "eval": [(2, 3.1), (4, 2.9)]}
    assert curves["agreement"] == {"eval": [(2, 0.25), (4, 0.5)]}
    page = write_report(run).read_text()
    assert "<title>top-1 agreement with the teacher</title>" in page and "held-out" in page
    assert "4 trained" in page
    summary = (run / "report.md").read_text()
    assert "4 logged steps; the last, step 4: loss 2.6" in summary
    assert "2 held-out evaluations; the last, step 4: eval\\_loss 2.9" in summary
