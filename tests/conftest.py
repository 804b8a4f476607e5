from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netfilter import NETFILTERS, Netfilter

ROOT_TOOLS = (
    "ip",
    "iptables-restore",
    "ip6tables-restore",
    "iptables-save",
    "iptables-legacy-restore",
    "iptables-nft-restore",
    "nft",
)


def root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, processes under other uids)"
    missing = [tool for tool in ROOT_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install iptables nftables iproute2)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = root_skip_reason()
    if reason is None:
        return
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A fresh directory that processes under other uids (the proxy's, a container's) can
    read, whatever the modes of pytest's base temp or of the checkout's parents (a clone
    under /root, or in ``mktemp -d``, is not traversable by them)."""
    directory = Path(tempfile.mkdtemp(prefix="meshguard-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=NETFILTERS, ids=str)
def netfilter(request: pytest.FixtureRequest) -> Netfilter:
    """Where Istio's capture is (and so meshguard's rules): each backend in turn, for every
    test that asks for it."""
    chosen: Netfilter = request.param
    return chosen
