"""A tiny report document model rendered to both Markdown and self-contained HTML.

A report is a list of blocks (headings, paragraphs, tables, figure rows). Keeping one model and
two renderers means ``report.md`` and ``index.html`` always say the same thing. Image paths are
relative to the report folder, so the folder can be moved, zipped or served as is; the HTML
carries its own small stylesheet and loads nothing from the network.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from milkit.io.atomic import atomic_write_text

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; padding-bottom: .15em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr.emph td { font-weight: bold; background: #fafafa; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; max-width: 520px; }
figure.wide { flex: 1 1 100%; }
figure.wide img { width: auto; height: auto; max-height: 85vh; }
figure.wide figcaption { max-width: none; }
.note { color: #555; font-size: .9em; }
code { background: #f4f4f4; padding: 0 .25em; }
.pass { color: #17702a; font-weight: bold; }
.fail { color: #b00020; font-weight: bold; }
.warn { color: #9a6700; font-weight: bold; }
"""

_VERDICT_CLASS = {"PASS": "pass", "FAIL": "fail", "ERROR": "fail", "DID NOT LEARN": "warn"}

# The slide-level metrics every report shows, with their labels (one list for every report).
METRICS = (
    ("auc", "AUC"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("f1_macro", "F1 (macro)"),
)


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    """Plain text; ``code`` spans are written with backticks in both renderings."""

    text: str
    note: bool = False


@dataclass
class Table:
    """A table of already formatted cells; ``emph_rows`` are drawn bold (e.g. mean ± std)."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    emph_rows: frozenset[int] = frozenset()


@dataclass
class Figure:
    """An image; ``wide`` ones get a row of their own, shown at their own pixel size up to the
    page width (heatmaps, charts with text: a small copy of a large image has unreadable text)."""

    src: str  # path relative to the report folder, POSIX separators
    caption: str
    width: int | None = None  # display width in px (HTML only)
    wide: bool = False


@dataclass
class Figures:
    """A row of figures that wraps on narrow screens."""

    items: Sequence[Figure]


Block = Heading | Paragraph | Table | Figures


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


# ---------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    one_line = " ".join(str(text).splitlines())
    return one_line.replace("\\", "\\\\").replace("|", "\\|")


def to_markdown(doc: Document) -> str:
    """GitHub-flavoured Markdown of ``doc``."""
    out = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            out += ["#" * max(2, block.level) + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [f"*{block.text}*" if block.note else block.text, ""]
        elif isinstance(block, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append("|" + "|".join("---" for _ in block.header) + "|")
            for i, row in enumerate(block.rows):
                cells = [_md_cell(c) for c in row]
                if i in block.emph_rows:
                    cells = [f"**{c}**" if c else c for c in cells]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        elif isinstance(block, Figures):
            for fig in block.items:
                alt = _md_cell(fig.caption.replace("`", ""))
                out += [f"![{alt}]({fig.src})", "", f"*{fig.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------- html


def _inline(text: str) -> str:
    """Escape text and turn `code` spans into <code> elements."""
    parts = str(text).split("`")
    return "".join(
        f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts)
    )


def _cell(text: str) -> str:
    cls = _VERDICT_CLASS.get(str(text))
    body = _inline(text)
    return f'<td class="{cls}">{body}</td>' if cls else f"<td>{body}</td>"


def to_html(doc: Document) -> str:
    """A self-contained HTML page of ``doc`` (inline CSS, relative image links)."""
    body: list[str] = [f"<h1>{html.escape(doc.title)}</h1>"]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lvl = min(6, max(2, block.level))
            body.append(f"<h{lvl}>{_inline(block.text)}</h{lvl}>")
        elif isinstance(block, Paragraph):
            cls = ' class="note"' if block.note else ""
            body.append(f"<p{cls}>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            rows = ["<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in block.header) + "</tr>"]
            for i, row in enumerate(block.rows):
                cls = ' class="emph"' if i in block.emph_rows else ""
                rows.append(f"<tr{cls}>" + "".join(_cell(c) for c in row) + "</tr>")
            body.append("<table>\n" + "\n".join(rows) + "\n</table>")
        elif isinstance(block, Figures):
            figs = []
            for fig in block.items:
                width = f' width="{int(fig.width)}"' if fig.width else ""
                src = html.escape(fig.src, quote=True)
                cls = ' class="wide"' if fig.wide else ""
                figs.append(
                    f'<figure{cls}><a href="{src}"><img src="{src}"{width} '
                    f'alt="{html.escape(fig.caption.replace("`", ""), quote=True)}"></a>'
                    f"<figcaption>{_inline(fig.caption)}</figcaption></figure>"
                )
            body.append('<div class="figs">\n' + "\n".join(figs) + "\n</div>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def image_sources(doc: Document) -> list[str]:
    """Every image path the document links to (relative to the report folder)."""
    return [fig.src for b in doc.blocks if isinstance(b, Figures) for fig in b.items]


def write_document(doc: Document, folder: str | Path) -> tuple[Path, Path]:
    """Write ``index.html`` and ``report.md`` into ``folder`` (atomically); return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index, md = folder / "index.html", folder / "report.md"
    atomic_write_text(index, to_html(doc))
    atomic_write_text(md, to_markdown(doc))
    return index, md


__all__ = [
    "Document",
    "Figure",
    "Figures",
    "Heading",
    "Paragraph",
    "Table",
    "image_sources",
    "to_html",
    "to_markdown",
    "write_document",
]
