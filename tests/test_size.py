"""No function in pipelines/ or data_prep/ is over 60 lines (its `def` to its last line, decorators aside), so
that each can be read in one screen; a longer one is split where the split names a step of the work."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def long_functions(path: Path, root: Path = ROOT) -> list[str]:
    """'FILE:LINE NAME (N lines)' for each function or method of the file over MAX_LINES lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_pipelines_or_data_prep_is_over_60_lines():
    files = sorted(p for pkg in ("pipelines", "data_prep") for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 20  # the packages were found
    too_long = [f for p in files for f in long_functions(p)]
    assert not too_long, f"functions over {MAX_LINES} lines: split them where a step of the work ends:\n" + (
        "\n".join(too_long)
    )


def test_the_size_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))  # the def line makes it MAX_LINES + 1
    (tmp_path / "long.py").write_text(f"def short():\n    pass\n\n\nasync def long():\n{body}\n")
    assert long_functions(tmp_path / "long.py", tmp_path) == [f"long.py:5 long ({MAX_LINES + 1} lines)"]


def test_the_command_table_stays_under_250_lines():
    """pipelines/cli.py is a table (name -> config class -> handler) and thin handlers, nothing else."""
    assert len((ROOT / "pipelines" / "cli.py").read_text().splitlines()) < 250
