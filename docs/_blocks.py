"""The generated blocks of the README and the docs pages: measured figures that a
command writes, not a person.

A block is a file of the repository, pasted between two comments that name it:

    <!-- BEGIN docs/figures/demo/summary.md -->
    ...
    <!-- END docs/figures/demo/summary.md -->

It holds the file byte for byte, less a first line that is a Markdown title (`# ...`)
and the blank line after it: the `summary.md` of an experiments run starts with
`# TASK (SIZE size)`, which would be a second page title. The files are committed under
`docs/figures/`, each beside the rest of its run (`results.json` records the
configuration and the machine), so that every figure a page shows has its source in the
repository. To measure again, run the command the page gives with `--out
docs/figures/NAME`, then

    python docs/_blocks.py          # rewrite every block from its file
    python docs/_blocks.py --check  # list the blocks that differ; exit status 1 if any

`tests/test_docs.py` runs the check.
"""

import pathlib
import re
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"^<!-- BEGIN (?P<path>\S+) -->\n(?P<body>.*?)^<!-- END (?P=path) -->$",
    re.S | re.M,
)


def pages() -> list[pathlib.Path]:
    """The README and every Markdown page of the docs (not the block files)."""
    docs = ROOT / "docs"
    found = [
        p for p in docs.rglob("*.md") if "figures" not in p.relative_to(docs).parts
    ]
    return [ROOT / "README.md", *sorted(found)]


def source(path: str) -> str:
    """What the block of `path` holds: the file, without its title line."""
    text = (ROOT / path).read_text()
    if text.startswith("# "):
        text = text.split("\n", 1)[1].removeprefix("\n")
    return text if text.endswith("\n") else text + "\n"


def problems(page: pathlib.Path) -> list[str]:
    """What is wrong with the blocks of `page`: a block whose file is missing or
    differs, or a BEGIN without its END."""
    text = page.read_text()
    name = page.relative_to(ROOT)
    found = []
    blocks = list(BLOCK.finditer(text))
    if len(blocks) != text.count("<!-- BEGIN "):
        found.append(f"{name}: a `<!-- BEGIN path -->` without its `<!-- END path -->`")
    for block in blocks:
        path = block["path"]
        if not (ROOT / path).is_file():
            found.append(f"{name}: the block's file {path} does not exist")
        elif block["body"] != source(path):
            found.append(f"{name}: the block of {path} differs from the file")
    return found


def update(page: pathlib.Path) -> bool:
    """Rewrite the blocks of `page` from their files; whether anything changed."""
    text = page.read_text()
    new = BLOCK.sub(
        lambda m: (
            f"<!-- BEGIN {m['path']} -->\n{source(m['path'])}<!-- END {m['path']} -->"
        ),
        text,
    )
    if new != text:
        page.write_text(new)
    return new != text


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print("usage: python docs/_blocks.py [--check]", file=sys.stderr)
        return 2
    if argv:
        found = [problem for page in pages() for problem in problems(page)]
        print("\n".join(found) or "Every block matches its file.")
        return 1 if found else 0
    for page in pages():
        missing = [p for p in problems(page) if "does not exist" in p]
        if missing:
            print("\n".join(missing), file=sys.stderr)
            return 1
        if update(page):
            print(f"rewrote the blocks of {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
