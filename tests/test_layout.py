"""docs/DESIGN.md's layout table against the tree: every path it names exists, every package has a
row, and every name it marks as coming (work in progress) does not exist yet, so that the table is
updated when that work lands.

The table's rule, written under it in DESIGN.md: a backticked name ending in ``.py``, ``.sh``,
``.md`` or ``/`` is a path, from the checkout's root when it holds a ``/``, else inside its row's
folder; the names after "Coming:" in a cell are the coming ones."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(REPO, "docs", "DESIGN.md")
PATH = re.compile(r"`([A-Za-z0-9_./-]+(?:\.py|\.sh|\.md|/))`")


def _layout_rows(text):
    """The rows of the table under ``## Layout``, each as (first cell, second cell)."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows and rows[0].startswith("| path |"), "DESIGN.md's Layout section lost its table"
    out = []
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 2, f"a layout row is not two cells: {line[:80]}"
        out.append((cells[0], cells[1]))
    return out


def layout_paths(text):
    """(named, coming): the paths the layout table names, each as (absolute path, its row)."""
    named, coming = [], []
    for first, what in _layout_rows(text):
        heads = PATH.findall(first)
        assert heads, f"a layout row names no path: {first}"
        folder = heads[0] if len(heads) == 1 and heads[0].endswith("/") else None
        named += [(os.path.normpath(os.path.join(REPO, h)), first) for h in heads]
        now, _, later = what.partition("Coming:")
        for names, into in ((now, named), (later, coming)):
            for name in PATH.findall(names):
                if "/" in name.rstrip("/"):
                    path = os.path.join(REPO, name)
                else:
                    path = os.path.join(REPO, folder or os.path.dirname(heads[0]), name)
                into.append((os.path.normpath(path), first))
    return named, coming


def _relative(path):
    return os.path.relpath(path, REPO)


def _design():
    with open(DESIGN, encoding="utf-8") as f:
        return f.read()


def test_every_path_in_the_layout_table_exists():
    named, coming = layout_paths(_design())
    assert len(named) > 20  # the table was read
    missing = [f"{_relative(p)} (row {row})" for p, row in named if not os.path.exists(p)]
    assert not missing, "DESIGN.md's layout table names what does not exist: " + ", ".join(missing)
    for path, _ in named:
        if path.endswith(".py"):  # a module named in a package's row is a file of that package
            assert os.path.isfile(path), _relative(path)


def test_coming_names_do_not_exist_yet():
    _, coming = layout_paths(_design())
    landed = [_relative(p) for p, _ in coming if os.path.exists(p)]
    assert not landed, (
        "marked 'Coming' in DESIGN.md's layout table but present now: "
        + ", ".join(landed)
        + " (move each before 'Coming:' in its row)"
    )


def test_every_package_is_in_the_layout_table():
    """The other direction: every package under effbert/ has a row, or is named in one."""
    named, _ = layout_paths(_design())
    names = {p for p, _ in named}
    top = os.path.join(REPO, "effbert")
    packages = []
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        if "__init__.py" in files and root != top:
            packages.append(os.path.normpath(root))
    assert packages
    absent = [_relative(p) for p in packages if p not in names]
    assert not absent, "packages missing from DESIGN.md's layout table: " + ", ".join(absent)


ROWS = [
    (
        "| `effbert/training/` | `trainers.py`, `x/y.py`. Coming: `soon.py` |",
        ["effbert/training", "effbert/training/trainers.py", "x/y.py"],
        ["effbert/training/soon.py"],
    ),
    (
        "| `effbert/losses.py`, `effbert/calibration.py` | losses |",
        ["effbert/losses.py", "effbert/calibration.py"],
        [],
    ),
    (
        "| `scripts/` | `gpu_suite.sh`; `bench_<op>.py` is a pattern, `Foo` a class |",
        ["scripts", "scripts/gpu_suite.sh"],
        [],
    ),
]


@pytest.mark.parametrize("row, named, coming", ROWS)
def test_layout_rule(row, named, coming):
    text = "# d\n\n## Layout\n\n| path | what lives there |\n|---|---|\n" + row + "\n\n## Next\n"
    got_named, got_coming = layout_paths(text)
    assert [_relative(p) for p, _ in got_named] == named
    assert [_relative(p) for p, _ in got_coming] == coming
