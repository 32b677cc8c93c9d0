"""Build the documentation with `mkdocs build --strict`: broken links, unresolved
cross-references and docstrings that fail to render all fail the build. Then read the
built pages as MathJax and a reader would: every piece of maths sits where MathJax
typesets it, and titles keep their inline code.

Needs the `docs` extra (`pip install -e ".[docs]"`); skipped without it. The notebooks
are converted without being executed (`test_notebooks.py` executes them).
"""

import html.parser
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).parents[1]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocs_jupyter", "pymdownx")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site, once for this module's tests."""
    missing = [name for name in DOCS_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"the docs dependencies are not installed ({', '.join(missing)} missing); "
            'install them with `pip install -e ".[docs]"`'
        )
    tmp_path = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "GQDIFFRAX_DOCS_EXECUTE": "false", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "site"


@pytest.mark.slow
def test_docs_build_strict(site):
    for page in ("index.html", "how-it-works/index.html", "api/adjoints/index.html"):
        assert (site / page).is_file(), page
    # The API pages render the docstrings, maths included.
    adjoints = (site / "api" / "adjoints" / "index.html").read_text()
    assert "gqdiffrax.GQAdjoint" in adjoints
    assert 'class="arithmatex"' in adjoints


# What MathJax 3 skips whatever the classes (its default `skipHtmlTags`).
SKIP_TAGS = {"script", "noscript", "style", "textarea", "pre", "code", "annotation"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link"}
VOID_TAGS |= {"meta", "source", "track", "wbr"}
# Maths as it reaches the browser: \( \), \[ \], $$ $$ or $ $ around something.
MATH = re.compile(r"\\\(.+?\\\)|\\\[.+?\\\]|\$\$.+?\$\$|\$[^$\s][^$]*?\$", re.S)


def _mathjax_option(name: str) -> re.Pattern:
    """A class option of docs/_static/mathjax.js, compiled as MathJax compiles it."""
    js = (ROOT / "docs" / "_static" / "mathjax.js").read_text()
    (value,) = re.findall(rf'{name}:\s*"([^"]*)"', js)
    return re.compile(rf"(^| )({value})( |$)")


class _MathJaxWalk(html.parser.HTMLParser):
    """The text MathJax leaves alone: its walk of the DOM (`HTMLDomStrings`), where
    an element is ignored when its parent is or its class matches `ignoreHtmlClass`,
    unless its class matches `processHtmlClass`."""

    def __init__(self):
        super().__init__()
        self.ignore_class = _mathjax_option("ignoreHtmlClass")
        self.process_class = _mathjax_option("processHtmlClass")
        self.stack = [(None, False, False)]  # (tag, ignored, skipped)
        self.left_alone = []

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            return
        _, ignored, skipped = self.stack[-1]
        cls = dict(attrs).get("class") or ""
        process = bool(self.process_class.search(cls))
        # A notebook cell's source again, hidden, for its copy button: code, not text.
        hidden_code = "clipboard-copy-txt" in cls.split()
        skipped = skipped or hidden_code or (tag in SKIP_TAGS and not process)
        ignored = (ignored or bool(self.ignore_class.search(cls))) and not process
        self.stack.append((tag, ignored, skipped))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        _, ignored, skipped = self.stack[-1]
        if ignored and not skipped:
            self.left_alone.append(data)


def _headings(page: str) -> dict[str, str]:
    """Heading id -> its text, inline code included."""
    return {
        id: re.sub(
            r"<[^>]+>", "", re.sub(r'<a class="(anchor|headerlink)[^<]*</a>', "", text)
        ).strip()
        for id, text in re.findall(
            r'<h[1-6][^>]* id="([^"]+)"[^>]*>(.*?)</h[1-6]>', page, re.S
        )
    }


@pytest.mark.slow
def test_maths_is_where_mathjax_typesets_it(site):
    """Every $...$, \\(...\\) and \\[...\\] of every page (notebooks, Markdown
    pages, docstrings, the table of contents) is inside an element MathJax processes."""
    pages = sorted(site.rglob("*.html"))
    notebook_maths = 0
    for path in pages:
        walk = _MathJaxWalk()
        walk.feed(path.read_text())
        missed = [m.group() for text in walk.left_alone for m in MATH.finditer(text)]
        assert not missed, (path.relative_to(site), missed[:5])
        if "notebooks" in path.parts:
            notebook_maths += len(re.findall(r"jp-RenderedMarkdown", path.read_text()))
    assert notebook_maths, "no Markdown cells found in the notebook pages"
    # \texttt{max\_nodes} typesets `\_` as an underscore only with text macros.
    js = (ROOT / "docs" / "_static" / "mathjax.js").read_text()
    uses_texttt = any("\\texttt{" in p.read_text() for p in pages)
    assert not uses_texttt or '"textmacros"' in js


@pytest.mark.slow
def test_titles_keep_inline_code(site):
    """Page titles and the table of contents keep the code of a heading: "Quickstart: a
    neural ODE trained with GQAdjoint", not "... trained with"."""
    quickstart = (site / "notebooks" / "01_quickstart" / "index.html").read_text()
    assert "<title>Quickstart: a neural ODE trained with GQAdjoint - " in quickstart
    for path in sorted(site.rglob("*.html")):
        page = path.read_text()
        headings = _headings(page)
        (title,) = re.findall(r"<title>(.*?)</title>", page, re.S)
        h1 = [text for id, text in headings.items() if f'id="{id}"' in page][:1]
        if "notebooks" in path.parts and h1:
            assert title.startswith(h1[0]), (path.relative_to(site), title)
        if "api" in path.parts:
            continue  # mkdocstrings labels its entries itself (`GQAdjoint`).
        # The table of contents lists each heading with all of its text.
        toc = re.findall(
            r'<a href="#([^"]+)" class="md-nav__link">(.*?)</a>', page, re.S
        )
        for id, entry in toc:
            text = " ".join(re.sub(r"<[^>]+>", " ", entry).split())
            if id in headings:
                assert text == " ".join(headings[id].split()), (path, id, text)


@pytest.mark.slow
def test_notebook_links_resolve(site):
    """The notebooks' Markdown links (e.g. the quickstart's "Next" list) reach pages of
    the built site. mkdocs checks the links of Markdown pages, not of notebooks."""
    for path in sorted((site / "notebooks").rglob("index.html")):
        for href in re.findall(r'<a [^>]*href="([^"#]+)[^"]*"', path.read_text()):
            if re.match(r"[a-z]+:|/", href):
                continue  # another site, or an absolute path
            target = (path.parent / href).resolve()
            assert target.is_file() or (target / "index.html").is_file(), (
                path.relative_to(site),
                href,
            )
    quickstart = (site / "notebooks" / "01_quickstart" / "index.html").read_text()
    assert 'href="../02_time_series/"' in quickstart


def test_every_public_name_has_an_api_entry():
    import gqdiffrax

    public = {
        name
        for name in dir(gqdiffrax)
        if not name.startswith("_") and callable(getattr(gqdiffrax, name))
    }
    entries = {
        line.removeprefix("::: gqdiffrax.").strip()
        for page in (ROOT / "docs" / "api").glob("*.md")
        for line in page.read_text().splitlines()
        if line.startswith("::: gqdiffrax.")
    }
    assert public, "no public names found"
    assert public <= entries, f"no API entry for {sorted(public - entries)}"


@pytest.mark.slow
def test_readme_example_runs_and_prints_its_result():
    """The README's example, run as a user would (float32, a fresh interpreter)."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(r"loss \d+\.\d{3}, gradient norm \d+\.\d{2}\n", result.stdout)


def _blocks_module():
    spec = importlib.util.spec_from_file_location(
        "_blocks", ROOT / "docs" / "_blocks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_match_their_files():
    """Every `<!-- BEGIN path -->` block of the README and the docs pages holds its
    file as `python docs/_blocks.py` pastes it, and the file is part of the repository
    (not under the ignored `results/`): measured figures are written by a command."""
    blocks = _blocks_module()
    pages = blocks.pages()
    assert ROOT / "README.md" in pages and ROOT / "docs" / "index.md" in pages
    found = [problem for page in pages for problem in blocks.problems(page)]
    assert not found, (
        "\n".join(found) + "\nRun `python docs/_blocks.py` to rewrite them."
    )
    paths = sorted(
        {m["path"] for page in pages for m in blocks.BLOCK.finditer(page.read_text())}
    )
    assert "docs/figures/demo/summary.md" in paths
    if (ROOT / ".git").exists() and shutil.which("git"):
        ignored = subprocess.run(
            ["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True
        ).stdout.split()
        assert not ignored, f"blocks from files git ignores: {ignored}"


def test_a_block_that_differs_is_reported(tmp_path, monkeypatch):
    blocks = _blocks_module()
    monkeypatch.setattr(blocks, "ROOT", tmp_path)
    (tmp_path / "summary.md").write_text(
        "# demo (default size)\n\n| a |\n|---|\n| 1 |\n"
    )
    page = tmp_path / "README.md"
    page.write_text("x\n<!-- BEGIN summary.md -->\n| a |\n<!-- END summary.md -->\n")
    (problem,) = blocks.problems(page)
    assert "differs" in problem
    assert blocks.update(page)
    assert not blocks.problems(page)
    assert page.read_text() == (
        "x\n<!-- BEGIN summary.md -->\n| a |\n|---|\n| 1 |\n<!-- END summary.md -->\n"
    )
    page.write_text(
        "<!-- BEGIN gone.md -->\n<!-- END gone.md -->\n<!-- BEGIN a.md -->\n"
    )
    assert len(blocks.problems(page)) == 2
