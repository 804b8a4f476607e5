from __future__ import annotations

import os
import shutil

import pytest

ROOT_TOOLS = ("ip", "iptables-restore", "ip6tables-restore", "iptables-save")


def root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, processes under other uids)"
    missing = [tool for tool in ROOT_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install iptables iproute2)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = root_skip_reason()
    if reason is None:
        return
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
