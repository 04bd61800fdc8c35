"""The course as a static website, built with nbconvert from the committed notebooks.

    python -m minimodels.course book [--out build/book]     # or: make book

Pages: the README as the front page (``index.html``), then for each chapter its lecture, its
exercise notebook and its solutions, in that order, each with a table of contents in a side
bar and previous / next links. Outputs and plots are shown as committed (PNGs embedded in the
pages). A widget cannot run without a kernel: the page shows its saved state instead (the
controls' values and the plot its Output widget held when the notebook was executed) with a
note to open the notebook in JupyterLab. Source files and Markdown files the notebooks link to
(``kernels/scan.py``, ``kernels/BENCHMARKS.md``) become pages too, so every internal link
resolves. Nothing is downloaded while building; reading the maths needs MathJax, which the
pages load from its CDN (without a network the formulas show as TeX).

The rendering is nbconvert's (``HTMLExporter``, ``lab`` template); this module only adds a
template block for the navigation and two preprocessors (static widgets, links to pages).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter
from nbconvert.preprocessors import Preprocessor

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
HREF = re.compile(r"""(href=["'])([^"'\s]+)(["'])""")
BACKTICKED_PAGE = re.compile(r"`((?:chapters|exercises|solutions)/[\w.-]+\.ipynb)`")
SECTIONS = ("chapters", "exercises", "solutions")
LABELS = {"chapters": "lecture", "exercises": "exercises", "solutions": "solutions"}

TEMPLATE = r"""
{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block extra_css %}
<style type="text/css">
  body.jp-Notebook { margin: 0; padding: 0; }
  nav.book-toc { position: fixed; top: 0; left: 0; bottom: 0; width: 250px; overflow-y: auto;
    padding: 16px; box-sizing: border-box; border-right: 1px solid #ddd; background: #fafafa;
    font-family: var(--jp-ui-font-family); font-size: 13px; }
  nav.book-toc a { text-decoration: none; color: #1a5fb4; }
  nav.book-toc .book-title { font-weight: bold; font-size: 15px; display: block;
    margin-bottom: 12px; }
  nav.book-toc ol { padding-left: 0; list-style: none; margin: 0; }
  nav.book-toc li { margin: 8px 0; }
  nav.book-toc li .book-sub { padding-left: 12px; font-size: 12px; }
  nav.book-toc .book-current { font-weight: bold; color: #000; }
  main a code, main a { color: #1a5fb4; }
  main { margin-left: 260px; padding: 16px 24px; max-width: 1100px; }
  .book-pager { display: flex; justify-content: space-between; margin: 24px 0;
    padding-top: 12px; border-top: 1px solid #ddd; font-family: var(--jp-ui-font-family); }
  .book-widget-note { border-left: 4px solid #e5a50a; background: #fff8e1; padding: 6px 10px;
    font-family: var(--jp-ui-font-family); font-size: 13px; }
</style>
{% endblock extra_css %}
{%- block body_header -%}
<body class="jp-Notebook" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<nav class="book-toc" aria-label="table of contents">
  <a class="book-title" href="{{ resources.book.home }}">{{ resources.book.title }}</a>
  <ol>
  {%- for entry in resources.book.toc %}
    <li><a href="{{ entry.href }}"{% if entry.current %} class="book-current"{% endif %}
      >{{ entry.title }}</a>
    {%- for sub in entry.subs %}
      <div class="book-sub"><a href="{{ sub.href }}"
        {%- if sub.current %} class="book-current"{% endif %}>{{ sub.title }}</a></div>
    {%- endfor %}</li>
  {%- endfor %}
  </ol>
</nav>
<main>
{{ pager(resources.book) }}
{%- endblock body_header -%}
{% block body_footer %}
{{ pager(resources.book) }}
</main>
</body>
{% endblock body_footer %}
{%- macro pager(book) -%}
<div class="book-pager">
  <span>{% if book.prev %}<a rel="prev" href="{{ book.prev.href }}"
    >&larr; {{ book.prev.title }}</a>{% endif %}</span>
  <span>{% if book.next %}<a rel="next" href="{{ book.next.href }}"
    >{{ book.next.title }} &rarr;</a>{% endif %}</span>
</div>
{%- endmacro -%}
"""


@dataclass
class Page:
    source: Path  # repository-relative: README.md, chapters/03_rwkv.ipynb, kernels/scan.py
    title: str

    @property
    def target(self) -> Path:
        if self.source.name == "README.md" and self.source.parent == Path("."):
            return Path("index.html")
        if self.source.suffix == ".ipynb":
            return self.source.with_suffix(".html")
        return self.source.with_name(self.source.name + ".html")


def _href(from_page: Path, to_page: Path) -> str:
    return Path(os.path.relpath(to_page, from_page.parent)).as_posix()


def _title(nb: dict, fallback: str) -> str:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return re.sub(r"[*_`]", "", line[2:]).strip()
    return fallback


class StaticWidgets(Preprocessor):
    """Each widget output becomes what its saved state shows: the controls with their values and
    the outputs of its Output widgets, under a note that it is interactive in JupyterLab."""

    def preprocess(self, nb, resources):
        state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        self.state = state
        nb, resources = super().preprocess(nb, resources)
        nb.metadata.pop("widgets", None)  # no widget JavaScript in the page
        return nb, resources

    def _walk(self, model_id: str, controls: list[str], outputs: list, seen: set) -> None:
        if model_id in seen or model_id not in self.state:
            return
        seen.add(model_id)
        model = self.state[model_id]
        name, st = model.get("model_name", ""), model.get("state", {})
        if name == "OutputModel":
            outputs.extend(st.get("outputs", []))
        elif name in ("HTMLModel", "LabelModel"):
            if st.get("value"):
                controls.append(st["value"] if name == "HTMLModel" else html.escape(st["value"]))
        elif name.endswith("ProgressModel"):
            controls.append(f"<progress value='{st.get('value', 0)}' max='{st.get('max', 100)}'>"
                            "</progress>")
        elif "value" in st or "index" in st:
            value = st.get("value")
            if value is None and "_options_labels" in st and st.get("index") is not None:
                value = st["_options_labels"][st["index"]]
            controls.append(f"{html.escape(str(st.get('description', '')))} "
                            f"<b>{html.escape(str(value))}</b>")
        for child in st.get("children", []):
            self._walk(str(child).removeprefix("IPY_MODEL_"), controls, outputs, seen)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, resources
        new = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                new.append(out)
                continue
            controls, outputs = [], []
            self._walk(view.get("model_id", ""), controls, outputs, set())
            interactive = bool(outputs) or any("<b>" in c for c in controls)
            parts = []
            if interactive:
                parts.append("<div class='book-widget-note'>Interactive in the notebook: "
                             "shown here as saved. Open it in JupyterLab (<code>make lab</code>) "
                             "to move the controls.</div>")
            if controls:
                parts.append("<div>" + " &nbsp; ".join(controls) + "</div>")
            if not parts:
                parts.append("<div class='book-widget-note'>A widget: open the notebook in "
                             "JupyterLab (<code>make lab</code>) to see it.</div>")
            new.append(nbformat.v4.new_output(
                "display_data", data={"text/html": "\n".join(parts)}))
            new.extend(nbformat.from_dict(o) for o in outputs)
        cell.outputs = new
        return cell, resources


class PageLinks(Preprocessor):
    """Links to the course's notebooks and files point at their pages; ``wanted`` collects the
    linked files that need a page of their own."""

    def __init__(self, source: Path, pages: dict[Path, Page], root: Path, wanted: set, **kw):
        super().__init__(**kw)
        self.source, self.pages, self.root, self.wanted = source, pages, root, wanted

    def _rewrite(self, m: re.Match, repo_relative: bool = False) -> str:
        url = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith(("#", "/")):
            return m.group(0)
        path, _, fragment = url.partition("#")
        folder = Path(".") if repo_relative else self.source.parent
        target = Path(os.path.normpath(folder / path))
        if target.parts[:1] == ("..",) or not (self.root / target).is_file():
            return m.group(0)  # not a file of the course: the link check reports it
        page = self.pages.get(target)
        if page is None:
            page = Page(target, target.as_posix())
            self.wanted.add(target)
        href = _href(Page(self.source, "").target, page.target)
        return f"{m.group(1)}{href}{'#' + fragment if fragment else ''}{m.group(3)}"

    def _markdown(self, text: str) -> str:
        text = LINK.sub(self._rewrite, text)
        # `chapters/03_rwkv.ipynb` written as code names a page from the course's root
        def code_to_link(m: re.Match) -> str:
            if not (self.root / m.group(1)).is_file():
                return m.group(0)  # a pattern such as `exercises/NN_topic.ipynb`
            link = re.match(r"(\[`[^`]+`\]\()(.+)(\))", f"[`{m.group(1)}`]({m.group(1)})")
            return self._rewrite(link, repo_relative=True)

        return BACKTICKED_PAGE.sub(code_to_link, text)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "markdown":
            cell.source = self._markdown(cell.source)
        for out in cell.get("outputs", []):  # Markdown rendered by minimodels.lab links files
            data = out.get("data", {})
            if "text/markdown" in data:
                data["text/markdown"] = self._markdown(data["text/markdown"])
            if "text/html" in data:
                data["text/html"] = HREF.sub(self._rewrite, data["text/html"])
        return cell, resources


def _as_notebook(root: Path, source: Path) -> nbformat.NotebookNode:
    text = (root / source).read_text(encoding="utf-8")
    if source.suffix == ".ipynb":
        return nbformat.reads(text, as_version=4)
    nb = nbformat.v4.new_notebook()
    if source.suffix == ".md":
        nb.cells = [nbformat.v4.new_markdown_cell(text)]
    else:
        nb.cells = [nbformat.v4.new_markdown_cell(f"# `{source.as_posix()}`"),
                    nbformat.v4.new_code_cell(text)]
    return nb


def build_book(root: Path, out: Path) -> Path:
    """Write the website of the course in ``root`` to ``out`` (replaced); return its index."""
    root, out = Path(root).resolve(), Path(out).resolve()
    if not (root / "README.md").is_file() or not (root / "chapters").is_dir():
        raise ValueError(f"root: {root} is not the course folder (no README.md or chapters/)")
    if out == root or root.is_relative_to(out):
        raise ValueError(f"out: {out} would overwrite the course itself")
    order = [Page(Path("README.md"), "Beyond RAG")]
    toc_groups: list[list[Page]] = []
    for lecture in sorted((root / "chapters").glob("*.ipynb")):
        group = []
        for section in SECTIONS:
            src = Path(section) / lecture.name
            if (root / src).is_file():
                nb = json.loads((root / src).read_text(encoding="utf-8"))
                title = _title(nb, lecture.stem) if section == "chapters" else (
                    f"{lecture.stem[:2]} {LABELS[section]}")
                group.append(Page(src, title))
        toc_groups.append(group)
        order += group
    pages = {p.source: p for p in order}

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    wanted: set[Path] = set()
    done: set[Path] = set()
    queue = list(order)
    while queue:
        page = queue.pop(0)
        if page.source in done:
            continue
        done.add(page.source)
        nb = _as_notebook(root, page.source)
        target = page.target
        seq = order.index(page) if page in order else None
        toc = []
        for group in toc_groups:
            head = group[0]
            toc.append({
                "title": head.title, "href": _href(target, head.target),
                "current": head.source == page.source,
                "subs": [{"title": LABELS[s.source.parts[0]], "href": _href(target, s.target),
                          "current": s.source == page.source} for s in group[1:]],
            })  # fmt: skip

        def link(p: Page | None, target=target) -> dict | None:
            return None if p is None else {"title": p.title, "href": _href(target, p.target)}

        book = {
            "title": "Beyond RAG", "home": _href(target, Path("index.html")), "toc": toc,
            "prev": link(order[seq - 1]) if seq else None,
            "next": link(order[seq + 1]) if seq is not None and seq + 1 < len(order) else None,
        }  # fmt: skip
        exporter = HTMLExporter(template_name="lab", embed_images=True,
                                extra_loaders=[DictLoader({"book.html.j2": TEMPLATE})])
        exporter.template_file = "book.html.j2"
        exporter.exclude_input_prompt = page.source.suffix not in (".ipynb",)
        exporter.register_preprocessor(StaticWidgets(), enabled=True)
        before = set(wanted)
        exporter.register_preprocessor(PageLinks(page.source, pages, root, wanted), enabled=True)
        resources = {"metadata": {"name": page.title, "path": str(root / page.source.parent)},
                     "book": book}
        body, _ = exporter.from_notebook_node(nb, resources=resources)
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        (out / target).write_text(body, encoding="utf-8")
        for src in sorted(wanted - before - done):
            new = Page(src, src.as_posix())
            pages[src] = new
            queue.append(new)
    return out / "index.html"
