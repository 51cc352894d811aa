"""The plots page template: Vega inlined so that `dvc plots show` renders without a network."""

import configparser
import re

import pytest
import vl_convert
import yaml
from dvc_render import VegaRenderer, render_html

from stages.errors import PipelineError
from stages.plots_page import PAGE_TEMPLATE, VEGA_LITE_VERSION, page_template, write_page_template
from tests.conftest import ROOT

FAKE_BUNDLE = "window.vegaEmbed = function () {}; window.vega = {}; window.vegaLite = {};"


def external_scripts(html):
    return re.findall(r"""<script[^>]*\bsrc\s*=\s*["']?(?:https?:)?//[^>]*>""", html, re.I)


def render(directory, template):
    """The page dvc-render writes for one Vega plot, with template as DVC passes plots.html_template."""
    renderer = VegaRenderer([{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.7}], "acc", x="epoch", y="acc")
    render_html([renderer], directory / "index.html", template)
    return (directory / "index.html").read_text()


def test_the_template_inlines_the_bundle_and_leaves_dvc_the_plots(tmp_path):
    write_page_template(tmp_path / "page.html", FAKE_BUNDLE)
    html = render(tmp_path, tmp_path / "page.html")
    assert FAKE_BUNDLE in html and "vegaEmbed('#acc'" in html
    assert html.index(FAKE_BUNDLE) < html.index("vegaEmbed('#acc'")  # defined before the plot calls it
    assert external_scripts(html) == [] and "<meta charset=" in html
    assert len(external_scripts(render(tmp_path, None))) == 3  # DVC's own page: Vega from a CDN


@pytest.mark.parametrize("bad", ["a = '</script>';", "a = '{plot_divs}';", "a = '{scripts}';"])
def test_a_bundle_that_would_break_the_page_is_refused(tmp_path, bad):
    with pytest.raises(PipelineError, match="would break the page; not written"):
        write_page_template(tmp_path / "page.html", FAKE_BUNDLE + bad)
    assert not (tmp_path / "page.html").exists()


def test_dvc_config_names_the_template_the_stage_writes():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    template = (ROOT / ".dvc" / config["plots"]["html_template"]).resolve()
    assert template == (ROOT / PAGE_TEMPLATE).resolve()
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["plots_page"]
    assert stage["outs"] == [str(PAGE_TEMPLATE)]
    assert "{" + "scripts}" not in page_template(FAKE_BUNDLE)  # DVC's CDN tags would come back through it


def drawn_cells(pairs, template):
    """{(actual, predicted): count} of the cells Vega draws for a confusion matrix of (actual, predicted) pairs,
    filled as DVC fills dvc.yaml's plots (templates from .dvc/plots), at the page's Vega-Lite version."""
    data = [{"actual": actual, "predicted": predicted, "rev": "workspace"} for actual, predicted in pairs]
    renderer = VegaRenderer(data, "matrix", template=template, template_dir=str(ROOT / ".dvc" / "plots"),
                            x="actual", y="predicted")  # fmt: skip
    svg = vl_convert.vegalite_to_svg(renderer.get_filled_template(), vl_version=VEGA_LITE_VERSION)
    cells = re.findall(r'aria-label="actual: (\w+); predicted: (\w+); xy_count: (\d+)"', svg)  # each cell's label
    return {(actual, predicted): int(count) for actual, predicted, count in cells}


def test_a_confusion_matrix_keeps_a_class_that_is_never_predicted():
    # bird is actual twice and never predicted; cat and dog are both.
    pairs = [("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("dog", "dog"), ("bird", "dog"), ("bird", "cat")]
    counted = {("cat", "cat"): 1, ("cat", "dog"): 1, ("dog", "dog"): 2, ("bird", "dog"): 1, ("bird", "cat"): 1,
               ("dog", "cat"): 0}  # fmt: skip
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]
    template = stage["plots"][0]["plots/${key}/predictions.csv"]["template"]  # what the pipeline uses
    never_predicted = {(actual, "bird"): 0 for actual in ("bird", "cat", "dog")}
    assert drawn_cells(pairs, template) == counted | never_predicted  # 3 x 3
    assert drawn_cells(pairs, "confusion") == counted  # DVC's own: 3 actual x 2 predicted
