"""The Dockerfile, checked statically (no Docker engine here): it parses, pins its base
images, runs as a non-root user, installs the project the README way, and ships iptables."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

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
    assert len(froms) == 2, "multi-stage: build, then runtime"
    assert froms[0].endswith(" AS build")


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
    assert [args for keyword, args in found if keyword == "ENTRYPOINT"] == ['["meshguard"]']


def test_installs_the_project_with_pip_and_iptables_for_meshguard_init():
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert any(re.search(r"pip install /src\b", run) for run in runs)
    apt = next(run for run in runs if "apt-get install" in run)
    assert {"iptables", "iproute2"} <= set(shlex.split(apt.replace("&&", " ")))
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    assert "pyproject.toml README.md /src/" in copies
