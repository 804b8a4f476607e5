"""The Dockerfile, checked statically (no Docker engine here): it parses, pins its base
images, runs as a non-root user, installs the project the README way, and ships iptables.
Two images: the servers' (the default target) and the slim ``init`` target (the core
install, which tests/test_core_install.py runs meshguard-init and the CNI plugin with)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (PROJECT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


KNOWN = {"FROM", "RUN", "COPY", "ENV", "USER", "ENTRYPOINT", "CMD", "WORKDIR", "ARG", "LABEL"}


def test_every_instruction_is_known_and_stages_are_named_or_final():
    found = instructions()
    assert {keyword for keyword, _ in found} <= KNOWN
    froms = [args for keyword, args in found if keyword == "FROM"]
    # multi-stage: the two virtualenvs, the CNI shim, the init target, then the runtime (last:
    # the default)
    names = [f.split(" AS ")[1] if " AS " in f else None for f in froms]
    assert names == ["build-init", "build", "shim", "init", None]


def stages() -> dict[str | None, list[tuple[str, str]]]:
    """Each stage's instructions, by stage name (None: the unnamed last stage)."""
    found: dict[str | None, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in instructions():
        if keyword == "FROM":
            current = found.setdefault(args.split(" AS ")[1] if " AS " in args else None, [])
        current.append((keyword, args))
    return found


def test_the_init_target_has_the_core_install_and_every_netfilter_tool():
    # each virtualenv is built at the path its image runs it from (pip bakes it into the
    # console scripts' shebangs; tests/test_image.py runs them)
    (core,) = [args for keyword, args in stages()["build-init"] if keyword == "RUN"]
    assert re.search(r"python -m venv /opt/meshguard(\s|$)", core)
    assert re.search(r"/opt/meshguard/bin/pip install /src(\s|$)", core), "no extra"
    assert "pip uninstall -y -q pip setuptools" in core
    (server,) = [args for keyword, args in stages()["build"] if keyword == "RUN"]
    assert re.search(r"python -m venv /opt/meshguard(\s|$)", server)
    assert 'pip install "/src[server]"' in server
    init = stages()["init"]
    apt = next(args for keyword, args in init if keyword == "RUN" and "apt-get install" in args)
    assert {"iptables", "nftables", "iproute2"} <= set(shlex.split(apt.replace("&&", " ")))
    copies = [args for keyword, args in init if keyword == "COPY"]
    assert copies == [
        "--from=build-init /opt/meshguard /opt/meshguard",
        f"--from=shim /meshguard-cni {chart_values()['cni']['pluginBinary']}",
    ]
    assert ("ENTRYPOINT", '["meshguard"]') in init
    users = [args for keyword, args in init if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    runtime = stages()[None]
    assert [a for k, a in runtime if k == "COPY"] == ["--from=build /opt/meshguard /opt/meshguard"]


def chart_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((PROJECT / "charts/meshguard/values.yaml").read_text())
    return loaded


def test_the_shim_stage_builds_the_static_cni_executable_from_the_source():
    shim = stages()["shim"]
    assert ("COPY", "cni-shim /src/cni-shim") in shim
    runs = [args for keyword, args in shim if keyword == "RUN"]
    build = next(run for run in runs if run.startswith("gcc "))
    argv = shlex.split(build)
    assert "-static" in argv
    assert argv[argv.index("-o") + 1] == "/meshguard-cni"
    assert (PROJECT / argv[-1].removeprefix("/src/")).is_file()
    assert "cni-shim" not in (PROJECT / ".dockerignore").read_text()


def test_base_images_are_pinned_to_a_full_version():
    for keyword, args in instructions():
        if keyword == "FROM":
            image = args.split()[0]
            tag = image.partition(":")[2]
            assert tag and tag != "latest", image
            assert re.match(r"\d+\.\d+\.\d+-slim", tag), f"{image}: pin major.minor.patch, slim"


def test_runs_as_a_non_root_user_with_the_meshguard_entrypoint():
    found = instructions()
    users = [args for keyword, args in found if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    # each target (init, runtime) runs meshguard
    assert {args for keyword, args in found if keyword == "ENTRYPOINT"} == {'["meshguard"]'}


def test_installs_the_project_with_pip_and_iptables_for_meshguard_init():
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert any(re.search(r"pip install /src\b", run) for run in runs)
    apt = next(args for keyword, args in stages()[None] if "apt-get install" in args)
    assert {"iptables", "iproute2"} <= set(shlex.split(apt.replace("&&", " ")))
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    assert "pyproject.toml README.md /src/" in copies
