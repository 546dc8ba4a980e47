"""README.md and docs/ as a reader meets them: README stays short and in a user's order, its test
command is the one CI runs, and every relative link in README.md and docs/*.md reaches a file and,
where it names one, a heading of that file (GitHub's anchors)."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(
    ["README.md"]
    + [os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs")) if n.endswith(".md")]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def anchors(markdown):
    """GitHub's anchors of a Markdown file's headings: lowercased, punctuation dropped but for
    hyphens and underscores, spaces made hyphens; a repeated heading gets -1, -2, ..."""
    seen, out, code = {}, set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            code = not code
        if code or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchors_follow_github():
    text = (
        "# A b\n## `effbert demo`\n## TNF: a note, for words\n```\n# not a heading\n```\n## A b\n"
    )
    assert anchors(text) == {"a-b", "effbert-demo", "tnf-a-note-for-words", "a-b-1"}


def test_readme_is_short_and_in_a_users_order():
    text = _read("README.md")
    assert len(text.encode("utf-8")) <= 15 * 1024, len(text.encode("utf-8"))
    sections = re.findall(r"^## (.+)$", text, re.M)
    order = [
        "Quick start",
        "Pretrain on your text",
        "Fine-tune with early exit",
        "Use the ops and models in your code",
        "Measured speed-ups",
        "Documentation",
    ]
    assert sections == order


def test_readme_test_command_is_the_one_ci_runs():
    quick = _read("README.md").split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1).splitlines()
    assert len(block) == 2 and block[0].endswith("effbert demo"), block
    ci = _read(".ci/run").split("# --- the README's test command, as written there ---\n", 1)[1]
    assert ci.splitlines()[0] == block[1]


@pytest.mark.parametrize("path", DOCS)
def test_relative_links_reach_a_file_and_heading(path):
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(os.path.join(REPO, resolved)):
            bad.append(f"{target} (no {resolved})")
        elif anchor and (not resolved.endswith(".md") or anchor not in anchors(_read(resolved))):
            bad.append(f"{target} (no heading #{anchor} in {resolved})")
    assert not bad, f"{path}: " + ", ".join(bad)
