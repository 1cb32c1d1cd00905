"""House rules (README, architecture): no Python file in node/, models/, training/, peers/, demo/ or benchmarks/ over
500 lines; no function in node/ or models/ over 80 lines, decorators included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def long_functions(folder: Path) -> list[str]:
    """``path:line name (n lines)`` for every function under ``folder`` longer than `MAX_FUNCTION_LINES`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - start + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(folder.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_node_or_models_is_over_80_lines():
    assert long_functions(ROOT / "node") + long_functions(ROOT / "models") == []


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path / "pkg") == [f"pkg/m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]


def long_files(folder: Path) -> list[str]:
    """``path (n lines)`` for every Python file under ``folder`` longer than `MAX_FILE_LINES`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        if ".cache" in path.relative_to(folder).parts:  # demo/.cache: downloaded third-party code
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{path.relative_to(folder.parent)} ({lines} lines)")
    return found


PACKAGES = ("node", "models", "training", "peers", "demo", "benchmarks")


def test_no_file_in_the_project_is_over_500_lines():
    assert [f for p in PACKAGES for f in long_files(ROOT / p)] == []


def test_the_check_finds_a_long_file(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "short.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "long.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    assert long_files(tmp_path / "pkg") == [f"pkg/long.py ({MAX_FILE_LINES + 1} lines)"]
