"""The shape the project promises: code-only diff budgets between the method scripts, identical run blocks,
main() differing only in # METHOD: lines, and a README whose commands the scripts accept."""

import ast
import difflib
import importlib
import itertools
import os
import re
import shlex
import subprocess

import pytest
from conftest import METHODS, ROOT

# changed lines of GNU diff between the scripts without their module docstrings
BUDGETS = {
    ("simclr", "byol"): 70,
    ("simclr", "vicreg"): 75,
    ("byol", "vicreg"): 75,
    ("byol", "dino"): 140,
    ("simclr", "dino"): 160,
    ("vicreg", "dino"): 160,
    ("dino", "mae"): 215,
}
MAE_BUDGET = 165  # mae.py against any other script but dino.py
PAIRS = list(itertools.combinations(METHODS, 2))
SCRIPTS = ("simclr.py", "byol.py", "vicreg.py", "dino.py", "mae.py", "eval_linear.py", "bench/plot_runs.py")


def source(method):
    with open(os.path.join(ROOT, f"{method}.py")) as f:
        return f.read().splitlines()


def code_only(method):
    """The script's lines below its module docstring."""
    lines = source(method)
    first = ast.parse("\n".join(lines)).body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant), f"{method}.py has no docstring"
    return lines[first.end_lineno :]


def changed_lines(a, b, tmp_path):
    """`diff a b | grep -c '^[<>]'` on the two scripts without their docstrings."""
    for m in (a, b):
        (tmp_path / m).write_text("\n".join(code_only(m)) + "\n")
    out = subprocess.run(["diff", a, b], cwd=tmp_path, capture_output=True, text=True, check=False).stdout
    return sum(line[:1] in "<>" for line in out.splitlines())


@pytest.mark.parametrize("a,b", PAIRS)
def test_diff_budget(a, b, tmp_path):
    limit = BUDGETS.get((a, b)) or (MAE_BUDGET if "mae" in (a, b) else None)
    n = changed_lines(a, b, tmp_path)
    print(f"code-only diff {a}.py {b}.py: {n} changed lines (budget {limit})")
    assert limit is not None and n <= limit


def block(lines, start, end):
    i = lines.index(start)
    return lines[i : lines.index(end, i)]


@pytest.mark.parametrize("method", METHODS)
def test_skeleton(method):
    lines = source(method)
    assert lines[0].startswith('"""') and "arxiv.org" in "\n".join(lines[:5])
    assert 'if __name__ == "__main__":' in lines and any(line.startswith("def main(") for line in lines)
    assert block(lines, "    # run", "    # method") == block(source("simclr"), "    # run", "    # method")


def all_marked(lines):
    return all("# METHOD:" in line for line in lines if line.strip())


@pytest.mark.parametrize("a,b", PAIRS)
def test_main_differs_only_in_method_lines(a, b):
    """Every line main() adds or removes is marked # METHOD:; a changed line is marked on one side at least."""
    main_a, main_b = (block(source(m), "def main(argv=None):", 'if __name__ == "__main__":') for m in (a, b))
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, main_a, main_b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        removed, added = main_a[i1:i2], main_b[j1:j2]
        marked = all_marked(removed) or all_marked(added) if op == "replace" else all_marked(removed + added)
        assert marked, f"{a}.py/{b}.py main() differ outside # METHOD: lines: {removed + added}"


# ----------------------------------------------------------------------------------------------------------
# The README


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def code_blocks(text):
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def script_commands(text):
    """(script, argv) of every `python X.py ...` and `torchrun ... X.py ...` line of the text's code blocks, with
    continuation lines joined, comments dropped and the block's shell variables (NAME="...") expanded."""
    commands = []
    for code in code_blocks(text):
        code = re.sub(r"\\\n", " ", code)
        variables = {}
        for name, value in re.findall(r'^(\w+)="(.*?)"', code, flags=re.DOTALL | re.MULTILINE):
            variables[name] = " ".join(value.split())
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            words = [w for word in words for w in (variables[word[1:]].split() if word[1:] in variables else [word])]
            scripts = [i for i, word in enumerate(words) if word in SCRIPTS]
            if words and words[0] in ("python", "torchrun") and scripts:
                commands.append((words[scripts[0]], words[scripts[0] + 1 :]))
    return commands


def test_readme_is_short_and_references_nothing_outside_the_repository():
    text = readme()
    assert len(text.splitlines()) <= 200
    assert "RECIPES.md" not in text and "../shared" not in text
    assert not re.search(r"\bissues? #?\d|#\d+\b", text), "the README names an issue number"
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert link.startswith("http") or os.path.exists(os.path.join(ROOT, link)), f"dangling link {link}"


def test_every_readme_command_is_accepted_by_its_script():
    """Each command's flags go through its script's own argument parser and checks (nothing runs)."""
    commands = script_commands(readme())
    assert {script for script, _ in commands} >= set(SCRIPTS)
    for script, argv in commands:
        module = importlib.import_module(os.path.basename(script)[:-3])  # bench/ is on sys.path (conftest)
        try:
            module.get_args(argv)  # argparse exits on an unknown flag or value; check_args raises on a bad one
        except SystemExit:
            pytest.fail(f"{script} refuses the README's command: {shlex.join(argv)}")


def docstring_demo(method):
    """The argv of the first command after the 'CPU demo' paragraph of the script's docstring, continuation lines
    joined."""
    lines = importlib.import_module(method).__doc__.splitlines()
    demo = next(i for i, line in enumerate(lines) if line.startswith("CPU demo"))
    start = next(i for i in range(demo, len(lines)) if lines[i].strip().startswith("python "))
    command = []
    for line in lines[start:]:
        command.append(line.strip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(" ".join(command))
    assert words[:2] == ["python", f"{method}.py"], words
    return words[2:]


@pytest.mark.parametrize("method", METHODS)
def test_docstring_demo_is_a_valid_synthetic_command(method):
    argv = docstring_demo(method)
    args = importlib.import_module(method).get_args(argv)
    assert args.dataset == "synthetic" and "--out" not in argv


def test_the_readme_demo_is_simclrs_docstring_demo():
    demos = [argv for script, argv in script_commands(readme()) if script == "simclr.py" and "synthetic" in argv]
    assert docstring_demo("simclr") in demos
