"""The plots page template: Vega inlined so that `dvc plots show` renders without a network."""

import configparser
import json
import os
import re
import shutil
import subprocess

import pytest
import vl_convert
import yaml
from dvc_render import ImageRenderer, VegaRenderer, render_html
from PIL import Image

from stages.errors import PipelineError
from stages.plots_page import PAGE_TEMPLATE, VEGA_LITE_VERSION, page_template, write_page_template
from stages.report import page_colours
from tests.conftest import ROOT

BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # Debian's, Ubuntu's and Google's names for it
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


def browser():
    """Chromium's command, to open a page as a user would; a test that needs it is skipped without it, or fails
    where REQUIRE_BROWSER is set (as CI sets it: a skip there would pass unseen)."""
    found = next(filter(None, map(shutil.which, BROWSERS)), None)
    if found is None:
        message = "no Chromium to open the page with (apt-get install chromium)"
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


# Once the page has loaded: the window's width and each image's place, in the body for --dump-dom to show.
MEASURE = """<script>window.addEventListener("load", () => {
    const boxes = [...document.images].map(image => image.getBoundingClientRect());
    document.body.dataset.layout = JSON.stringify({window: window.innerWidth,
        tops: boxes.map(box => box.top), rights: boxes.map(box => box.right), widths: boxes.map(box => box.width)});
});</script>"""


def test_an_image_plots_revisions_share_the_pages_width(tmp_path):
    """dvc-render lays them out at full size in a row that does not wrap: the second would be off-screen."""
    Image.new("RGB", (1500, 600), "white").save(tmp_path / "figure.png")
    revisions = [{"rev": rev, "src": str(tmp_path / "figure.png")} for rev in ("HEAD", "exp-a")]
    write_page_template(tmp_path / "page.html", FAKE_BUNDLE)
    render_html([ImageRenderer(revisions, "plots/report/figure.png")], tmp_path / "index.html", tmp_path / "page.html")
    page = tmp_path / "index.html"
    page.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    command = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,800",
               "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    layout = json.loads(re.search(r'data-layout="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert max(layout["rights"]) <= layout["window"]  # none behind a scrollbar
    assert layout["tops"][0] == layout["tops"][1]  # side by side, to compare
    assert all(480 <= width < 600 for width in layout["widths"]), layout  # each scaled to half the page


def drawn_svg(data, template, **properties):
    """The SVG Vega draws for data with template, filled as DVC fills dvc.yaml's plots (templates from
    .dvc/plots, properties as dvc.yaml gives them), at the page's Vega-Lite version."""
    renderer = VegaRenderer(data, "plot", template=template, template_dir=str(ROOT / ".dvc" / "plots"), **properties)
    return vl_convert.vegalite_to_svg(renderer.get_filled_template(), vl_version=VEGA_LITE_VERSION)


def drawn_cells(pairs, template):
    """{(actual, predicted): count} of the cells Vega draws for a confusion matrix of (actual, predicted) pairs."""
    data = [{"actual": actual, "predicted": predicted, "rev": "workspace"} for actual, predicted in pairs]
    svg = drawn_svg(data, template, x="actual", y="predicted")
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


def drawn_lines(template, tries, revisions, epochs=3):
    """{(try, revision): (colour, dashes)} of the lines Vega draws for dvc.yaml's overlay of the tries' histories
    (plots/histories.csv, a column naming the try) over epochs 1..epochs, and every text it writes."""
    data = [{"try": name, "epoch": epoch, "val_acc": 50.0 + k + epoch, "rev": rev, "filename": "histories.csv"}
            for k, rev in enumerate(revisions) for name in tries for epoch in range(1, epochs + 1)]  # fmt: skip
    sources = [{"filename": "histories.csv", "field": "val_acc"}]
    svg = drawn_svg(data, template, x="epoch", y="val_acc", anchors_y_definitions=sources)
    lines = {}
    for label, colour, dashes in re.findall(r'aria-label="(epoch: 1;[^"]*)"[^>]*stroke="([^"]+)"[^>]*'
                                            r'stroke-dasharray="([^"]+)"', svg):  # fmt: skip
        fields = dict(part.split(": ", 1) for part in label.split("; "))  # the legend's titles name the fields
        lines[fields.get("try"), fields.get("revision", fields.get("rev"))] = colour, dashes
    return lines, re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def test_the_overlays_give_each_try_a_colour_and_each_revision_a_dash():
    overlays = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    templates = {next(iter(plot.values()))["template"] for plot in overlays if isinstance(plot, dict)}
    assert len(templates) == 1  # both overlays, accuracy and loss, use it
    tries, revisions = ["lenet", "lenet2", "airbench"], ["HEAD", "my-experiment"]
    lines, texts = drawn_lines(templates.pop(), tries, revisions)
    assert len(lines) == len(tries) * len(revisions)
    colour = {name: {lines[name, rev][0] for rev in revisions} for name, _ in lines}
    dashes = {rev: {lines[name, rev][1] for name, _ in lines} for rev in revisions}
    assert all(len(c) == 1 for c in colour.values()) and len({c.pop() for c in colour.values()}) == len(tries)
    assert all(len(d) == 1 for d in dashes.values()) and len({d.pop() for d in dashes.values()}) == len(revisions)
    assert set(tries) <= set(texts)  # the legend names the tries
    # DVC's own colours by revision only: its legend names the revisions and no try.
    _, their_texts = drawn_lines("linear", tries, revisions)
    assert set(revisions) <= set(their_texts) and not set(tries) & set(their_texts)


def test_the_reports_figures_give_each_try_the_colour_the_overlays_give_it():
    template = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"][0]["validation accuracy"]["template"]
    tries = ["lenet2_aug", "lenet", "mine", "airbench", "lenet2", "lenet-x", "Zeta", "_x"]  # "Z" < "_" < "a"
    lines, _ = drawn_lines(template, tries, ["HEAD"])
    assert page_colours(tries) == {name: colour for (name, _), (colour, _) in lines.items()}


def x_labels(template, epochs):
    """The x axis's labels Vega writes for two tries' history.csv over epochs 1..epochs."""
    _, texts = drawn_lines(template, ["lenet", "airbench"], ["HEAD"], epochs)
    return texts[: texts.index("epoch")]  # the labels come before the axis's title


@pytest.mark.parametrize("epochs", [1, 3, 12, 40])
def test_the_overlays_tick_whole_epochs(epochs):
    template = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"][0]["validation accuracy"]["template"]
    labels = x_labels(template, epochs)
    assert labels and all(label.isdigit() for label in labels), labels  # 0, 5, 10, ... at 40 epochs
    assert epochs > 12 or labels == [str(epoch) for epoch in range(1, epochs + 1)]  # every epoch where they fit


def test_dvc_s_own_template_ticks_between_epochs():
    assert "1.2" in x_labels("linear", 3)  # what the overlays' template mends
