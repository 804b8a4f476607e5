"""The slim init image against the servers' image: installed size and ``meshguard init`` time.

What it measures and how: ``benchmarks/README.md``, section ``init_image.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import (
    ROOT,
    Machine,
    machine,
    markdown_table,
    median_of,
    script_parser,
)
from benchmarks.harness import alternating
from benchmarks.kernel.pod import compile_synthetic
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.dockerfile import BuiltStage, Replay

SIZES = (2, 64)
#: The issue's goal: the init image at most a quarter of the servers' image.
GOAL_RATIO = 0.25
APT = {"server": ("iptables", "iproute2"), "init": ("iptables", "nftables", "iproute2")}
#: Packages of python:3.11-slim-bookworm: debian:bookworm-slim's, and the runtime libraries
#: and certificates the Python image installs. A package listed here is not counted as added.
BASE_PACKAGES = frozenset(
    {
        "adduser", "apt", "base-files", "base-passwd", "bash", "bsdutils", "ca-certificates",
        "coreutils", "dash", "debconf", "debian-archive-keyring", "debianutils", "diffutils",
        "dpkg", "findutils", "gcc-12-base", "gpgv", "grep", "gzip", "hostname",
        "init-system-helpers", "libacl1", "libapt-pkg6.0", "libattr1", "libaudit-common",
        "libaudit1", "libblkid1", "libbz2-1.0", "libc-bin", "libc6", "libcap-ng0", "libcap2",
        "libcom-err2", "libcrypt1", "libdb5.3", "libdebconfclient0", "libexpat1", "libffi8",
        "libgcc-s1", "libgcrypt20", "libgdbm6", "libgmp10", "libgnutls30", "libgpg-error0",
        "libgssapi-krb5-2", "libhogweed6", "libidn2-0", "libk5crypto3", "libkeyutils1",
        "libkrb5-3", "libkrb5support0", "liblz4-1", "liblzma5", "libmd0", "libmount1",
        "libncursesw6", "libnettle8", "libnsl2", "libp11-kit0", "libpam-modules",
        "libpam-modules-bin", "libpam-runtime", "libpam0g", "libpcre2-8-0", "libreadline8",
        "libseccomp2", "libselinux1", "libsemanage-common", "libsemanage2", "libsepol2",
        "libsmartcols1", "libsqlite3-0", "libssl3", "libstdc++6", "libsystemd0", "libtasn1-6",
        "libtinfo6", "libtirpc-common", "libtirpc3", "libudev1", "libunistring2", "libuuid1",
        "libxxhash0", "libzstd1", "login", "mawk", "mount", "ncurses-base", "ncurses-bin",
        "netbase", "openssl", "passwd", "perl-base", "readline-common", "sed", "sysvinit-utils",
        "tar", "tzdata", "usr-is-merged", "util-linux", "util-linux-extra", "zlib1g",
    }
)  # fmt: skip


class Image(TypedDict):
    """One image's own layers: its virtualenv and what apt adds to the base."""

    venv_kib: int
    largest_kib: list[tuple[str, int]]  # the largest site-packages entries
    apt_packages: tuple[str, ...]
    apt_added_kib: dict[str, int] | None  # None: no apt here
    apt_total_kib: int | None


class InitRow(TypedDict):
    containers: int
    init_ms: dict[str, float]  # image -> median
    samples_ms: dict[str, list[float]]
    ratio: float  # init image / servers' image


class Document(TypedDict):
    """What ``--json FILE`` writes."""

    images: dict[str, Image]  # "init", "server"
    totals_kib: dict[str, int]
    size_ratio: float
    venv_ratio: float
    goal_ratio: float
    init: list[InitRow]
    reps: int
    machine: Machine
    seconds: float


def disk_kib(path: Path) -> int:
    done = subprocess.run(["du", "-sk", str(path)], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[0])


def largest(venv: Path, count: int = 6) -> list[tuple[str, int]]:
    (site,) = venv.glob("lib/python3*/site-packages")
    sizes = [(entry.name, disk_kib(entry)) for entry in site.iterdir()]
    return sorted(sizes, key=lambda item: -item[1])[:count]


def apt_added(packages: tuple[str, ...]) -> dict[str, int] | None:
    """Installed-Size (KiB) of each package of the closure that the base image lacks."""
    if shutil.which("apt-cache") is None or shutil.which("dpkg-query") is None:
        return None
    done = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    closure = {line.strip() for line in done.stdout.splitlines() if line and not line[0].isspace()}
    added = {}
    for name in sorted(closure - BASE_PACKAGES):
        if name.startswith("<"):  # a virtual package: its provider is in the closure
            continue
        if name.endswith(":i386"):
            continue
        shown = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status} ${Installed-Size}", name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        # Not installed: an alternative (``a | b``) apt did not pick; the packages are
        # installed on this host, so what they pulled in is.
        if shown.returncode == 0 and shown.stdout.startswith("install ok installed"):
            added[name] = int(shown.stdout.split()[-1])
    return added


def time_init(replay: Replay, image: BuiltStage, ruleset: str) -> float:
    with NetworkNamespace() as ns:
        argv = ["meshguard", "init", "--ruleset-file", f"/tmp/{ruleset}"]
        started = time.perf_counter()
        done = replay.run(image, argv, user="0:0", wrap=ns.argv([]))
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"meshguard init failed in the replayed image: {done.stderr}")
    return seconds


def measure_init(replay: Replay, images: dict[str, BuiltStage], reps: int) -> list[InitRow]:
    rows: list[InitRow] = []
    for n in SIZES:
        ruleset = f"ruleset-{n}.json"
        for image in images.values():
            (image.root / "tmp" / ruleset).write_text(compile_synthetic(n).to_json())
        samples: dict[str, list[float]] = {target: [] for target in images}
        for image in images.values():  # warm-up: page cache
            time_init(replay, image, ruleset)
        for rep in range(reps):
            for target in alternating(list(images), rep):
                samples[target].append(time_init(replay, images[target], ruleset) * 1000)
        medians = {target: median_of(values) for target, values in samples.items()}
        rows.append({"containers": n, "init_ms": medians, "samples_ms": samples,
                     "ratio": medians["init"] / medians["server"]})  # fmt: skip
        print(f"[init-image] {n} containers: init image {medians['init']:.1f} ms, servers'"
              f" image {medians['server']:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def measure(*, quick: bool) -> Document:
    began = time.perf_counter()
    reps = 3 if quick else 9
    with Replay(ROOT / "Dockerfile", ROOT) as replay:
        images = {"init": replay.build(target="init"), "server": replay.build()}
        measured: dict[str, Image] = {}
        for target, image in images.items():
            venv = image.root / "opt" / "meshguard"
            added = apt_added(APT[target])
            measured[target] = {
                "venv_kib": disk_kib(venv),
                "largest_kib": largest(venv),
                "apt_packages": APT[target],
                "apt_added_kib": added,
                "apt_total_kib": sum(added.values()) if added is not None else None,
            }
        rows = measure_init(replay, images, reps)
    totals = {t: image["venv_kib"] + (image["apt_total_kib"] or 0) for t, image in measured.items()}
    return {
        "images": measured,
        "totals_kib": totals,
        "size_ratio": totals["init"] / totals["server"],
        "venv_ratio": measured["init"]["venv_kib"] / measured["server"]["venv_kib"],
        "goal_ratio": GOAL_RATIO,
        "init": rows,
        "reps": reps,
        "machine": machine(),
        "seconds": time.perf_counter() - began,
    }


def mb(kib: float) -> str:
    return f"{kib / 1024:.1f} MB"


def _size_row(name: str, image: Any) -> list[str]:
    apt = image["apt_total_kib"]
    biggest = ", ".join(f"{entry} {mb(kib)}" for entry, kib in image["largest_kib"][:4])
    total = image["venv_kib"] + (apt or 0)
    apt_cell = f"{mb(apt) if apt is not None else '-'} ({' '.join(image['apt_packages'])})"
    return [name, mb(image["venv_kib"]), apt_cell, mb(total), biggest]


def markdown(data: Document | dict[str, Any]) -> list[str]:
    """The report's section (``python -m benchmarks`` and ``--markdown`` print the same)."""
    init, server = data["images"]["init"], data["images"]["server"]
    init_table = markdown_table(
        ["containers", "init image ms", "servers' image ms", "init / servers'", "samples (init)"],
        [[row["containers"], f"{row['init_ms']['init']:.1f}", f"{row['init_ms']['server']:.1f}",
          f"{row['ratio']:.2f}", ", ".join(f"{s:.0f}" for s in row["samples_ms"]["init"])]
         for row in data["init"]],
    )  # fmt: skip
    ok = data["size_ratio"] <= data["goal_ratio"]
    lines = [
        "## The slim init image (benchmarks/init_image.py)",
        "",
        "No container engine here: each image is built by replaying the Dockerfile's steps"
        " (tests/support/dockerfile.py) and its own layers are measured. The virtualenv:"
        " `pip install /src` (the core install, pip and"
        " setuptools removed after, as the `init` target does) against `pip install"
        ' "/src[server]"` (the servers\' image), `du -sk`. What apt adds: the closure of each'
        " target's `apt-get install` (`Depends` only, as `--no-install-recommends`) less the"
        " packages python:3.11-slim-bookworm already has (the list in the script), by dpkg's"
        " Installed-Size on this bookworm host. The shared base (Debian slim + the Python"
        " interpreter) is not counted; the issue's 248 MB is the servers' virtualenv.",
        "",
        *markdown_table(
            ["image", "virtualenv", "apt adds", "total", "largest in site-packages"],
            [_size_row("init (`--target init`)", init), _size_row("servers' (default)", server)],
        ),
    ]
    added = init["apt_added_kib"] or {}
    lines += [
        "",
        f"init / servers': {data['size_ratio']:.3f} of the total,"
        f" {data['venv_ratio']:.3f} of the virtualenv. Goal <= {data['goal_ratio']}:"
        f" {'**met**' if ok else '**not met**'}.",
        "",
        "Packages apt adds to the init image: "
        + ", ".join(f"{name} {kib} KiB" for name, kib in sorted(added.items(), key=lambda x: -x[1]))
        + ".",
        "",
        "`meshguard init --ruleset-file F`, each image's entrypoint in the image's root as"
        " the Dockerfile's steps build it (byte-compiled by pip) in a fresh network"
        f" namespace, wall time, median of {data['reps']}"
        " alternating runs after a warm-up; the servers' virtualenv is the baseline:",
        "",
        *init_table,
        "",
        "meshguard init imports nothing of the servers' libraries (tests/test_core_install.py"
        " runs it with them blocked), so the start is the same from either image; what the"
        " slim image saves is the pull and the disk on every node.",
        "",
    ]
    return lines


def main(argv: Sequence[str]) -> int:
    parser = script_parser(
        "benchmarks.init_image",
        description="Installed size of the slim init image against the servers' image, and"
        " meshguard init's wall time from each.",
        quick="3 runs per figure instead of 9, about 1 min",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="the default (kept for older commands)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("init_image.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    data = measure(quick=args.quick)
    from benchmarks.suite.report import finish_script  # noqa: PLC0415 - the suite imports this
    from benchmarks.suite.sections import image_section  # noqa: PLC0415

    finish_script("image", data, image_section, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
