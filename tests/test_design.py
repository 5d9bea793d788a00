"""The shape DESIGN.md asks of the method scripts: diff budgets, identical run blocks, main() differing only in
# METHOD: lines."""

import difflib
import itertools
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = [m for m in ("simclr", "byol", "vicreg", "dino", "mae") if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
BUDGETS = {
    ("simclr", "vicreg"): 90,
    ("simclr", "byol"): 100,
    ("byol", "vicreg"): 100,
    ("byol", "dino"): 150,
    ("simclr", "dino"): 180,
    ("vicreg", "dino"): 180,
    ("dino", "mae"): 230,
}
PAIRS = list(itertools.combinations(METHODS, 2))


def source(method):
    with open(os.path.join(ROOT, f"{method}.py")) as f:
        return f.read().splitlines()


def budget(a, b):
    return BUDGETS.get((a, b)) or BUDGETS.get((b, a)) or (180 if "mae" in (a, b) else None)


def changed_lines(a, b):
    """`diff a.py b.py | grep -c '^[<>]'`, as DESIGN.md measures it."""
    out = subprocess.run(["diff", f"{a}.py", f"{b}.py"], cwd=ROOT, capture_output=True, text=True).stdout
    return sum(line[:1] in "<>" and line != "" for line in out.splitlines())


@pytest.mark.parametrize("a,b", PAIRS)
def test_diff_budget(a, b):
    n, limit = changed_lines(a, b), budget(a, b)
    print(f"diff {a}.py {b}.py: {n} changed lines (budget {limit})")
    assert n <= limit


def block(lines, start, end):
    i = lines.index(start)
    return lines[i : lines.index(end, i)]


@pytest.mark.parametrize("method", METHODS)
def test_skeleton(method):
    lines = source(method)
    assert lines[0].startswith('"""') and "arxiv.org" in "\n".join(lines[:5])
    assert 'if __name__ == "__main__":' in lines and any(line.startswith("def main(") for line in lines)
    assert block(lines, "    # run", "    # method") == block(source("simclr"), "    # run", "    # method")


@pytest.mark.parametrize("a,b", PAIRS)
def test_main_differs_only_in_method_lines(a, b):
    """Every line main() adds or removes is marked # METHOD:; a changed line is marked on one side at least."""
    main_a, main_b = (block(source(m), "def main(argv=None):", 'if __name__ == "__main__":') for m in (a, b))
    marked = lambda lines: all("# METHOD:" in line for line in lines if line.strip())  # noqa: E731
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, main_a, main_b, autojunk=False).get_opcodes():
        if op != "equal":
            hunk = main_a[i1:i2] + main_b[j1:j2]
            assert marked(main_a[i1:i2]) or marked(main_b[j1:j2]) if op == "replace" else marked(hunk), (
                f"{a}.py/{b}.py main() differ outside # METHOD: lines: {hunk}"
            )
