"""Stage `plots_page`: the HTML template that lets `dvc plots show` and `dvc plots diff` work offline.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so without a network its
charts stay blank. This stage writes a page template with those libraries inlined, taken from
the vl-convert-python package that pip installed (nothing is downloaded). .dvc/config names it
as `plots.html_template`, and DVC fills its `{plot_divs}` with the plots. Writes:
  plots/page_template.html   about 1 MB, cached by DVC like any output

    python -m stages.plots_page
"""

import sys
from pathlib import Path

import vl_convert

from stages.errors import PipelineError, exits_cleanly
from stages.outputs import atomic_path

PAGE_TEMPLATE = Path("plots/page_template.html")
# DVC's plot templates are Vega-Lite 5 specs (its CDN page loads 5.2.0); 5.21 is the last 5.x vl-convert ships.
VEGA_LITE_VERSION = "5.21"
# What dvc-render replaces in a template; the bundle must contain none of them, nor end the script tag.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite {vega_lite} and vega-embed from vl-convert-python {vl_convert}, inlined: no network needed.
         It defines window.vega, window.vegaLite and window.vegaEmbed, which each plot's script calls. -->
    <script type="text/javascript">
(function () {
"use strict";  // the bundle is written as a module: strict, and its names stay out of the page's globals
@BUNDLE@
})();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
        /* dvc-render puts an image plot's revisions side by side at full size in a row that does not wrap,
           so all but the first hide behind a scrollbar: here they share the page's width, each at least
           480 px wide (the rest wrap below), scaled down to fit. */
        div[style*="white-space: nowrap"] {
            display: flex;
            flex-wrap: wrap;
            align-items: flex-start;
        }
        div[style*="white-space: nowrap"] > p {
            flex-basis: 100%;
        }
        div[style*="white-space: nowrap"] > div {
            flex: 1 1 0;
            min-width: 480px;
        }
        div[style*="white-space: nowrap"] img {
            max-width: 100%;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def vega_bundle(version=VEGA_LITE_VERSION):
    """Vega, Vega-Lite and vega-embed as one script that sets window.vega, window.vegaLite and window.vegaEmbed."""
    return vl_convert.javascript_bundle(vl_version=version)


def page_template(bundle):
    """The page with bundle inlined; {refresh_tag} and {plot_divs} are left for dvc-render to fill."""
    found = [text for text in (*PLACEHOLDERS, "</script") if text in bundle.lower()]
    if found:
        raise PipelineError(f"the Vega bundle contains {', '.join(found)}, which would break the page; not written")
    page = PAGE.replace("{vega_lite}", VEGA_LITE_VERSION).replace("{vl_convert}", vl_convert.__version__)
    return page.replace("@BUNDLE@", bundle)


def write_page_template(path, bundle):
    with atomic_path(path) as partial:
        partial.write_text(page_template(bundle), encoding="utf-8")


@exits_cleanly
def main():
    write_page_template(PAGE_TEMPLATE, vega_bundle())
    print(f"wrote {PAGE_TEMPLATE}: Vega-Lite {VEGA_LITE_VERSION} from vl-convert-python {vl_convert.__version__}")


if __name__ == "__main__":
    sys.exit(main())
