"""The core install (``pip install meshguard``, the slim init image) runs meshguard-init and
the CNI plugin, and nothing else is needed for them.

Each command runs in a subprocess whose imports are limited to the standard library,
meshguard and the distributions the core install brings (pyproject's ``dependencies``, read
back from the installed metadata, with their own dependencies): an import of anything else
fails as it would in the init image. The commands run for real — meshguard-init into all
three netfilter backends, the CNI plugin's ADD/CHECK/DEL against a scripted API server —
so imports made on the way (a backend's module, an error path) count too. A command of an
extra, run the same way, must name the extra instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import meshguard
from meshguard.cli import EXTRA_OF_MODULE, EXTRAS, build_parser
from meshguard.sandbox.netns import NetworkNamespace
from tests.cni.test_plugin_netns import (  # noqa: F401 - fixtures
    VALIDATE_AS,
    api,
    injected_pod,
    netns,
    serve,
)
from tests.rules.test_backends import compiled, installed_backend, load_iptables, meshguard_in
from tests.support.keys import SIGNER, trusted_keys_file
from tests.support.netfilter import NETFILTERS, Netfilter, nft_golden

#: Runs a module as ``python -m`` would (or a script, argv[2] ending in .py), after installing
#: an import hook that lets through only the standard library and the top-level modules named
#: in argv[1].
CORE_ONLY = """
import importlib.abc, runpy, sys
allowed = set(sys.argv[1].split(","))
class CoreOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        if top in allowed or top in sys.stdlib_module_names or top.startswith("_sysconfigdata"):
            return None
        raise ModuleNotFoundError(f"No module named {name!r} (not in the core install)", name=name)
sys.meta_path.insert(0, CoreOnly())
module = sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
if module.endswith(".py"):
    runpy.run_path(module, run_name="__main__")
else:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert found, requirement
    return _canonical(found.group())


def _extra(requirement: str) -> str | None:
    found = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", requirement)
    return found.group(1) if found else None


#: This checkout's pyproject.toml, against which the installed metadata is checked.
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@functools.cache
def meshguard_requirements() -> tuple[str, ...]:
    """meshguard's requirements as installed (what pip resolved the core install from), once
    checked to be those of this checkout's pyproject.toml.

    An editable install keeps the metadata of the pyproject it was made from: after a merge
    that changes the dependencies, every test here would judge the code against the old
    split (a new core library "not in the core install") until ``pip install -e`` runs again.
    """
    installed = tuple(importlib.metadata.requires("meshguard") or [])
    if not PYPROJECT.is_file():
        return installed
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    declared = {(_requirement_name(r), None) for r in project.get("dependencies", [])} | {
        (_requirement_name(r), extra)
        for extra, requirements in project.get("optional-dependencies", {}).items()
        for r in requirements
    }
    found = {(_requirement_name(r), _extra(r)) for r in installed}
    if found != declared:
        pytest.fail(
            f"meshguard's installed metadata is not {PYPROJECT}'s (pyproject changed since the"
            f" install): only in pyproject {sorted(declared - found, key=str)}, only installed"
            f" {sorted(found - declared, key=str)}; re-run: .venv/bin/python -m pip install"
            " -e '.[test]'",
            pytrace=False,
        )
    return installed


def core_distributions() -> set[str]:
    """meshguard's distribution and everything its requirements without an extra pull in."""
    seen: set[str] = set()
    todo = ["meshguard"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        requirements = (
            meshguard_requirements()
            if name == "meshguard"
            else importlib.metadata.requires(name) or []
        )
        for requirement in requirements:
            if _extra(requirement) is None:
                todo.append(_requirement_name(requirement))
    return seen


def modules_of(distributions: Iterable[str]) -> set[str]:
    wanted = set(distributions)
    return {
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if any(_canonical(owner) in wanted for owner in owners)
    }


def core_modules() -> str:
    return ",".join(sorted(modules_of(core_distributions()) | {"meshguard"}))


def core_only(module: str, *argv: str) -> list[str]:
    return [sys.executable, "-c", CORE_ONLY, core_modules(), module, *argv]


def run(
    argv: list[str], *, stdin: str = "", env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


# --- the split itself ---------------------------------------------------------------------


def test_the_core_install_is_pydantic_and_cryptography_only():
    # cryptography: the CNI plugin and meshguard-init verify the webhook's Ed25519 signature
    assert core_distributions() - {"meshguard"} == {
        "pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection",
        "cryptography", "cffi", "pycparser",
    }  # fmt: skip


def imported_by_meshguard() -> set[str]:
    """The top-level modules meshguard's source imports, anywhere (lazy imports included)."""
    package = Path(meshguard.__file__).parent
    found: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - {"meshguard"}


def test_every_library_outside_the_core_names_the_extra_that_brings_it():
    """EXTRA_OF_MODULE (the CLI's "pip install 'meshguard[...]'" hint) covers every library
    meshguard imports that the core install leaves out, each with an extra that provides it."""
    direct: dict[str, set[str]] = {}
    for requirement in meshguard_requirements():
        extra = _extra(requirement)
        if extra is not None:
            direct.setdefault(extra, set()).add(_requirement_name(requirement))
    outside = imported_by_meshguard() - modules_of(core_distributions())
    assert outside == set(EXTRA_OF_MODULE)
    for module, extra in EXTRA_OF_MODULE.items():
        assert module in modules_of(direct[extra]), f"{module}: no requirement of [{extra}]"


#: The extras of the test suite and the benchmarks, whose libraries the product never imports.
DEVELOPMENT_EXTRAS = ("test", "bench")


def test_every_declared_dependency_is_imported_by_the_product():
    """The converse: a requirement of the core install or of a product extra that no module
    of meshguard imports is dead weight in every image (issue 29.3)."""
    imported = imported_by_meshguard() | {"pydantic"}
    unused = []
    for requirement in meshguard_requirements():
        extra = _extra(requirement)
        name = _requirement_name(requirement)
        if extra in DEVELOPMENT_EXTRAS or name == "meshguard":
            continue
        if not modules_of({name}) & imported:
            unused.append(f"{name} ({extra or 'core'})")
    assert unused == []


# --- what runs on nodes and in pods, with the core install only ----------------------------


def test_the_cni_plugin_answers_version_and_passes_other_pods_through():
    done = run(core_only("meshguard.cni"), stdin='{"cniVersion": "1.0.0"}',
               env={"CNI_COMMAND": "VERSION"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["supportedVersions"][-1] == "1.1.0"
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}
    conf = {"cniVersion": "1.0.0", "name": "k8s", "type": "meshguard-cni", "prevResult": prev}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/var/run/netns/none", "CNI_ARGS": "IgnoreUnknown=1"}  # fmt: skip
    done = run(core_only("meshguard.cni"), stdin=json.dumps(conf), env=env)
    assert (done.returncode, json.loads(done.stdout)) == (0, prev), done.stderr


def test_the_node_agent_installs_and_uninstalls_with_the_core_install(tmp_path: Path):
    conf_dir, bin_dir, account = tmp_path / "net.d", tmp_path / "bin", tmp_path / "sa"
    for directory in (conf_dir, bin_dir, account):
        directory.mkdir()
    (account / "token").write_text("token")
    (account / "ca.crt").write_text("CA")
    (tmp_path / "shim").write_bytes(b"shim")
    plugins = [{"type": "calico"}, {"type": "istio-cni"}]
    conflist = conf_dir / "10-calico.conflist"
    conflist.write_text(json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": plugins}))
    dirs = ["--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)]
    install = ["install", *dirs, "--once", "--plugin-binary", str(tmp_path / "shim"),
               "--service-account-dir", str(account),
               "--trusted-keys", str(trusted_keys_file(tmp_path))]  # fmt: skip
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    done = run(core_only("meshguard", "cni", *install), env=in_cluster)
    assert done.returncode == 0, done.stderr
    chained = [p["type"] for p in json.loads(conflist.read_text())["plugins"]]
    assert chained == ["calico", "istio-cni", "meshguard-cni"]
    done = run(core_only("meshguard", "cni", "uninstall", *dirs))
    assert done.returncode == 0, done.stderr
    assert json.loads(conflist.read_text())["plugins"] == plugins
    assert not (bin_dir / "meshguard-cni").exists()


def test_init_refuses_a_malformed_ruleset_with_its_own_message(tmp_path: Path):
    ruleset = tmp_path / "ruleset"
    ruleset.write_text('{"version": 1, "ipv4": ')
    done = run(core_only("meshguard", "init", "--ruleset-file", str(ruleset)))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith("meshguard init: ")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "stdin", "extra"),
    [
        (["serve-webhook", "--cert", "c", "--key", "k"], "", "server"),
        (["serve-authz", "--pods", "p.yaml"], "", "server"),
        (["rules", "-f", "-"], "kind: Pod\n", "cli"),
        (["describe", "-f", "-"], "kind: Pod\n", "cli"),
        (["unprotected", "-A"], "", "cli"),
        (["demo"], "", "demo"),
    ],
    ids=["serve-webhook", "serve-authz", "rules", "describe", "unprotected", "demo"],
)
def test_a_command_of_an_extra_names_the_extra(argv, stdin, extra):
    done = run(core_only("meshguard", *argv), stdin=stdin)
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    found = re.fullmatch(
        rf"meshguard {argv[0]}: needs the Python package that provides '(\w+)', which this"
        r" install leaves out \(.*\): pip install 'meshguard\[(\w+)\]'",
        last,
    )
    assert found, last
    module, named = found.groups()
    assert named == extra  # the command's extra, whichever of its libraries was missed first
    assert EXTRAS.index(EXTRA_OF_MODULE[module]) <= EXTRAS.index(extra)
    assert "Traceback" not in done.stderr


#: Imports each handler module (argv: specs) with the core-only hook in place; prints
#: {spec: missing top-level module or null}.
HANDLERS_IMPORT = """
import importlib, json, sys
missing = {}
for spec in sys.argv[1:]:
    try:
        importlib.import_module(spec.partition(":")[0])
        missing[spec] = None
    except ModuleNotFoundError as exc:
        missing[spec] = (exc.name or "").partition(".")[0]
print(json.dumps(missing))
"""


def test_every_command_runs_on_the_core_install_or_declares_its_extra(tmp_path: Path):
    """What runs in pods and on nodes (init, cni ...) imports with the core install alone;
    every other command declares the extra it needs (so its error names it)."""
    commands = dict(subcommands(build_parser()))
    script = tmp_path / "handlers.py"
    script.write_text(HANDLERS_IMPORT)
    specs = sorted({spec for spec, _ in commands.values()})
    done = run(core_only(str(script), *specs))
    assert done.returncode == 0, done.stderr
    missing = json.loads(done.stdout.splitlines()[-1])
    core = {name for name, (spec, _) in commands.items() if missing[spec] is None}
    assert {"init", "cni validate", "cni install", "cni uninstall", "completion"} <= core
    for name, (spec, extra) in commands.items():
        if missing[spec] is None:
            continue
        assert extra is not None, f"meshguard {name} needs {missing[spec]!r}: it names no extra"
        assert EXTRAS.index(EXTRA_OF_MODULE[missing[spec]]) <= EXTRAS.index(extra)


def subcommands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> Iterator[tuple[str, tuple[str, str | None]]]:
    """(command line, (handler spec, declared extra)) of every subcommand, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                spec = sub.get_default("handler")
                if isinstance(spec, str):
                    yield f"{prefix}{name}", (spec, sub.get_default("extra"))
                yield from subcommands(sub, f"{prefix}{name} ")


@pytest.mark.root
@pytest.mark.parametrize("netfilter", NETFILTERS, ids=str)
def test_init_installs_into_each_backend_with_the_core_install(
    netfilter: Netfilter, tmp_path: Path
):
    native = netfilter is Netfilter.NFTABLES
    with NetworkNamespace() as ns:
        if native:
            ns.run(["nft", "-f", "-"], stdin=nft_golden("ipv6-ipnets.golden"))
        else:
            load_iptables(ns, netfilter.backend)
        ruleset = tmp_path / "ruleset"
        ruleset.write_text(compiled(native=native).to_json())
        done = run(ns.argv(core_only("meshguard", "init", "--ruleset-file", str(ruleset))))
        assert done.returncode == 0, done.stderr
        assert installed_backend(done) == {netfilter.value}
        assert meshguard_in(ns)[netfilter.value] is True


@pytest.mark.root
def test_the_cni_plugin_installs_checks_and_removes_with_the_core_install(
    netns: str,  # noqa: F811 - the fixture
    api: dict[str, Any],  # noqa: F811 - the fixture
):
    pod = injected_pod()
    serve(pod)
    init_containers = pod["spec"]["initContainers"]
    (validation,) = [c for c in init_containers if c["name"] == "meshguard-validation"]
    uid = validation["securityContext"]["runAsUser"]
    conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshguard-cni",
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []},
            "kubernetes": api, "trustedKeys": SIGNER.public_pem()}  # fmt: skip
    env = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": f"/var/run/netns/{netns}",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=shop;"
                       "K8S_POD_UID=uid-1"}  # fmt: skip
    for command in ("ADD", "CHECK", "DEL"):
        done = run(core_only("meshguard.cni"), stdin=json.dumps(conf),
                   env={**env, "CNI_COMMAND": command})  # fmt: skip
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        if command == "ADD":
            check = core_only(str(VALIDATE_AS), str(uid))
            validate = run(["ip", "netns", "exec", netns, *check])
            assert validate.returncode == 0, validate.stderr
