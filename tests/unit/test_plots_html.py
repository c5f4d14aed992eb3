"""The offline `dvc plots show` template: the Vega libraries inline, nothing from a CDN."""

from __future__ import annotations

import re

from dvc_render.html import HTML
from dvc_render.vega import VegaRenderer

from retroloop.plots_html import offline_template


def test_the_page_dvc_renders_from_it_loads_no_script_from_the_network() -> None:
    template = offline_template()
    # What DVC does with it (dvc_render.html.render_html): its CDN <script> tags go to
    # `{scripts}`, which the offline template does not have.
    page = (
        HTML(template)
        .with_scripts(VegaRenderer.SCRIPTS)
        .with_element('<div id="p"><script>vegaEmbed("#p", {});</script></div>')
        .embed()
    )
    assert "cdn.jsdelivr" in VegaRenderer.SCRIPTS  # the default page would load these
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "vegaEmbed" in page and 'vegaEmbed("#p"' in page
    assert page.count("<script") == 2  # the bundle and the plot
