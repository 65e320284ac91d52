"""The documents a user reads: the README stays a user's page in its agreed order, every
relative link and image in README.md, CHANGELOG.md and docs/ resolves (anchors included), and the
pages count what the repository holds."""
import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```+|~~~+)")


def prose_lines(text: str):
    """Lines outside code fences and indented code blocks, with inline code removed."""
    fence = None
    for line in text.splitlines():
        if FENCE.match(line):
            fence = None if fence else line
            continue
        if fence or (line.startswith("    ") and not line.lstrip().startswith(("-", "*", "|", ">"))):
            continue
        yield re.sub(r"`[^`]*`", "", line)


def heading_slugs(page: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to dashes, repeats numbered."""
    seen, slugs = Counter(), set()
    for line in prose_lines(page.read_text()):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).lower()
            slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            slugs.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return slugs


def test_readme_is_a_users_page_in_the_agreed_order():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    sections = [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]
    expected = ["Install in ComfyUI", "Model files", "The workflows", "The nodes", "Will it fit?", "Speed",
                "The command line", "The Python API", "How this implementation differs from the paper",
                "Results on the embedded model", "Troubleshooting", "Development", "Citation", "Licence"]
    assert sections == expected
    assert "docs/images/demo_grid.png" in text.split("## ")[0]          # the demo picture comes first
    assert text.count("huggingface.co/") >= 5                           # every model file has its link
    assert "@inproceedings" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):          # http(s), mailto
                continue
            path, _, anchor = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            if not destination.exists():
                broken.append(f"{target}: no such file")
            elif anchor and anchor not in heading_slugs(destination):
                broken.append(f"{target}: no heading #{anchor}")
    assert broken == []


def test_documents_speak_of_the_project_not_of_how_it_was_made():
    wording = re.compile(r"\b(session|issue) \d+|\.\./shared", re.IGNORECASE)
    found = [f"{page.name}: {line.strip()[:80]}" for page in PAGES for line in page.read_text().splitlines()
             if wording.search(line)]
    assert found == []


def test_pages_count_the_workflows_the_repository_ships():
    shipped = len(list((REPO / "workflows").glob("*.json")))
    words = {5: "five", 6: "six", 7: "seven", 8: "eight"}
    for page in (REPO / "README.md", REPO / "docs" / "nodes.md"):
        counts = re.findall(r"\b(five|six|seven|eight|\d+) (?:example )?(?:workflows|templates)\b", page.read_text(),
                            re.IGNORECASE)
        assert counts, f"{page.name} should say how many workflows ship"
        assert all(c.lower() in (words.get(shipped), str(shipped)) for c in counts), (page.name, counts)
