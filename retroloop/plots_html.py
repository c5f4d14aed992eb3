"""An HTML template for `dvc plots show` that renders offline.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without a network the
plots page is blank. This writes a template with the three libraries inlined (from the
`vl-convert-python` wheel, `vl_convert.javascript_bundle()`, ~0.9 MB), and without DVC's
`{scripts}` placeholder, so no `<script src="http...">` is emitted. `make plots` writes it to
`.dvc/plots-offline.html` (git-ignored), points `plots.html_template` at it in
`.dvc/config.local` and runs `dvc plots show`:

    python -m retroloop.plots_html .dvc/plots-offline.html
    dvc config --local plots.html_template plots-offline.html   # relative to .dvc/
    dvc plots show                                              # dvc_plots/index.html
"""

from __future__ import annotations

import sys
from pathlib import Path

from retroloop.errors import MissingExtraError

# DVC 3's templates declare Vega-Lite v5 ($schema .../vega-lite/v5.json): bundle the newest 5.x.
VEGA_LITE_MAJOR = "5"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline: Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {embed})</title>
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    """The page: DVC's placeholders `{refresh_tag}` and `{plot_divs}`, the libraries inline."""
    try:
        import vl_convert
    except ImportError:
        raise MissingExtraError(
            "offline plots need vl-convert-python (the Vega libraries): "
            "pip install 'retroloop[plots]' (make setup installs it)"
        ) from None
    versions = [v for v in vl_convert.get_vegalite_versions() if v.split(".")[0] == VEGA_LITE_MAJOR]
    version = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
    bundle = vl_convert.javascript_bundle(vl_version=version)
    # The bundle sits inside a <script> element and the page goes through DVC's str.replace of
    # `{name}` placeholders: neither may occur in it.
    for bad in ("</script", "{plot_divs}", "{refresh_tag}", "{scripts}"):
        assert bad not in bundle, f"the Vega bundle contains {bad!r}"
    page = (
        PAGE.replace("{vega}", vl_convert.get_vega_version())
        .replace("{vega_lite}", version)
        .replace("{embed}", vl_convert.get_vega_embed_version())
    )
    return page.replace("{bundle}", bundle)  # last: nothing is replaced inside the bundle


def write(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(offline_template(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else ".dvc/plots-offline.html")))
