"""The documentation's links: every local file they name exists, and every pointer to a line
(``[`name`](../path#L12)``, as docs/tour.md writes them) still lands on a line naming it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "tools" / "README.md", ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def local_links(doc: Path) -> list[tuple[str, Path, int | None]]:
    out = []
    for text, target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same page
        path, _, anchor = target.partition("#")
        line = int(anchor[1:]) if re.fullmatch(r"L\d+", anchor) else None
        out.append((text, (doc.parent / path).resolve(), line))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_local_links_name_files_that_exist(doc):
    missing = [str(p.relative_to(ROOT)) for _, p, _ in local_links(doc) if not p.exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_the_tours_line_pointers_land_on_what_they_name():
    pointers = [(t, p, n) for t, p, n in local_links(ROOT / "docs" / "tour.md") if n is not None]
    assert len(pointers) >= 30  # the tour's pointers are its substance: they must not vanish
    wrong = []
    for text, path, n in pointers:
        name = text.strip("`")
        lines = path.read_text().splitlines()
        if n > len(lines) or name not in lines[n - 1]:
            wrong.append(f"{path.relative_to(ROOT)}#L{n} does not name {name}")
    assert not wrong, "docs/tour.md: " + "; ".join(wrong)
