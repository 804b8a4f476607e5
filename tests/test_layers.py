"""The package's layers: which module may import which, and what a light command loads.

Pure logic (policy, pod, rules compiler, authz decision) sits below the I/O layers (webhook,
authz server, sandbox) and the CLI on top; an import that points upwards or sideways couples
components that the design keeps apart, and makes a small command load a heavy library.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "meshguard"

#: module prefix -> prefixes it must never import (directly).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "meshguard.rules": (
        "meshguard.authz",
        "meshguard.webhook",
        "meshguard.inject",
        "meshguard.sandbox",
        "meshguard.cli",
    ),
    "meshguard.authz": (
        "meshguard.rules",
        "meshguard.webhook",
        "meshguard.inject",
        "meshguard.sandbox",
        "meshguard.cli",
    ),
    "meshguard.inject": (
        "meshguard.webhook",
        "meshguard.authz",
        "meshguard.sandbox",
        "meshguard.cli",
    ),
    "meshguard.webhook": ("meshguard.authz", "meshguard.sandbox", "meshguard.cli"),
    "meshguard.sandbox": ("meshguard.cli", "meshguard.webhook"),
    "meshguard.cni": (
        "meshguard.webhook",
        "meshguard.authz",
        "meshguard.sandbox",
        "meshguard.inject",
        "meshguard.cli",
    ),
    "meshguard.mesh": ("meshguard.",),
    "meshguard.annotation_keys": ("meshguard.",),
    "meshguard.errors": ("meshguard.",),
    "meshguard.yaml_io": ("meshguard.",),
    # The status annotation's model: below everything that writes or reads it.
    "meshguard.status": (
        "meshguard.admitted",
        "meshguard.policy",
        "meshguard.pod",
        "meshguard.rules",
        "meshguard.authz",
        "meshguard.webhook",
        "meshguard.inject",
        "meshguard.sandbox",
        "meshguard.cni",
        "meshguard.cli",
    ),
    "meshguard.process": ("meshguard.rules", "meshguard.sandbox", "meshguard.cli"),
    "meshguard.policy": (
        "meshguard.rules",
        "meshguard.authz",
        "meshguard.webhook",
        "meshguard.sandbox",
        "meshguard.cli",
    ),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for imported in sorted(_imports(path)):
            if not imported.startswith("meshguard"):
                continue
            if (
                module != "meshguard.__main__"
                and not module.startswith("meshguard.cli")
                and imported.startswith("meshguard.cli")
            ):
                found.append(f"{module} imports {imported} (only the CLI may)")
            for owner, forbidden in FORBIDDEN.items():
                if module == owner or module.startswith(owner + "."):
                    found.extend(
                        f"{module} imports {imported}"
                        for prefix in forbidden
                        if imported.startswith(prefix) and not imported.startswith(owner)
                    )
    return found


def test_no_module_imports_across_its_layer() -> None:
    assert _violations() == []


def test_the_checker_sees_a_forbidden_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "meshguard"
    (fake / "authz").mkdir(parents=True)
    (fake / "authz" / "decision.py").write_text("from meshguard.rules.compiler import X\n")
    (fake / "sandbox").mkdir()
    (fake / "sandbox" / "run.py").write_text("import meshguard.cli\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == [
        "meshguard.authz.decision imports meshguard.rules.compiler",
        "meshguard.authz.decision imports meshguard.rules.compiler.X",
        "meshguard.sandbox.run imports meshguard.cli (only the CLI may)",
        "meshguard.sandbox.run imports meshguard.cli",
    ]


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("meshguard.authz.envoy_config", "grpc"),
        ("meshguard.rules.install", "kubernetes"),
        ("meshguard.cli.init", "kubernetes"),
        ("meshguard.cli.init", "grpc"),
        ("meshguard.cli.init", "aiohttp"),
    ],
)
def test_a_light_module_does_not_load_a_heavy_library(module: str, heavy: str) -> None:
    code = (
        f"import sys, {module}; "
        f"print(any(m == {heavy!r} or m.startswith({heavy!r} + '.') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", f"importing {module} loads {heavy}"
