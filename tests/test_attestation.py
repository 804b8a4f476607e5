"""Issue 23.1 without root: the webhook's signature and who accepts it (authz store, key
rotation, the webhook stripping forged marks), and no hostile value reaching nft or
iptables-restore text."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import io
import json
from typing import Any

import jsonpatch
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.attestation import TrustedKeys, generate, load_signer
from meshguard.authz.store import policy_of
from meshguard.cli import main
from meshguard.errors import MalformedInputError
from meshguard.inject.transform import InjectSettings, OptOut, inject_pod
from meshguard.rules import nftables
from meshguard.rules.install import foreign_changes, install
from meshguard.rules.iptables import parse_save
from meshguard.rules.ruleset import Ruleset, _ruleset_from
from meshguard.webhook.review import handle
from tests.support.keys import SIGNER, TRUSTED
from tests.support.pods import admission_review, example_pod, injected_example

FORGED_MARKS = {"meshguard.io/ruleset", "meshguard.io/status", "meshguard.io/attestation"}


ALLOW_ALL = json.dumps({"defaultAction": "allow"})


def signed_by(signer: Any, *, policy: str | None = None) -> dict[str, Any]:
    pod = example_pod()
    if policy is not None:
        pod["metadata"]["annotations"]["meshguard.io/policy"] = policy
    inject_pod(pod["metadata"], pod["spec"],
               settings=InjectSettings(request_template=False, signer=signer))  # fmt: skip
    return pod


# --- the authz server's store ------------------------------------------------------------


def test_an_unsigned_pod_is_refused_by_the_authz_store_before_its_policy_is_read():
    pod = example_pod()
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    policy = policy_of(pod, trusted=TRUSTED)
    assert "unsigned" in policy.refused and policy.key in policy.refused
    # the same pod, signed, is served
    assert not policy_of(injected_example(), trusted=TRUSTED).refused


def test_a_record_replayed_onto_another_pod_is_refused():
    other = injected_example()
    other["spec"]["serviceAccountName"] = "payments"
    assert "signed for another pod" in policy_of(other, trusted=TRUSTED).refused


def test_key_rotation_overlap():
    """Add the new public key, switch the signing key, remove the old public key."""
    old, new = SIGNER, generate()
    both = TrustedKeys.from_pem(old.public_pem() + new.public_pem(), origin="both")
    only_new = TrustedKeys.from_pem(new.public_pem(), origin="new")
    by_old, by_new = signed_by(old), signed_by(new)
    assert not policy_of(by_old, trusted=both).refused
    assert not policy_of(by_new, trusted=both).refused
    assert "not trusted" in policy_of(by_old, trusted=only_new).refused
    assert not policy_of(by_new, trusted=only_new).refused


def test_a_flipped_signature_bit_is_refused():
    pod = injected_example()
    annotations = pod["metadata"]["annotations"]
    envelope = json.loads(annotations["meshguard.io/attestation"])
    raw = bytearray(base64.b64decode(envelope["signature"]))
    raw[0] ^= 1
    envelope["signature"] = base64.b64encode(bytes(raw)).decode()
    annotations["meshguard.io/attestation"] = json.dumps(envelope)
    assert "does not verify" in policy_of(pod, trusted=TRUSTED).refused


# --- the webhook: a pod it skips never carries meshguard's marks ---------------------------


@pytest.mark.parametrize(
    "opt_out",
    [{"meshguard.io/inject": "false"}, {"sidecar.istio.io/inject": "false"},
     {"ambient.istio.io/redirection": "enabled"}],
)  # fmt: skip
def test_the_webhook_strips_forged_marks_from_a_pod_it_skips(opt_out):
    forged = injected_example()  # what the author copied from an admitted pod
    forged["metadata"]["annotations"].update(opt_out)
    status, answer, _ = handle(admission_review(forged, "u1"),
                               settings=InjectSettings(signer=SIGNER))  # fmt: skip
    assert status == 200 and answer["response"]["allowed"] is True
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    admitted = jsonpatch.apply_patch(copy.deepcopy(forged), patch)
    assert not FORGED_MARKS & set(admitted["metadata"]["annotations"])
    assert "meshguard.io/admitted" not in (admitted["metadata"].get("labels") or {})
    assert any("meshguard removed" in w for w in answer["response"]["warnings"])


# --- no hostile value reaches the netfilter text ---------------------------------------

HOSTILE = [
    '1337; include "/etc/passwd";',
    "1337 } table inet evil { chain c { type filter hook output priority 0; accept; } }",
    "1337\n*filter\n-F\nCOMMIT",
    "1337 # comment",
    "$var",
    "@set",
    "1337' -j ACCEPT '",
    "1337\\",
    "99999999999",
    "-1",
]


def _document_with(position: str, value: str) -> str:
    document = json.loads(injected_example()["metadata"]["annotations"]["meshguard.io/ruleset"])
    table = document["ipv4"]["tables"][0]
    chain = table["rules"][0][0]
    if position == "uid":
        table["rules"][0] = [chain, f"-m owner --uid-owner {value} -j RETURN"]
    elif position == "comment":
        table["rules"][0] = [chain, f'-m comment --comment "{value}" -j RETURN']
    elif position == "chain":
        table["chains"].append(value)
    elif position == "table":
        table["name"] = value
    elif position == "hook":
        table["hooks"][0]["chain"] = value
    elif position == "route":
        document["ipv6"]["localRoutes"] = [value]
    elif position == "source":
        document["sources"][0]["ipv4"] = value
    # the digest an attacker computes: the document is refused for its values, not its digest
    with contextlib.suppress(Exception):
        document["digest"] = _ruleset_from(document).digest
    return json.dumps(document)


POSITIONS = ["uid", "comment", "chain", "table", "hook", "route", "source"]


# A number is a harmless comment text: those pairs are not hostile, so not generated.
HOSTILE_PLACES = [
    (position, value)
    for value in HOSTILE
    for position in POSITIONS
    if not (position == "comment" and value.lstrip("-").isdigit())
]


@pytest.mark.parametrize(("position", "value"), HOSTILE_PLACES)
def test_hostile_values_are_refused_where_the_document_is_read(position, value):
    with pytest.raises(MalformedInputError, match="ruleset: "):
        Ruleset.from_json(_document_with(position, value))


_BREAKERS = set(";{}\"'\\#$@\n\r`")


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40), st.sampled_from(POSITIONS))
def test_no_generated_value_with_a_breaking_character_reaches_a_payload(value, position):
    """Either the document is refused, or nothing of the value can break out of its place
    in the nft text or the iptables-restore payload."""
    try:
        ruleset = Ruleset.from_json(_document_with(position, value))
    except MalformedInputError:
        return
    assert not _BREAKERS & set(value) or (position == "comment" and not {'"', "\n"} & set(value))
    payloads = ruleset.ipv4.payload() + ruleset.ipv6.payload()
    try:
        payloads += nftables.render(ruleset)
    except MalformedInputError:
        return
    except nftables.UnsupportedRule:
        return
    assert "include" not in payloads.replace("--comment", "")


@pytest.mark.parametrize("value", HOSTILE)
def test_the_renderers_refuse_a_hostile_ruleset_built_in_memory(value):
    """The renderers check their input too (a ruleset that never was a document)."""
    good = Ruleset.from_json(_document_with("uid", "1000"))
    table = good.ipv4.tables[0]
    rule = (table.rules[0][0], f"-m owner --uid-owner {value} -j RETURN")
    bad_table = dataclasses.replace(table, rules=(rule,))
    bad = dataclasses.replace(good, ipv4=dataclasses.replace(good.ipv4, tables=(bad_table,)))
    with pytest.raises(MalformedInputError, match="refused before rendering"):
        nftables.build(bad)
    with pytest.raises(MalformedInputError, match="refused before rendering"):
        install(bad, run=_never)


def _never(argv: Any, **_: Any) -> str:
    raise AssertionError(f"ran {argv}")


# --- issue 23.2: platform-enforced coverage ------------------------------------------------


@pytest.mark.parametrize(
    "opt_out",
    [{"annotations": {"meshguard.io/inject": "false"}},
     {"annotations": {"sidecar.istio.io/inject": "false"}},
     {"labels": {"sidecar.istio.io/inject": "false"}}],
)  # fmt: skip
def test_refused_opt_out_of_an_istio_injected_pod_unless_the_namespace_is_exempt(opt_out):
    pod = example_pod()  # Istio injected it: istio-proxy is there
    for where, entries in opt_out.items():
        pod["metadata"].setdefault(where, {}).update(entries)
    asked: list[str] = []

    def exempt(namespace: str) -> bool:
        asked.append(namespace)
        return namespace == "platform-exempt"

    refuse = InjectSettings(signer=SIGNER, opt_out=OptOut.REFUSE, opt_out_exempt=exempt)
    status, answer, _ = handle(admission_review(pod, "u2"), settings=refuse)
    response = answer["response"]
    assert status == 200 and response["allowed"] is False
    assert response["status"]["code"] == 403
    assert "meshguard.io/opt-out=allowed" in response["status"]["message"]
    assert asked == [pod["metadata"].get("namespace", "default")]
    exempted = copy.deepcopy(pod)
    exempted["metadata"]["namespace"] = "platform-exempt"
    allowed = handle(admission_review(exempted, "u3"), settings=refuse)[1]["response"]
    assert allowed["allowed"] is True
    # the default (allow) lets any pod opt out, as before
    assert handle(admission_review(pod, "u4"), settings=InjectSettings(signer=SIGNER))[1][
        "response"
    ]["allowed"]


def test_refusing_opt_out_leaves_pods_without_istio_alone():
    pod = example_pod()
    pod["metadata"]["annotations"]["sidecar.istio.io/inject"] = "false"
    pod["spec"]["containers"] = [c for c in pod["spec"]["containers"] if c["name"] != "istio-proxy"]
    pod["spec"]["initContainers"] = [
        c for c in pod["spec"].get("initContainers", []) if c["name"] != "istio-init"
    ]
    pod["metadata"]["annotations"].pop("sidecar.istio.io/status", None)
    refuse = InjectSettings(signer=SIGNER, opt_out=OptOut.REFUSE)
    assert handle(admission_review(pod, "u5"), settings=refuse)[1]["response"]["allowed"]


# --- the install reads back the whole nftables ruleset -------------------------------------


def _listing(*items: dict[str, Any]) -> str:
    return json.dumps({"nftables": [{"metainfo": {"version": "1"}}, *items]})


ISTIO = {"table": {"family": "inet", "name": "istio-proxy-nat", "handle": 1}}
ISTIO_RULE = {"rule": {"family": "inet", "table": "istio-proxy-nat", "chain": "output",
                       "handle": 4, "expr": [{"counter": {"packets": 0, "bytes": 0}}]}}  # fmt: skip
OURS = {"chain": {"family": "inet", "table": "meshguard", "name": "MESHGUARD_DENY", "handle": 2}}


def test_only_meshguards_table_may_change_and_no_other_meshguard_object_may_appear():
    before = nftables.foreign_objects(_listing(ISTIO, ISTIO_RULE))
    counted = copy.deepcopy(ISTIO_RULE)
    counted["rule"]["expr"][0]["counter"] = {"packets": 9, "bytes": 900}
    counted["rule"]["handle"] = 4
    # traffic moved Istio's counters and meshguard's table changed: fine
    same = nftables.foreign_objects(_listing(ISTIO, counted, OURS))
    assert nftables.foreign_changes(before, same) == []
    evil_table = {"table": {"family": "ip", "name": "meshguard2", "handle": 9}}
    evil_chain = {"chain": {"family": "inet", "table": "istio-proxy-nat", "name": "MESHGUARD_X"}}
    flushed = nftables.foreign_objects(_listing(ISTIO, evil_table, evil_chain))
    problems = nftables.foreign_changes(before, flushed)
    assert any("meshguard2" in p and "did not plan" in p for p in problems)
    assert any("MESHGUARD_X" in p for p in problems)
    assert any("removed" in p for p in problems)  # Istio's rule is gone


def test_an_iptables_install_may_change_nothing_outside_meshguards_chains_and_hooks():
    before = parse_save(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
    )
    ours = parse_save(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n"
        ":MESHGUARD_REDIRECT - [0:0]\n-A OUTPUT -j MESHGUARD_REDIRECT\n-A OUTPUT -j ISTIO_OUTPUT\n"
        "-A MESHGUARD_REDIRECT -j RETURN\nCOMMIT\n*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    )
    assert foreign_changes(before, ours) == []
    flushed = parse_save("*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\nCOMMIT\n")
    assert foreign_changes(before, flushed) == ["nat OUTPUT: changed outside meshguard's rules"]
    added = parse_save(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:EVIL - [0:0]\n"
        "-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
    )
    assert foreign_changes(before, added) == ["nat EVIL: changed outside meshguard's rules"]


@pytest.mark.parametrize(("labels", "status"), [({}, 3), ({"meshguard.io/opt-out": "allowed"}, 0)])
def test_describe_reports_pod_opt_out_where_it_is_refused(tmp_path, labels, status):
    pod = example_pod()
    pod["metadata"]["annotations"]["meshguard.io/inject"] = "false"
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": pod["metadata"]["namespace"], "labels": labels}}  # fmt: skip
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(yaml.safe_dump_all([namespace, pod]))
    argv = ["describe", "-f", str(manifest), "--fail-on-unprotected"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main([*argv, "--pod-opt-out", "refuse"]) == status
        assert main(argv) == 0  # the default: a pod's own opt-out is its owner's choice
    if status:
        assert "where pod opt-out is refused" in out.getvalue()


# --- meshguard-init's consistency check ----------------------------------------------------


def _init_files(tmp_path, *, attestation: str | None) -> tuple[Any, Any]:
    pod = injected_example()
    annotations = pod["metadata"]["annotations"]
    ruleset = tmp_path / "ruleset"
    ruleset.write_text(annotations["meshguard.io/ruleset"])
    if attestation is not None:
        (tmp_path / "attestation").write_text(attestation)
    return ruleset, annotations


def test_meshguard_init_with_keys_refuses_a_ruleset_the_webhook_did_not_sign(tmp_path, capsys):
    ruleset, annotations = _init_files(tmp_path, attestation=None)
    keys = tmp_path / "keys.pem"
    keys.write_text(SIGNER.public_pem())
    # --dry-run: whatever happens, nothing is installed in the test's own namespace
    argv = ["init", "--dry-run", "--ruleset-file", str(ruleset), "--trusted-keys", str(keys)]
    assert main(argv) == 2  # unsigned: no attestation file
    assert "attestation" in capsys.readouterr().err
    (tmp_path / "attestation").write_text(annotations["meshguard.io/attestation"])
    other = signed_by(generate(), policy=ALLOW_ALL)["metadata"]["annotations"]
    assert other["meshguard.io/ruleset"] != annotations["meshguard.io/ruleset"]
    ruleset.write_text(other["meshguard.io/ruleset"])  # another pod's ruleset
    assert main(argv) == 2
    assert "not the text meshguard's webhook signed" in capsys.readouterr().err
    (tmp_path / "attestation").write_text(other["meshguard.io/attestation"])  # its own, other key
    assert main(argv) == 2
    assert "not trusted" in capsys.readouterr().err


def test_meshguard_init_reads_its_keys_from_the_environment_the_webhook_sets(
    tmp_path, capsys, monkeypatch
):
    pod = injected_example()
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "meshguard-init"]
    assert init["env"] == [{"name": "MESHGUARD_TRUSTED_KEYS", "value": SIGNER.public_pem()}]
    ruleset, _ = _init_files(tmp_path, attestation="")
    monkeypatch.setenv("MESHGUARD_TRUSTED_KEYS", SIGNER.public_pem())
    assert main(["init", "--dry-run", "--ruleset-file", str(ruleset)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_keys_generate_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public = tmp_path / "signing-key.pem", tmp_path / "public.pem"
    argv = ["keys", "generate", "--private", str(private), "--public", str(public)]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(argv) == 0
    signer = load_signer(private)
    assert signer.key_id in out.getvalue()
    assert private.stat().st_mode & 0o777 == 0o600
    assert TrustedKeys.load(public).ids == (signer.key_id,)
    assert TrustedKeys.load(tmp_path).ids == (signer.key_id,)  # a directory: the private key
    # is not a public key block and is skipped by the PEM scan
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 1  # an existing key is never replaced
    assert load_signer(private).key_id == signer.key_id
