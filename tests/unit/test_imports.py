"""tools/ holds leaves: no module of the package outside qwen_moe_ft/tools imports qwen_moe_ft.tools (the tools
may import the package, never the reverse)."""
import ast
from pathlib import Path

import qwen_moe_ft

PACKAGE = Path(qwen_moe_ft.__file__).parent
TOOLS = "qwen_moe_ft.tools"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Absolute names of the modules `path` imports, relative imports resolved; `from X import y` gives X.y as
    well, since y may be a module. `root` is the folder that holds the package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def test_imported_resolves_relative_imports(tmp_path):
    module = tmp_path / "qwen_moe_ft" / "bench" / "benchmark.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..tools import plot\nfrom . import harness\nimport qwen_moe_ft.tools.bench as b\n")
    assert {"qwen_moe_ft.tools.plot", "qwen_moe_ft.bench.harness", "qwen_moe_ft.tools.bench"} <= imported(module, tmp_path)


def test_no_module_outside_tools_imports_tools():
    importers = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in PACKAGE.rglob("*.py") if not path.is_relative_to(PACKAGE / "tools")
        for name in imported(path) if name == TOOLS or name.startswith(TOOLS + "."))
    assert importers == []
