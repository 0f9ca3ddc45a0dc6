"""The layout of docs/layout.md, checked: imports point down (commands -> steps -> shared pieces -> data_prep
-> segnet), never back up, and `segnet/` knows nothing of Ray or MLflow."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"config", "console", "engine", "checkpoint", "measure", "reference", "plots", "tracking",
          "registry", "pyfunc_model"}  # fmt: skip
# Steps: each a command; a step may run a step of a lower rank (tune runs train; run runs tune).
STEPS = {"train": 3, "evaluate": 3, "predict": 3, "serve": 3, "export": 3, "submit": 3, "gpu_check": 3,
         "bench": 4, "tune": 4, "run": 5, "experiment": 5, "cli": 6}  # fmt: skip


def rank(module: str) -> int:
    package, _, name = module.partition(".")
    if package == "segnet":
        return 0
    if package == "data_prep":
        return 1
    return 2 if name in SHARED or not name else STEPS[name]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {
            n for n in names if n.split(".")[0] in ("segnet", "data_prep", "pipelines", "ray", "mlflow")
        }
    return found


MODULES = sorted(p for pkg in ("segnet", "data_prep", "pipelines") for p in (ROOT / pkg).glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_imports_point_down(path):
    me = f"{path.parent.name}.{path.stem}".removesuffix(".__init__")
    for target in imports(path):
        parts = target.split(".")
        if parts[0] in ("ray", "mlflow"):
            assert parts[0] == "ray" or path.parent.name == "pipelines", (me, target)
            assert path.parent.name != "segnet", f"{me} imports {target}: segnet/ knows no Ray or MLflow"
            continue
        module = ".".join(parts[:2])
        if not (ROOT / parts[0] / f"{parts[1] if len(parts) > 1 else '__init__'}.py").exists():
            module = parts[0]  # `from pipelines import tracking` names the module in the next part
        if module == me or len(parts) < 2:
            continue
        same_rank_ok = rank(me) <= 2  # shared pieces use each other; steps only use steps below them
        assert rank(module) < rank(me) or (same_rank_ok and rank(module) == rank(me)), (
            f"{me} imports {module}"
        )


def test_every_pipelines_module_has_a_place_in_the_layout():
    names = {p.stem for p in (ROOT / "pipelines").glob("*.py")} - {"__init__"}
    assert names <= SHARED | set(STEPS), names - SHARED - set(STEPS)
    layout = (ROOT / "docs" / "layout.md").read_text()
    assert all(f"{n}.py" in layout for n in names), [n for n in names if f"{n}.py" not in layout]


def test_every_reliability_row_names_tests_that_exist():
    """docs/reliability.md: each row names the tests that inject its fault; each named test exists."""
    rows = [r for r in (ROOT / "docs" / "reliability.md").read_text().splitlines() if r.startswith("| ")][2:]
    assert len(rows) >= 15
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", row.split(" | ")[-1])
        assert named, row[:80]
        for path, name in named:
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE), f"{path}::{name}"
