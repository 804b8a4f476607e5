"""Access to the reference data in ../shared (Istio's injector samples and iptables goldens).

Tests that need it skip, with the reason, when it is absent (a fresh clone has no ../shared).
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
INJECTOR_SAMPLES = SHARED / "istio-injector-samples"
IPTABLES_GOLDEN = SHARED / "istio-iptables-golden"


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (../shared is not beside the project)")
    return path


def golden_payloads(name: str) -> tuple[list[str], list[str]]:
    """The iptables-restore payloads of an Istio golden file: (IPv4 blocks, IPv6 blocks).

    In the golden format, bare ``iptables-save`` lines are commands Istio ran; each
    ``* table ... COMMIT`` block is a payload; IPv6 blocks are recognisable by IPv6 addresses.
    """
    text = shared_file("istio-iptables-golden", name).read_text()
    v4: list[str] = []
    v6: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            block = ["*" + line[1:].strip()]
        elif block is not None:
            block.append(line)
            if line.strip() == "COMMIT":
                payload = "\n".join(block) + "\n"
                (v6 if "::" in payload else v4).append(payload)
                block = None
    return v4, v6
