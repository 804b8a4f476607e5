"""Which backend a pod's rules are for, as admission reads it from the pod spec.

Pure functions on pod documents (Istio's injected layout): the istio-init or
istio-validation that Istio's status names runs ``--native-nftables`` or not; the ruleset
admission records says so, and meshguard-init confirms it in the namespace
(``tests/rules/test_backends.py``).
"""

from __future__ import annotations

from typing import Any

import pytest

from meshguard import annotation_keys
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.pod import read_pod
from meshguard.rules.backend import uses_native_nftables
from meshguard.rules.ruleset import Ruleset
from tests.support.keys import SIGNER
from tests.support.samples import istio_pod

SETTINGS = InjectSettings(request_template=False, signer=SIGNER)


def native(pod: dict[str, Any]) -> bool:
    return uses_native_nftables(read_pod(metadata=pod["metadata"], spec=pod["spec"]), pod["spec"])


def with_words(pod: dict[str, Any], field: str, words: list[str]) -> dict[str, Any]:
    pod["spec"]["initContainers"][0][field] = words
    return pod


@pytest.mark.parametrize("cni", [False, True], ids=["istio-init", "istio-validation"])
@pytest.mark.parametrize(
    ("field", "words", "expected"),
    [
        ("args", ["istio-iptables", "-p", "15001"], False),
        ("args", ["istio-iptables", "-p", "15001", "--native-nftables"], True),
        ("args", ["istio-iptables", "--native-nftables=true"], True),
        ("args", ["istio-iptables", "--native-nftables=false"], False),
        ("command", ["pilot-agent", "istio-iptables", "--native-nftables"], True),
    ],
)
def test_the_mode_is_read_from_istios_own_init_step(cni, field, words, expected):
    assert native(with_words(istio_pod(cni=cni), field, words)) is expected


def test_the_flag_on_a_container_istio_did_not_place_is_ignored():
    """Only the istio-init Istio's status names counts: an app container that carries the
    flag (or is named like Istio's step but unlisted) decides nothing."""
    pod = istio_pod()
    pod["spec"]["containers"][0]["args"] = ["--native-nftables"]
    assert not native(pod)
    pod["spec"]["initContainers"].append(
        {"name": "istio-init-2", "image": "x", "args": ["--native-nftables"]}
    )
    assert not native(pod)


@pytest.mark.parametrize("cni", [False, True], ids=["istio-init", "istio-validation"])
@pytest.mark.parametrize("flag", [False, True])
def test_admission_records_the_mode_in_the_ruleset(cni, flag):
    pod = istio_pod(cni=cni)
    if flag:
        with_words(pod, "args", ["istio-iptables", "--native-nftables"])
    inject_pod(pod["metadata"], pod["spec"], settings=SETTINGS)
    recorded = Ruleset.from_json(pod["metadata"]["annotations"][annotation_keys.RULESET])
    assert recorded.native_nftables is flag
