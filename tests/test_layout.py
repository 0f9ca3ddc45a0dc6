"""The layout of docs/layout.md, checked: imports point down (cli -> commands -> shared pieces -> data_prep ->
segnet), never back up; no command imports another command's helpers (only its entry function); `segnet/`
knows nothing of Ray or MLflow; `pipelines/bench/` imports no Ray, MLflow or jsonargparse at import time."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each module of pipelines/ and its floor: a module imports only from floors below its own, or from its own
# floor when both are shared pieces (floor 2) or in one command's package (train/driver runs train/worker).
FLOORS = {
    "pipelines.config": 2,
    "pipelines.arguments": 2,  # the command line of a config class (jsonargparse), for cli
    **{f"pipelines.core.{m}": 2 for m in ("engine", "checkpoint", "console", "plots", "measure", "reference",
                                         "checks", "table1")},
    **{f"pipelines.tracking.{m}": 2 for m in ("runs", "registry", "pyfunc_model", "callback")},
    "pipelines.train.worker": 3,
    "pipelines.train.driver": 3,
    "pipelines.evaluate": 3,
    "pipelines.predict": 3,
    "pipelines.serve": 3,
    "pipelines.export": 3,
    "pipelines.submit": 3,
    "pipelines.bench.gpu_check": 3,
    "pipelines.bench.gpu_table1": 3,
    "pipelines.search.plan": 4,  # shared by tune and experiment; runs train's entry
    "pipelines.search.tune": 5,
    "pipelines.bench.bench": 5,
    "pipelines.bench.scale": 5,
    "pipelines.search.experiment": 6,
    "pipelines.search.run": 6,
    "pipelines.cli": 7,
}  # fmt: skip
# The commands, each with the entry functions that other modules may import from it (nothing else).
COMMANDS = {
    "pipelines.train.driver": {"train", "close_run"},  # close_run: a trial's end, recorded by its search
    "pipelines.evaluate": {"evaluate", "evaluate_registered"},
    "pipelines.predict": {"predict"},
    "pipelines.serve": {"start", "serving"},
    "pipelines.export": {"export_onnx"},
    "pipelines.submit": {"submit"},
    "pipelines.bench.gpu_check": set(),
    "pipelines.bench.gpu_table1": set(),
    "pipelines.search.tune": {"tune_search"},
    "pipelines.search.experiment": {"run_table1"},
    "pipelines.search.run": {"run"},
    "pipelines.bench.scale": {"bench_scale"},
    "pipelines.bench.bench": {"bench_data", "bench_storage", "bench_train", "bench_model", "bench_serve"},
    "pipelines.cli": {"main"},
}
PACKAGES = ("segnet", "data_prep", "pipelines")
MODULES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def floor(module: str) -> int:
    package = module.split(".")[0]
    return {"segnet": 0, "data_prep": 1}.get(package) if package != "pipelines" else FLOORS[module]


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for each project or Ray/MLflow import; name is None for `import module`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"  # `from pipelines.core import engine` imports a module
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists()
                found.append((sub, None) if is_module else (node.module, a.name))
    return [(m, n) for m, n in found if m.split(".")[0] in (*PACKAGES, "ray", "mlflow")]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    me = module_name(path)
    for target, _ in imports(path):
        top = target.split(".")[0]
        if top in ("ray", "mlflow"):
            assert not me.startswith("segnet"), f"{me} imports {target}: segnet/ knows no Ray or MLflow"
            assert top == "ray" or me.startswith("pipelines."), (
                f"{me} imports {target}: MLflow is pipelines/'s"
            )
            continue
        if target in PACKAGES or target == me or target.endswith(".__init__"):
            continue
        same_package = target.rpartition(".")[0] == me.rpartition(".")[0] and me.count(".") == 2
        shared = floor(me) == floor(target) <= 2  # segnet, data_prep and the shared pieces use each other
        assert floor(target) < floor(me) or shared or same_package, f"{me} imports {target}: it points up"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_command_imports_another_commands_helpers(path):
    me = module_name(path)
    for target, name in imports(path):
        if target not in COMMANDS or target.rpartition(".")[0] == me.rpartition(".")[0] != "pipelines":
            continue
        assert name in COMMANDS[target], f"{me} imports {name or 'the module'} from the command {target}"


def test_every_pipelines_module_has_a_place_in_the_layout():
    names = {module_name(p) for p in (ROOT / "pipelines").rglob("*.py") if p.name != "__init__.py"}
    assert names == set(FLOORS), names ^ set(FLOORS)
    rows = (ROOT / "docs" / "layout.md").read_text().splitlines()

    def placed(module: str) -> bool:  # named in the table row of its folder
        *folders, stem = module.split(".")
        folder = "/".join(folders) + "/"
        return any(f"`{folder}`" in row and f"`{stem}.py`" in row for row in rows if row.startswith("| "))

    missing = [n for n in names if not placed(n)]
    assert not missing, missing


def test_the_bench_package_imports_no_ray_mlflow_or_jsonargparse():
    """`make gpu-check` and `make gpu-table1` run where only torch, numpy, pillow, pyarrow and scipy exist."""
    code = (
        "import sys, pipelines.bench.gpu_check, pipelines.bench.gpu_table1, pipelines.bench.bench,"
        " pipelines.bench.scale\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'jsonargparse',"
        " 'albumentations'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_reliability_row_names_tests_that_exist():
    """docs/reliability.md: each row names the tests that inject its fault; each named test exists."""
    rows = [r for r in (ROOT / "docs" / "reliability.md").read_text().splitlines() if r.startswith("| ")][2:]
    assert len(rows) >= 15
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", row.split(" | ")[-1])
        assert named, row[:80]
        for path, name in named:
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE), f"{path}::{name}"


# CamVid's class table lives in its description; these files alone may spell its constants: the description
# and CamVid's own reader, the paper's CamVid table (used by tests and the description's check) and the
# paper's figures. Everything else takes the class count, names, colours and void from the data's description.
CAMVID_CONSTANTS = {"CLASSES", "NUM_CLASSES", "VOID", "PALETTE"}
CAMVID_FILES = {"data_prep/datasets/camvid.py", "data_prep/camvid.py", "segnet/classes.py", "segnet/paper.py"}
ELEVEN_ALLOWED = {"data_prep/datasets/cityscapes.py"}  # Cityscapes' label id 11 (building), not a class count


def camvid_uses(source: str, rel: str) -> list[str]:
    """Where a module's source names CamVid's constants, imports segnet.classes or writes the literal 11."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = getattr(node, "id", None) or getattr(node, "attr", None)
        if isinstance(node, ast.alias):
            name = node.asname or node.name.rpartition(".")[2]
        if name in CAMVID_CONSTANTS:
            found.append(f"{rel}:{getattr(node, 'lineno', '?')} names {name}")
        if isinstance(node, ast.ImportFrom):
            modules = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        else:
            modules = {a.name for a in node.names} if isinstance(node, ast.Import) else set()
        if "segnet.classes" in modules:
            found.append(f"{rel}:{node.lineno} imports segnet.classes")
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 11:
            if rel not in ELEVEN_ALLOWED:
                found.append(f"{rel}:{node.lineno} writes 11")
    return found


def test_only_camvids_own_files_use_its_classes_void_or_colours():
    offending = []
    for path in MODULES:
        rel = str(path.relative_to(ROOT))
        if rel not in CAMVID_FILES:
            offending += camvid_uses(path.read_text(), rel)
    assert not offending, offending


def test_the_camvid_check_finds_each_kind_of_use():
    """The check above can fail: VOID imported from segnet.classes, PALETTE used, 11 written are found."""
    probe = "from segnet.classes import VOID\nfrom segnet import classes\n\nK = 11\nx = plots.PALETTE\n"
    found = camvid_uses(probe, "pipelines/probe.py")
    assert sorted(f.split(" ", 1)[1] for f in found) == sorted(
        ["imports segnet.classes", "names VOID", "imports segnet.classes", "writes 11", "names PALETTE"]
    ), found
