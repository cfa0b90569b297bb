"""The architecture's rules, checked on the source: import directions, pure modules, strict typing.

The project's layering (README, Layout): dependencies point one way (cli and dev tooling -> operator
and trainer -> api, the shared contract, which imports only the standard library); the operator
never imports the trainer, nor the trainer the operator; neither imports the CLI or the dev tooling, and the CLI imports the dev
tooling only inside the commands that need it; only the operator's handler, client and HTTP-server modules touch kopf or
the Kubernetes client; the operator type-checks under `mypy --strict`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"api": "kubetune.api", "operator": "kubetune.operator", "trainer": "kubetune.trainer",
            "cli": "kubetune.cli", "dev": "kubetune.dev"}

# Operator modules allowed to import kopf or the kubernetes client (side effects live here).
OPERATOR_NETWORK_MODULES = {"jobs/handlers.py", "client.py", "progress/server.py", "__main__.py", "runtime.py",
                            "sweeps/handlers.py", "sweeps/client.py"}


def imports_of_node(node: ast.AST) -> set[str]:
    """The module names one import statement names (`from x import y` -> x and x.y)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return set()


def imports_of(path: Path) -> set[str]:
    """Every module name imported by a source file, at any depth (absolute names)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names |= imports_of_node(node)
    return names


def modules(folder: str) -> list[Path]:
    """The source files of a folder and its subpackages."""
    return sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


class TestImportDirection:
    @pytest.mark.parametrize("path", modules("trainer"), ids=relative)
    def test_trainer_never_imports_the_operator_the_cli_or_dev_tooling(self, path: Path) -> None:
        bad = {n for n in imports_of(path) if n.startswith(("kubetune.operator", "kubetune.dev", "kubetune.cli"))}
        assert not bad, f"{relative(path)} imports {sorted(bad)}"

    @pytest.mark.parametrize("path", modules("trainer/serve"), ids=relative)
    def test_the_server_imports_no_training_code(self, path: Path) -> None:
        """The serving subpackage shares the trainer image, not the training code (docs/serving.md)."""
        bad = {n for n in imports_of(path) if n.startswith("kubetune.") and not n.startswith(
            ("kubetune.trainer.serve", "kubetune.api"))}
        assert not bad, f"{relative(path)} imports {sorted(bad)}"

    @pytest.mark.parametrize("path", modules("operator"), ids=relative)
    def test_operator_imports_neither_the_trainer_nor_dev_tooling(self, path: Path) -> None:
        names = imports_of(path)
        dev = {n for n in names if n.startswith(("kubetune.dev", "kubetune.cli"))}
        trainer = {n for n in names if n.startswith("kubetune.trainer")}
        assert not dev, f"{relative(path)} imports dev tooling {sorted(dev)}"
        assert not trainer, f"{relative(path)} imports the trainer {sorted(trainer)}: the contract is kubetune.api"

    @pytest.mark.parametrize("path", modules("cli"), ids=relative)
    def test_the_cli_imports_dev_tooling_only_inside_the_commands_that_need_it(self, path: Path) -> None:
        """The user-facing command ships without the dev tooling (not in the images, Dockerfile):
        importing it, or running a command that does not need it, must not need `kubetune.dev`."""
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {n for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for n in imports_of_node(node)}
        assert not {n for n in top if n.startswith("kubetune.dev")}, f"{relative(path)} imports dev tooling at the top"

    @pytest.mark.parametrize("path", modules("dev"), ids=relative)
    def test_dev_tooling_never_imports_the_cli(self, path: Path) -> None:
        bad = {n for n in imports_of(path) if n.startswith("kubetune.cli")}
        assert not bad, f"{relative(path)} imports {sorted(bad)}"

    @pytest.mark.parametrize("path", modules("api"), ids=relative)
    def test_the_shared_contract_imports_only_the_standard_library(self, path: Path) -> None:
        outside = {n for n in imports_of(path)
                   if n.split(".")[0] not in sys.stdlib_module_names and not n.startswith("kubetune.api")}
        assert not outside, f"{relative(path)} imports {sorted(outside)}; both images import it, so it stays stdlib-only"

    def test_the_shared_contract_imports_nothing_heavy(self) -> None:
        """The operator image has no torch, the trainer image no kopf: both import the whole contract."""
        code = ("import sys, kubetune.api.messages, kubetune.api.layout, kubetune.api.process, kubetune.api.config\n"
                "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'peft', 'kopf', 'kubernetes',\n"
                "                           'pydantic', 'yaml') if m in sys.modules)\n"
                "print(','.join(heavy))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "", f"importing kubetune.api pulled in {out.strip()}"


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = [PACKAGES[relative.parts[0]], *relative.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_import_cycles_not_even_through_imports_inside_functions() -> None:
    """A cycle broken by a function-level import is still a cycle: it hides a missing module."""
    paths = [p for folder in PACKAGES for p in sorted((REPO / folder).rglob("*.py")) if "__pycache__" not in p.parts]
    known = {module_name(p): p for p in paths}
    graph = {name: {n for n in imports_of(path) if n in known and n != name} for name, path in known.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


class TestPureOperatorModules:
    @pytest.mark.parametrize("path", [p for p in modules("operator")
                                      if str(p.relative_to(REPO / "operator")) not in OPERATOR_NETWORK_MODULES],
                             ids=relative)
    def test_imports_neither_kopf_nor_the_kubernetes_client(self, path: Path) -> None:
        bad = {n for n in imports_of(path) if n.split(".")[0] in ("kopf", "kubernetes", "aiohttp")}
        assert not bad, f"{relative(path)} should be pure but imports {sorted(bad)}"


class TestLayout:
    @pytest.mark.parametrize("folder", sorted(PACKAGES))
    def test_source_folders_are_namespace_portions_so_operator_never_shadows_the_stdlib(self, folder: str) -> None:
        assert not (REPO / folder / "__init__.py").exists()

    def test_stdlib_operator_module_wins_from_the_repository_root(self) -> None:
        out = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__)"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        assert "/work" not in out and out.strip().endswith("operator.py"), out


@pytest.mark.slow
def test_operator_type_checks_strictly(tmp_path: Path) -> None:
    # The editable install maps folders onto kubetune.*; mypy needs a real tree.
    root = tmp_path / "kubetune"
    root.mkdir()
    for folder in PACKAGES:
        (root / folder).symlink_to(REPO / folder)
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "-p", "kubetune.operator",
                           "-p", "kubetune.api"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
