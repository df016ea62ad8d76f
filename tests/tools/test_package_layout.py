"""The tools as a package: every CLI has a console script and `python -m`, nothing edits sys.path, and the
runtime package never imports the tools or the test support (read from the source, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

from tools.deploy.bundle import appliance_pyproject

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"


def scripts() -> dict[str, str]:
    entries: dict[str, str] = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    return entries


def module_file(module: str) -> Path:
    return REPO / (module.replace(".", "/") + ".py")


def top_level_functions(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_every_console_script_names_a_main() -> None:
    for name, target in scripts().items():
        module, _, function = target.partition(":")
        path = module_file(module)
        assert path.is_file(), f"{name}: {path} missing"
        assert function in top_level_functions(path), f"{name}: {module} has no {function}()"


def test_every_tool_cli_has_a_console_script_and_runs_with_python_m() -> None:
    targets = {target.partition(":")[0] for target in scripts().values()}
    for path in sorted((REPO / "tools").rglob("*.py")):
        if "main" not in top_level_functions(path):
            continue
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        assert module in targets, f"{module} has main() but no console script in pyproject.toml"
        assert 'if __name__ == "__main__":' in path.read_text(), f"{module}: no __main__ block"


def test_nothing_edits_sys_path() -> None:
    for folder in ("tools", "testsupport"):
        for path in (REPO / folder).rglob("*.py"):
            assert "sys.path" not in path.read_text(), f"{path.relative_to(REPO)} edits sys.path"


def test_the_runtime_never_imports_tools_or_testsupport() -> None:
    for path in (REPO / "appliance").rglob("*.py"):
        for module in imported_modules(path):
            top = module.split(".")[0]
            assert top not in {"tools", "testsupport", "tests"}, f"{path.relative_to(REPO)} imports {module}"


def test_the_carts_wheel_leaves_the_tool_scripts_out() -> None:
    kept = tomllib.loads(appliance_pyproject(PYPROJECT.read_text()))
    assert kept["project"]["scripts"] == {"cxr-appliance": "appliance.cli:main"}
    whole = tomllib.loads(PYPROJECT.read_text())
    del whole["project"]["scripts"], kept["project"]["scripts"]
    assert kept == whole
