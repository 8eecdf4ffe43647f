"""The codebase a student reads: imports run one way (model.py at the bottom, the world and the released format above
it, a stage never imports another stage), no function over 100 lines, every path the code and the README cite exists,
no document outside the repository is cited, and a measured figure in a comment is one docs/results.md holds."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
STAGES = {"train_reward", "eval_reward", "grpo", "step_grpo", "refl", "sample_stepwise", "toy"}
SHARED = {"model", "data", "align", "released", "parallel"}
SOURCES = sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("scripts/*.py")) + sorted(ROOT.glob("dev/*.py"))


def imports(path):
    """Every repository module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_model_imports_neither_the_world_nor_the_released_format():
    code = "import sys, model; print(sorted(m for m in ('toy', 'released', 'align', 'data') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_imports_run_one_way():
    graph = {m: imports(ROOT / f"{m}.py") - {m} for m in MODULES}
    for m in SHARED:
        assert "toy" not in graph[m], f"{m}.py imports toy: the oracle is passed in"
        assert not graph[m] & STAGES, f"{m}.py imports a stage: {graph[m] & STAGES}"
    for m in STAGES - {"toy"}:
        assert not graph[m] & (STAGES - {"toy"}), f"{m}.py imports another stage: {graph[m] & STAGES}"
    assert graph["model"] == set(), graph["model"]
    assert graph["parallel"] == set(), graph["parallel"]  # beside model.py at the bottom: torch only
    assert graph["toy"] <= {"model"}, graph["toy"]
    state = {}

    def visit(m, path):  # depth-first search for a cycle
        if state.get(m) == "open":
            raise AssertionError(f"import circle: {' -> '.join(path + [m])}")
        if state.get(m) != "done":
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"
    for m in MODULES:
        visit(m, [])


def test_no_function_over_100_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


def shipped_text():
    files = [*SOURCES, *ROOT.glob("tests/*.py"), ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "requirements.txt"]
    return {p: p.read_text() for p in files if p.is_file()}


def test_every_cited_path_exists_and_no_outside_document():
    cited = re.compile(r"(?<![\w/.-])((?:docs|scripts|dev|tests|assets)/[\w./-]*\w|\b[a-z_]+\.py\b)")
    names = {p.name for folder in (".", "scripts", "dev", "tests") for p in (ROOT / folder).glob("*.py")}
    missing = []
    for path, text in shipped_text().items():
        assert "DESIGN" ".md" not in text, f"{path.name} cites the spec, a file outside the repository"
        for m in cited.finditer(text):
            name = m.group(1)
            before = text[max(0, m.start() - 1):m.start()]
            if before in "/." and before:  # a path inside someone else's repository (authors' code, configs)
                continue
            if not (ROOT / name).exists() and ("/" in name or name not in names):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, sorted(set(missing))


def comments(path):
    """The comments and docstrings of a Python file."""
    text = path.read_text()
    out = [m.group(0) for m in re.finditer(r"#[^\n]*", text)]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
            out.append(ast.get_docstring(node) or "")
    return "\n".join(out)


def test_measured_figures_in_comments_are_in_the_results():
    """A timing or a percentage in a comment or docstring of the code is a measurement: docs/results.md holds it."""
    results = (ROOT / "docs/results.md").read_text()
    measured = re.compile(r"\b\d[\d,]*(?:\.\d+)?(?:%| ?(?:s|min|minutes|seconds|x faster)\b)")
    stale = []
    for path in SOURCES:
        for m in measured.finditer(comments(path)):
            if m.group(0).replace(" ", "") not in results.replace(" ", ""):
                stale.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not stale, stale


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
