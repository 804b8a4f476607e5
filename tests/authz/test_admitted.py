"""What was admitted is what is enforced: post-admission edits of a pod's meshguard
annotations open nothing (threat model item 8).

The webhook records the policy and mode it admitted, with their digest, in the status; the
authz server decides from that record only. Each test edits an injected pod the way someone
with ``pods/patch`` could (``kubectl annotate --overwrite``) and checks the decisions, through
the file store the authz server serves from, and ``meshguard describe``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.admitted import STATUS_KEY, TamperedError, read_admitted
from meshguard.authz.decision import PodPolicy, Request, decide
from meshguard.authz.store import StaticStore, policy_of
from meshguard.describe import describe
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.pod import read_pod
from meshguard.policy import Mode, parse_mode, parse_policy
from meshguard.rules.compiler import CompilerSettings
from meshguard.status import PodStatus
from tests.support.keys import SIGNER, TRUSTED

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
KEY = "demo/shop"
APP = "127.0.100.1"  # the app's source address on the loopback listener
#: Allowed by the example's policy (rules[3]): POST /quitquitquit on 15020.
QUIT = Request(KEY, APP, 15020, "POST", "/quitquitquit", {})
#: Not allowed by it: what an edit tries to open.
LOGGING = Request(KEY, APP, 15000, "POST", "/logging", {})
WIDER = json.dumps(
    {"defaultAction": "allow", "rules": [{"from": "*", "to": "proxy", "ports": [15000]}]}
)


def injected(**annotations: str) -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"]["annotations"].update(annotations)
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return pod


def annotate(pod: dict[str, Any], **changes: str | None) -> dict[str, Any]:
    """``kubectl annotate --overwrite`` on the running pod (None removes the annotation)."""
    annotations = pod["metadata"]["annotations"]
    for name, value in changes.items():
        if value is None:
            annotations.pop("meshguard.io/" + name, None)
        else:
            annotations["meshguard.io/" + name] = value
    return pod


def edit_status(pod: dict[str, Any], edit: Any) -> dict[str, Any]:
    status = json.loads(pod["metadata"]["annotations"]["meshguard.io/status"])
    edit(status)
    pod["metadata"]["annotations"]["meshguard.io/status"] = json.dumps(status)
    return pod


def served(pod: dict[str, Any], tmp_path: Path) -> PodPolicy:
    """The pod as the authz server's file store serves it."""
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    policy = StaticStore.from_files([path], trusted=TRUSTED).get(KEY)
    assert policy is not None
    return policy


# --- the record ----------------------------------------------------------------------------


def test_the_webhook_records_the_admitted_policy_and_mode_in_the_status():
    pod = injected(**{"meshguard.io/mode": "audit"})
    annotations = pod["metadata"]["annotations"]
    status = json.loads(annotations["meshguard.io/status"])
    record = read_admitted(PodStatus.model_validate(status))
    assert record is not None
    assert (record.policy, record.mode, record.l7_engine) == (
        parse_policy(annotations["meshguard.io/policy"]), Mode.AUDIT, "native",
    )  # fmt: skip
    assert status[STATUS_KEY]["digest"] == record.digest
    assert status["mode"] == "audit"
    again = json.loads(json.dumps(pod))  # the transform twice: the same record
    inject_pod(
        again["metadata"],
        again["spec"],
        settings=InjectSettings(request_template=False, signer=SIGNER),
    )
    assert again == pod


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda r: r["policy"].update(defaultAction="allow"), "digest mismatch"),
        (lambda r: r.update(mode="audit"), "digest mismatch"),
        (lambda r: r["policy"]["rules"].pop(), "digest mismatch"),
        (lambda r: r.update(digest="sha256:" + "0" * 64), "digest mismatch"),
        (lambda r: r.update(version=2), "version 2, this meshguard reads 1"),
        (lambda r: r.update(mode="off"), "unexpected content"),
        (lambda r: r["policy"].update(rules="all"), "unexpected content"),
        (lambda r: r.pop("policy"), "unexpected content"),
    ],
)
def test_an_altered_record_does_not_verify(edit, problem):
    status = json.loads(injected()["metadata"]["annotations"]["meshguard.io/status"])
    edit(status[STATUS_KEY])
    with pytest.raises(TamperedError, match=problem):
        read_admitted(PodStatus.model_validate(status))


# --- the authz server decides from the record only -----------------------------------------


def test_an_untouched_pod_is_served_as_admitted(tmp_path: Path):
    policy = served(injected(), tmp_path)
    assert (policy.admitted, policy.drift, policy.refused) == (True, (), "")
    assert decide(QUIT, policy).allowed
    assert not decide(LOGGING, policy).allowed


@pytest.mark.parametrize(
    ("changes", "drifted"),
    [
        ({"mode": "audit"}, "meshguard.io/mode is 'audit', admitted 'enforce'"),
        ({"mode": "AUDIT "}, "meshguard.io/mode is 'AUDIT ', admitted 'enforce'"),
        ({"policy": WIDER}, "meshguard.io/policy differs from the policy admitted"),
        ({"policy": None}, "meshguard.io/policy differs from the policy admitted"),
        ({"policy": "defaultAction: allow", "mode": "audit"}, "meshguard.io/mode is 'audit'"),
        ({"policy": "not: [valid"}, "meshguard.io/policy differs from the policy admitted"),
    ],
    ids=["mode-audit", "mode-audit-spelled", "wider-policy", "policy-removed", "both", "garbage"],
)
def test_live_edits_after_admission_change_no_decision(tmp_path: Path, changes, drifted):
    policy = served(annotate(injected(), **changes), tmp_path)
    assert policy.mode is Mode.ENFORCE
    assert any(drifted in line for line in policy.drift), policy.drift
    denied = decide(LOGGING, policy)
    assert (denied.allowed, denied.audited) == (False, False)
    assert denied.reason == "no rule allows app -> proxy:15000 POST /logging"
    assert decide(QUIT, policy).allowed


def test_an_audit_pod_edited_to_enforce_stays_audit_as_admitted(tmp_path: Path):
    """Edits never change a decision, in either direction: the record decides."""
    policy = served(annotate(injected(**{"meshguard.io/mode": "audit"}), mode="enforce"), tmp_path)
    assert policy.mode is Mode.AUDIT
    assert decide(LOGGING, policy).audited


def test_the_edit_is_logged_once_per_pod(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="meshguard.authz.store")
    pod = annotate(injected(), mode="audit")
    store = StaticStore([policy_of(pod, trusted=TRUSTED)])
    store.report.note(policy_of(pod, trusted=TRUSTED))  # seen again (a relist): not logged again
    (record,) = [r for r in caplog.records if getattr(r, "fields", {}).get("pod") == KEY]
    assert record.fields["event"] == "admitted-drift"
    assert record.fields["enforced_mode"] == "enforce"
    assert record.fields["drift"] == ["meshguard.io/mode is 'audit', admitted 'enforce'"]
    assert store.report.drifted == 1


#: A status edited after admission no longer verifies: refused before its record is read.
SIGNED_STATUS = "meshguard.io/status is not the text meshguard's webhook signed"


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda s: s[STATUS_KEY].update(mode="audit"),
            SIGNED_STATUS,
        ),
        (
            lambda s: s[STATUS_KEY]["policy"].update(defaultAction="allow"),
            SIGNED_STATUS,
        ),
        (lambda s: s.update(admitted="yes"), SIGNED_STATUS),
        (lambda s: s.pop(STATUS_KEY), SIGNED_STATUS),
    ],
    ids=["record-mode", "record-policy", "record-replaced", "record-removed"],
)
def test_a_tampered_record_refuses_the_pod(tmp_path: Path, edit, reason, caplog):
    """Fail closed: every L7 request to the pod is denied, even those the policy allows."""
    caplog.set_level(logging.WARNING, logger="meshguard.authz.store")
    pod = edit_status(annotate(injected(), mode="audit", policy=WIDER), edit)
    policy = served(pod, tmp_path)
    assert reason in policy.refused
    for request in (QUIT, LOGGING):
        decision = decide(request, policy)
        assert (decision.allowed, decision.audited) == (False, False)
        assert decision.reason.startswith(f"pod {KEY!r} refused: ")
        assert reason in decision.reason
    refused = [r for r in caplog.records if getattr(r, "fields", {}).get("pod") == KEY]
    assert [r.fields["event"] for r in refused] == ["admitted-refused"]


def test_hand_built_annotations_are_taken_as_given_but_never_served():
    """from_pod on annotations without a record (as unit tests build them) reads them; the
    stores, which serve real pods, refuse such a pod."""
    annotations = {"meshguard.io/policy": WIDER, "meshguard.io/mode": "audit",
                   "meshguard.io/status": "{}"}  # fmt: skip
    direct = PodPolicy.from_pod(key=KEY, annotations=annotations, ports={})
    assert (direct.admitted, direct.mode) == (False, Mode.AUDIT)
    pod = edit_status(injected(), lambda s: s.pop(STATUS_KEY))
    assert SIGNED_STATUS in policy_of(annotate(pod, mode="audit"), trusted=TRUSTED).refused


# --- meshguard describe --------------------------------------------------------------------


def described(pod: dict[str, Any]) -> list[str]:
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    annotations = view.annotations
    return describe(
        view,
        parse_policy(annotations.get("meshguard.io/policy")),
        mode=parse_mode(annotations.get("meshguard.io/mode")),
        compiled=None,
        settings=CompilerSettings(),
    )


def test_describe_says_when_live_annotations_differ_from_what_was_admitted():
    assert any(
        line.startswith("admitted: policy and mode as admitted (sha256:")
        for line in described(injected())
    )
    lines = described(annotate(injected(), mode="audit"))
    assert (
        "admitted: TAMPERED — changed after admission: meshguard.io/mode is 'audit',"
        " admitted 'enforce'"
    ) in lines
    assert any(line.startswith("  enforced: the admitted policy in enforce mode") for line in lines)
    forged = edit_status(injected(), lambda s: s[STATUS_KEY].update(mode="audit"))
    (line,) = [line for line in described(forged) if line.startswith("admitted:")]
    assert "TAMPERED — meshguard.io/status 'admitted': digest mismatch" in line
    assert "denies every L7 request to this pod" in line
