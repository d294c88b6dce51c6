"""Report documents: wide figures get a row of their own at their own size (readable text)."""

from __future__ import annotations

import re

from milkit.evaluation.document import Document, Figure, Figures, to_html, to_markdown


def test_wide_figure_has_its_own_row_and_no_width_cap():
    doc = Document("t")
    doc.add(Figures([Figure("img/h.png", "heatmap", wide=True), Figure("img/r.png", "roc", 300)]))
    html = to_html(doc)
    assert '<figure class="wide"><a href="img/h.png"><img src="img/h.png" alt="heatmap">' in html
    assert '<figure><a href="img/r.png"><img src="img/r.png" width="300"' in html
    css = re.search(r"figure\.wide \{([^}]*)\}", html).group(1)
    assert "flex: 1 1 100%" in css  # a row of its own in the wrapping .figs row
    img_css = re.search(r"figure\.wide img \{([^}]*)\}", html).group(1)
    assert "max-height" in img_css and "width: auto" in img_css
    assert "![heatmap](img/h.png)" in to_markdown(doc)  # Markdown shows images at their size
