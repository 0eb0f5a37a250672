"""What `densitune plot` draws: the rows chosen by --where / --score / --density / -D, in every format, at column width.

The ε figure needs only the Parquet rows, so these rows are written directly (real Parquet files); the
figures re-scored from checkpoints are covered in tests/search/report/test_plots.py.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from test_report_summary import trial

from densitune.cli import main
from densitune.results.store import read_results
from densitune.search.report.plots import COLUMN_WIDTH, LINESTYLES, eps_figure, line_style, plot_results
from densitune.search.report.tables import search_frame


@pytest.fixture
def run(tmp_path):
    res = tmp_path / "run" / "results"
    for D in (4, 8):
        for eps in (0.0, 0.005, 0.01, 0.02, 0.05):
            trial(res, f"g{D}-{eps}", score="density", density="gmm_sum", eps=eps, val=0.8 + eps + D / 100, test=0.7, D=D)
            trial(res, f"k{D}-{eps}", score="density", density="kde", params='{"bandwidth": 0.5}', eps=eps,
                  val=0.7 + eps, test=0.6, D=D)
    trial(res, "m0", score="msp", eps=0.0, val=0.95, test=0.75)  # the overall best: not a density
    trial(res, "m1", score="msp", eps=0.01, val=0.9, test=0.75)
    return tmp_path / "run"


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _svg_texts(path) -> list[str]:
    """Every text element of an SVG written with svg.fonttype = none (text stays text)."""
    return ["".join(e.itertext()) for e in ET.parse(path).getroot().iter() if e.tag.endswith("}text")]


def test_every_format_is_written(run, tmp_path):
    out = tmp_path / "figs"
    paths = plot_results(run / "results", out, scores=False, formats=["png", "svg", "pdf", "svg"])
    assert sorted(p.name for p in paths) == ["auroc_vs_eps.pdf", "auroc_vs_eps.png", "auroc_vs_eps.svg"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    assert (out / "auroc_vs_eps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "auroc_vs_eps.pdf").read_bytes()[:5] == b"%PDF-"
    texts = _svg_texts(out / "auroc_vs_eps.svg")
    # readable legend: names, not JSON, no sentinel λ
    for label in ("D=4 gmm_sum", "D=8 gmm_sum", "D=4 kde bandwidth=0.5", "D=8 kde bandwidth=0.5"):
        assert label in texts, texts
    assert not any("{" in t or "lam=" in t or "nan" in t for t in texts)


def test_where_chooses_what_is_drawn(run, tmp_path, capsys):
    # default: the density score (the overall best trial is msp), every configuration
    assert main(["plot", str(run), "--no-scores", "--format", "svg", "--out", str(tmp_path / "all")]) == 0
    texts = _svg_texts(tmp_path / "all" / "auroc_vs_eps.svg")
    assert {"D=4 gmm_sum", "D=8 gmm_sum"} <= set(texts)
    # --where: only D = 8 gmm_sum rows, one curve
    assert main(["plot", str(run), "--no-scores", "--format", "svg", "--out", str(tmp_path / "w"),
                 "--where", "D = 8 AND density = 'gmm_sum'"]) == 0
    texts = _svg_texts(tmp_path / "w" / "auroc_vs_eps.svg")
    assert "D=8 gmm_sum" in texts and not any(re.match(r"D=4|.*kde", t) for t in texts)
    # --density / -D / --score do the same without SQL
    df = search_frame(read_results(run / "results"))
    assert main(["plot", str(run), "--no-scores", "--density", "kde", "-D", "4", "--out", str(tmp_path / "k")]) == 0
    assert main(["plot", str(run), "--no-scores", "--score", "msp", "--format", "svg", "--out", str(tmp_path / "m")]) == 0
    texts = _svg_texts(tmp_path / "m" / "auroc_vs_eps.svg")
    assert any("score=msp" in t for t in texts) and not any("gmm_sum" in t for t in texts)
    capsys.readouterr()
    # a selection with no rows is one clear error line
    assert main(["plot", str(run), "--no-scores", "--score", "gradnorm", "--out", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == "densitune: error: no search rows with score in ['gradnorm']"
    assert not (tmp_path / "none").exists()
    # the figure's own lines: one per configuration per panel (plus the best-trial star)
    fig = eps_figure(df[df["D"] == 8], "auroc", "e")
    assert _legend(fig) == ["D=8 gmm_sum", "D=8 kde bandwidth=0.5"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [3, 3]


@pytest.mark.parametrize("long_labels", [False, True])
def test_column_width_fonts_and_nothing_clipped(run, long_labels):
    df = search_frame(read_results(run / "results"))
    if long_labels:  # legend names such as "D=32 gmm_sum contrastive λ=0.1"
        df = df.assign(loss=np.where(df["trial_id"].str.contains("4-"), "contrastive", "ce"),
                       center_loss=np.where(df["trial_id"].str.contains("4-"), 0.1, np.nan))
    fig = eps_figure(df, "auroc", "an-experiment-with-a-rather-long-name")
    if long_labels:
        assert "D=4 gmm_sum contrastive λ=0.1" in _legend(fig)
    assert fig.get_figwidth() == pytest.approx(COLUMN_WIDTH)
    canvas = FigureCanvasAgg(fig)  # no pyplot
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize")) if t.get_text()
             and t.get_visible()]
    assert len(texts) > 10
    for t in texts:
        assert t.get_fontsize() >= 7, t.get_text()
        ext = t.get_window_extent(renderer)
        assert ext.x0 >= -0.5 and ext.y0 >= -0.5 and ext.x1 <= box.x1 + 0.5 and ext.y1 <= box.y1 + 0.5, t.get_text()


def test_line_styles_stay_distinct_beyond_ten_colours():
    styles = [line_style(i) for i in range(20)]
    assert len({(s["color"], s["ls"]) for s in styles}) == 20
    assert {s["ls"] for s in styles} == set(LINESTYLES)
