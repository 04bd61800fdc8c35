"""The course as a website (`make book`): built here into a temporary folder, served on
localhost and crawled in headless Chromium from the front page. Every page must load, every
image must render (decoded, non-zero size) and every internal link, fragment included, must
resolve. The page may not reach the network: requests that leave localhost are aborted (the
MathJax script is the only one, and the maths then shows as TeX)."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag

import pytest

from minimodels.book import build_book

from .conftest import REPO, record_artifact, record_note

pytestmark = pytest.mark.browser

JS_IMAGES = """() => [...document.images].map(i => ({
  src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0}))"""
JS_LINKS = "() => [...document.querySelectorAll('a[href]')].map(a => a.href)"
JS_HAS_ANCHOR = """(frag) => !!(document.getElementById(frag)
  || document.getElementsByName(frag).length)"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the crawl's requests would flood pytest's output
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("book") / "site"
    index = build_book(REPO, out)
    handler = functools.partial(_Quiet, directory=str(out))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", out, index
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_every_page_loads_with_images_and_links(site, chromium, artifacts_dir):
    base, out, index = site
    assert index == out / "index.html"
    page = chromium.new_page()
    blocked: list[str] = []

    def route(r):
        if r.request.url.startswith(base) or r.request.url.startswith("data:"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    try:
        queue, seen, problems = [base + "index.html"], set(), []
        anchors: list[tuple[str, str, str]] = []  # (from page, to page, fragment)
        images, referrer, n_links = {}, {}, 0
        while queue:
            url = queue.pop(0)
            if url in seen:
                continue
            seen.add(url)
            response = page.goto(url, wait_until="load", timeout=60_000)
            if response is None or response.status != 200:
                status = response.status if response else "no response"
                problems.append(f"{url} (linked from {referrer.get(url)}): HTTP {status}")
                continue
            page.wait_for_function("() => [...document.images].every(i => i.complete)",
                                   timeout=30_000)  # fmt: skip
            imgs = page.evaluate(JS_IMAGES)
            images[url] = len(imgs)
            problems += [f"{url}: image {i['src']} did not render" for i in imgs if not i["ok"]]
            for href in page.evaluate(JS_LINKS):
                target, fragment = urldefrag(href)
                if not target.startswith(base):
                    continue
                n_links += 1
                if fragment and target == url:  # an anchor on this page: check it here
                    if not page.evaluate(JS_HAS_ANCHOR, fragment):
                        problems.append(f"{url}: link to #{fragment}: no such anchor")
                elif fragment:
                    anchors.append((url, target, fragment))
                referrer.setdefault(target, url)
                queue.append(target)
            if url.endswith("chapters/03_rwkv.html"):
                shot = Path(artifacts_dir) / "book-03_rwkv.png"
                page.screenshot(path=str(shot))
                record_artifact(shot)
                assert page.locator(".book-widget-note").count() >= 1
                assert page.locator("a[rel=next]").count() and page.locator("a[rel=prev]").count()
        for target in sorted({t for _, t, _ in anchors}):  # anchors on other pages
            if any(p.startswith(target + " ") for p in problems):
                continue  # the page itself failed: reported above
            page.goto(target, wait_until="domcontentloaded")
            for src, _, fragment in [a for a in anchors if a[1] == target]:
                if not page.evaluate(JS_HAS_ANCHOR, fragment):
                    problems.append(f"{src}: link to {target}#{fragment}: no such anchor")
    finally:
        page.close()

    pages = sorted(u.removeprefix(base) for u in seen)
    record_note(f"book: {len(pages)} pages, {sum(images.values())} images, {n_links} internal "
                f"links, {len(blocked)} external requests blocked")  # fmt: skip
    assert not problems, "\n".join(problems)
    built = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    assert pages == built, "pages the links do not reach (or links to pages not built)"
    for section in ("chapters", "exercises", "solutions"):
        for nb in sorted((REPO / section).glob("*.ipynb")):
            assert f"{section}/{nb.stem}.html" in pages
    # chapter 03 is read with its plots: each committed PNG is an image on its page
    assert images[base + "chapters/03_rwkv.html"] >= 3
