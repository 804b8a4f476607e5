"""GitOps and day-2 properties of ``charts/meshguard``, rendered by the real Helm engine.

- TLS modes: generated (a new CA at every render without a cluster, reused on upgrade through
  ``lookup``), existingSecret (the operator's Secret, caBundle from a value or cainjector) and
  certManager; every object of every mode is a valid Kubernetes object, and the two stable
  modes render byte-identical output every time (what Argo CD / Flux compare).
- PodDisruptionBudgets only where they leave an eviction possible (replicas > 1).
- Drain: preStop sleep inside terminationGracePeriodSeconds, and the webhook server itself
  stops accepting and finishes in-flight requests on SIGTERM (a real process).
- Pod Security Standards: the servers pass ``restricted``; meshguard-init needs exactly what
  istio-init needs (NET_ADMIN, NET_RAW: ``privileged``).

helm-python-sdk renders offline: ``lookup`` returns nothing there (like ``helm template``).
The "Secret found" branch of the lookup is exercised on a copy of the chart whose lookup call
reads the Secret from a chart file instead, the only difference.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.manifests import pod_templates
from tests.charts.test_chart import (
    CHART,
    DNS_NAMES,
    K8S_VERSION,
    NAMESPACE,
    NO_SCHEMA_KINDS,
    RELEASE,
    container,
    helm,
    kinds,
    one,
    pem,
    selector_matches,
)
from tests.support import pss
from tests.support.keys import SIGNER, signing_key_file
from tests.support.shared import shared_file
from tests.support.tls import CertificateAuthority

NOTES = f"{CHART.name}/templates/NOTES.txt"
MWC = "mutatingwebhookconfiguration.yaml"
CORP_SECRET = "corp-webhook-tls"


@cache
def corp_ca_pem() -> str:
    """The operator's own CA (PEM), as they would pass it in tls.existingSecret.caBundle."""
    return CertificateAuthority.create().cert.public_bytes(Encoding.PEM).decode()


def existing_secret(ca_bundle: str = "") -> dict[str, Any]:
    tls = {"mode": "existingSecret", "secretName": CORP_SECRET}
    return {"tls": {**tls, "existingSecret": {"caBundle": ca_bundle}}}


MODES: dict[str, Any] = {
    "generated": lambda: {},
    "existingSecret-caBundle": lambda: existing_secret(base64.b64encode(corp_ca_pem().encode())),
    "existingSecret-pem": lambda: existing_secret(corp_ca_pem()),
    "existingSecret-cainjector": existing_secret,
    "certManager": lambda: {"tls": {"mode": "certManager"}},
    "certManager-observed": lambda: {
        "tls": {"mode": "certManager"},
        "networkPolicy": {"enabled": True},
        "serviceMonitor": {"enabled": True},
    },
}
STABLE = [name for name in MODES if name != "generated"]


def values_of(mode: str) -> dict[str, Any]:
    values: dict[str, Any] = MODES[mode]()
    tls = values.get("tls", {}).get("existingSecret")
    if tls and isinstance(tls["caBundle"], bytes):
        tls["caBundle"] = tls["caBundle"].decode()
    if mode != "generated":  # stable: the signing key is the operator's Secret as well
        values["attestation"] = {"mode": "existingSecret", "existingSecret": "signing-key",
                                 "publicKeys": [SIGNER.public_pem()]}  # fmt: skip
    return values


# --- rendering (never cached: these tests compare renders) -------------------------------


def render_files(
    values: dict[str, Any], *, chart: Path = CHART, upgrade: bool = False
) -> dict[str, str]:
    """Template path -> rendered text, one fresh `helm install` (or upgrade) render."""
    with helm.Chart.load(chart) as loaded:
        rendered: dict[str, str] = loaded.render(
            copy.deepcopy(values),
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=not upgrade,
            is_upgrade=upgrade,
        )
    return rendered


def objects_of(files: dict[str, str]) -> list[dict[str, Any]]:
    return [
        obj
        for name in sorted(files)
        if name != NOTES
        for obj in yaml.safe_load_all(files[name])
        if obj
    ]


def render(values: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    return objects_of(render_files(values, **kwargs))


def validate(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["kind"] in NO_SCHEMA_KINDS, f"no schema for {obj['kind']}"
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")


def configuration(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = kinds(objects, "MutatingWebhookConfiguration")
    return found


def chart_copy(tmp_path: Path) -> Path:
    copied = tmp_path / CHART.name
    shutil.copytree(CHART, copied)
    return copied


# --- TLS modes: valid, and stable where GitOps needs it ------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_tls_mode_renders_valid_objects(mode: str) -> None:
    values = values_of(mode)
    objects = render(values)
    validate(objects)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    # the webhook serves whatever Secret the mode names
    deployment = one(objects, "Deployment", "meshguard-webhook")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    secret_name = values.get("tls", {}).get("secretName", "meshguard-webhook-tls")
    assert volumes["tls"]["secret"]["secretName"] == secret_name
    secrets = kinds(objects, "Secret")
    if mode == "generated":
        assert [s["metadata"]["name"] for s in secrets] == ["meshguard-attestation", secret_name]
    else:
        assert secrets == []  # the chart never holds a key in the stable modes
    if mode.startswith("existingSecret"):
        assert kinds(objects, "Certificate") == kinds(objects, "Issuer") == []


@pytest.mark.parametrize("mode", STABLE)
def test_stable_modes_render_identical_bytes(mode: str) -> None:
    """Two renders (install or upgrade) are byte-identical: no diff, no rotation per sync."""
    values = values_of(mode)
    first, second = render_files(values), render_files(values)
    assert first == second
    assert render_files(values, upgrade=True) == render_files(values, upgrade=True)
    assert "NEW CA EVERY TIME" not in "".join(first.values())


def test_generated_mode_rotates_on_every_render_and_says_so() -> None:
    first, second = render_files({}), render_files({})
    cas = []
    for files in (first, second):
        objects = objects_of(files)
        secret = one(objects, "Secret", "meshguard-webhook-tls")
        for hook in configuration(objects)["webhooks"]:
            assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
        cas.append(secret["data"]["ca.crt"])
    assert cas[0] != cas[1]  # what Argo CD sees at every sync
    # ... and the rendered output says so, next to the objects that use the Secret
    text = first[f"{CHART.name}/templates/webhook-deployment.yaml"]
    comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "NEW CA EVERY TIME" in comment
    assert "tls.mode=existingSecret" in comment and "tls.mode=certManager" in comment
    assert "lookup" in comment


def _with_fake_lookup(tmp_path: Path, secret: dict[str, Any] | None) -> Path:
    """A chart copy whose Secret lookup returns ``secret`` (what a cluster would hold)."""
    chart = chart_copy(tmp_path)
    template = chart / "templates" / MWC
    text = template.read_text()
    call = 'lookup "v1" "Secret" .Release.Namespace .Values.tls.secretName'
    assert text.count(call) == 1, f"{MWC} no longer looks the Secret up with `{call}`"
    template.write_text(text.replace(call, '(.Files.Get "cluster/secret.yaml" | fromYaml)'))
    (chart / "cluster").mkdir()
    (chart / "cluster" / "secret.yaml").write_text(yaml.safe_dump(secret) if secret else "")
    return chart


def test_generated_mode_reuses_the_secret_lookup_finds(tmp_path: Path) -> None:
    installed = one(render({}), "Secret", "meshguard-webhook-tls")
    # lookup finds nothing (first install, helm template): a new CA, as the real chart does
    nothing = _with_fake_lookup(tmp_path / "empty", None)
    fresh = one(render({}, chart=nothing, upgrade=True), "Secret", "meshguard-webhook-tls")
    assert fresh["data"]["ca.crt"] != installed["data"]["ca.crt"]
    # helm upgrade with the Secret in the cluster: the same CA, certificate and key
    found = _with_fake_lookup(tmp_path / "found", installed)
    for _ in range(2):
        objects = render({}, chart=found, upgrade=True)
        validate(objects)
        secret = one(objects, "Secret", "meshguard-webhook-tls")
        assert secret["data"] == installed["data"]
        for hook in configuration(objects)["webhooks"]:
            assert hook["clientConfig"]["caBundle"] == installed["data"]["ca.crt"]
    # a certificate issued for other DNS names (the Service was renamed) is not reused
    renamed = {"webhook": {"service": {"name": "mg-webhook"}}}
    secret = one(render(renamed, chart=found, upgrade=True), "Secret", "meshguard-webhook-tls")
    assert secret["data"]["ca.crt"] != installed["data"]["ca.crt"]
    leaf = x509.load_pem_x509_certificate(pem(secret["data"]["tls.crt"]))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName)[0] == "mg-webhook"
    # an incomplete Secret (no key) is not reused either
    broken = copy.deepcopy(installed)
    del broken["data"]["tls.key"]
    partial = _with_fake_lookup(tmp_path / "partial", broken)
    secret = one(render({}, chart=partial, upgrade=True), "Secret", "meshguard-webhook-tls")
    assert secret["data"]["ca.crt"] != installed["data"]["ca.crt"]
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}


def _probe(tmp_path: Path, values: dict[str, Any]) -> dict[str, str]:
    """What the caBundle / cainjector helpers give for these values."""
    chart = chart_copy(tmp_path)
    (chart / "templates" / "zz-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\ndata:\n"
        '  caBundle: {{ include "meshguard.webhook.caBundle" . | quote }}\n'
        '  caInjection: {{ include "meshguard.webhook.caInjection" . | quote }}\n'
    )
    data: dict[str, str] = one(render(values, chart=chart), "ConfigMap", "probe")["data"]
    return data


def test_ca_helpers_of_each_mode(tmp_path: Path) -> None:
    ca = corp_ca_pem()
    encoded = base64.b64encode(ca.encode()).decode()
    assert _probe(tmp_path / "a", existing_secret(encoded)) == {
        "caBundle": encoded,
        "caInjection": "",
    }
    # PEM text is accepted and encoded the way clientConfig.caBundle ([]byte) wants it
    assert _probe(tmp_path / "b", existing_secret(ca)) == {"caBundle": encoded, "caInjection": ""}
    assert _probe(tmp_path / "c", existing_secret()) == {
        "caBundle": "",
        "caInjection": f"cert-manager.io/inject-ca-from-secret: {NAMESPACE}/{CORP_SECRET}",
    }
    cert_manager = _probe(tmp_path / "d", {"tls": {"mode": "certManager"}})
    assert cert_manager == {
        "caBundle": "",
        "caInjection": f"cert-manager.io/inject-ca-from: {NAMESPACE}/meshguard-webhook",
    }
    # the helper says what the configuration already carries in certManager mode
    annotations = configuration(render({"tls": {"mode": "certManager"}}))["metadata"]
    key, value = cert_manager["caInjection"].split(": ")
    assert annotations["annotations"][key] == value
    assert _probe(tmp_path / "e", {}) == {"caBundle": "", "caInjection": ""}


@pytest.mark.parametrize("mode", ["existingSecret-caBundle", "existingSecret-cainjector"])
def test_existing_secret_mode_trusts_the_operators_ca(mode: str) -> None:
    config = configuration(render(values_of(mode)))
    annotations = config["metadata"].get("annotations") or {}
    encoded = base64.b64encode(corp_ca_pem().encode()).decode()
    for hook in config["webhooks"]:
        if mode == "existingSecret-caBundle":
            assert hook["clientConfig"]["caBundle"] == encoded
        else:
            assert "caBundle" not in hook["clientConfig"]
    if mode == "existingSecret-cainjector":
        secret_ref = f"{NAMESPACE}/{CORP_SECRET}"
        assert annotations["cert-manager.io/inject-ca-from-secret"] == secret_ref
    else:
        assert not any(k.startswith("cert-manager.io/") for k in annotations)


def test_existing_secret_mode_serves_the_operators_certificate(tmp_path: Path) -> None:
    """The Secret the operator makes (kubernetes.io/tls + ca.crt) is what the pods mount."""
    ca = CertificateAuthority.create()
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca.issue(crt, key)
    values = existing_secret(ca.cert.public_bytes(Encoding.PEM).decode())
    values["serviceMonitor"] = {"enabled": True}
    objects = render(values)
    monitor = one(objects, "ServiceMonitor", "meshguard-webhook")
    tls_config = monitor["spec"]["endpoints"][0]["tlsConfig"]
    assert tls_config["ca"] == {"secret": {"name": CORP_SECRET, "key": "ca.crt"}}
    assert tls_config["serverName"] == DNS_NAMES[2]
    main = container(one(objects, "Deployment", "meshguard-webhook"))
    assert "--cert=/etc/meshguard/tls/tls.crt" in main["args"]
    assert "--key=/etc/meshguard/tls/tls.key" in main["args"]


# --- PodDisruptionBudgets ---------------------------------------------------------------


@pytest.mark.parametrize("component", ["webhook", "authz"])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_pdb_only_when_it_leaves_an_eviction(component: str, replicas: int) -> None:
    objects = render({component: {"replicas": replicas}})
    validate(objects)
    pdbs = {p["metadata"]["name"]: p for p in kinds(objects, "PodDisruptionBudget")}
    other = "authz" if component == "webhook" else "webhook"
    assert f"meshguard-{other}" in pdbs  # the other component keeps its default 2 replicas
    if replicas == 1:
        # one replica: a PDB would block `kubectl drain` for good, so there is none
        assert f"meshguard-{component}" not in pdbs
        return
    pdb = pdbs[f"meshguard-{component}"]
    deployment = one(objects, "Deployment", f"meshguard-{component}")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(pdb["spec"]["selector"], labels)
    assert deployment["spec"]["replicas"] == replicas
    # the eviction API allows (healthy - minAvailable) evictions: at least one
    assert replicas - pdb["spec"]["minAvailable"] >= 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize(
    "values",
    [
        {"webhook": {"replicas": 2, "podDisruptionBudget": {"minAvailable": 2}}},
        {"authz": {"replicas": 3, "podDisruptionBudget": {"minAvailable": 5}}},
        {"authz": {"podDisruptionBudget": {"minAvailable": "100%"}}},
    ],
)
def test_a_pdb_that_blocks_every_eviction_is_refused(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError, match="allows no eviction"):
        render_files(values)


def test_pdb_percentages_and_opt_out() -> None:
    objects = render({"webhook": {"replicas": 4, "podDisruptionBudget": {"minAvailable": "50%"}}})
    validate(objects)
    assert one(objects, "PodDisruptionBudget", "meshguard-webhook")["spec"]["minAvailable"] == (
        "50%"
    )
    disabled = render({"authz": {"podDisruptionBudget": {"enabled": False, "minAvailable": 1}}})
    assert [p["metadata"]["name"] for p in kinds(disabled, "PodDisruptionBudget")] == [
        "meshguard-webhook"
    ]


# --- drain ------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["webhook", "authz"])
def test_pods_drain_before_they_stop(component: str) -> None:
    objects = render({})
    deployment = one(objects, "Deployment", f"meshguard-{component}")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    (sleep, seconds) = main["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and int(seconds) >= 5
    # the kubelet waits for preStop, then SIGTERM; in-flight admissions last at most the
    # webhook's timeoutSeconds: the grace period covers both
    in_flight = 10 if component == "webhook" else 2
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + in_flight
    assert main["readinessProbe"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # `sleep` is in the image (Debian slim base: coreutils), run as the servers' user
    dockerfile = (CHART.parents[1] / "Dockerfile").read_text()
    assert re.search(r"^FROM python:[\d.]+-slim(-\w+)?$", dockerfile, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {
                "webhook": {
                    "drain": {"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 20}
                }
            },
            r"webhook.drain.terminationGracePeriodSeconds \(20\) must exceed "
            r"preStopSleepSeconds \(10\) \+ webhook.timeoutSeconds \(10\)",
        ),
        (
            {"authz": {"drain": {"preStopSleepSeconds": 30, "terminationGracePeriodSeconds": 30}}},
            r"authz.drain.terminationGracePeriodSeconds \(30\) must exceed preStopSleepSeconds",
        ),
    ],
)
def test_a_grace_period_shorter_than_the_drain_is_refused(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render_files(values)


def test_no_prestop_hook_when_the_sleep_is_zero() -> None:
    drain = {"preStopSleepSeconds": 0, "terminationGracePeriodSeconds": 30}
    objects = render({"authz": {"drain": drain}})
    validate(objects)
    deployment = one(objects, "Deployment", "meshguard-authz")
    assert "lifecycle" not in container(deployment)
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 30


@pytest.fixture
def webhook_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    ca = CertificateAuthority.create()
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca.issue(cert_file, key_file)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "meshguard", "serve-webhook", "--cert", str(cert_file),
         "--key", str(key_file), "--host", "127.0.0.1", "--port", str(port),
         "--signing-key", str(signing_key_file(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield process, port, ca_file
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_webhook_finishes_in_flight_admissions_on_sigterm(
    webhook_process: tuple[subprocess.Popen[str], int, Path],
) -> None:
    """SIGTERM: not ready, no new connections, the request in flight still answered, exit 0."""
    process, port, ca_file = webhook_process
    context = ssl.create_default_context(cafile=str(ca_file))

    def connect() -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)

    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, process.communicate()[1]
        try:
            probe = connect()
            probe.request("GET", "/readyz")
            if probe.getresponse().status == 200:
                break
        except OSError:
            assert time.monotonic() < deadline, "webhook not ready within 20s"
            time.sleep(0.1)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}
    pod["spec"] = {"containers": [{"name": "app", "image": "app"}]}
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "in-flight",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "default",
            "object": pod,
        },
    }
    body = json.dumps(review).encode()
    in_flight = connect()
    in_flight.putrequest("POST", "/inject")
    in_flight.putheader("Content-Type", "application/json")
    in_flight.putheader("Content-Length", str(len(body)))
    in_flight.endheaders()
    in_flight.send(body[:20])  # the API server is mid-request when the pod is told to stop
    time.sleep(1.0)  # the server has read the headers: the request is in flight
    process.send_signal(signal.SIGTERM)
    # it stops accepting: new connections are refused while the request is still open
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting 10s after SIGTERM"
        time.sleep(0.05)
    assert process.poll() is None  # ... but it has not exited: a request is in flight
    in_flight.send(body[20:])
    response = in_flight.getresponse()
    assert response.status == 200
    answer = json.loads(response.read())
    assert answer["response"]["uid"] == "in-flight"
    assert answer["response"]["allowed"] is True
    assert process.wait(timeout=10) == 0


# --- Pod Security Standards --------------------------------------------------------------


def _violations(template: dict[str, Any], level: pss.Level) -> set[pss.Violation]:
    """What a pod template (its spec and its annotations) fails at ``level``."""
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    return pss.violations(template["spec"], level=level, annotations=annotations)


@pytest.mark.parametrize("component", ["webhook", "authz"])
@pytest.mark.parametrize("mode", ["generated", "existingSecret-cainjector", "certManager"])
def test_servers_pass_pod_security_restricted(component: str, mode: str) -> None:
    deployment = one(render(values_of(mode)), "Deployment", f"meshguard-{component}")
    assert _violations(deployment["spec"]["template"], "restricted") == set()
    # the fields restricted asks for, stated where they are set
    main = container(deployment)["securityContext"]
    assert main["allowPrivilegeEscalation"] is False
    assert main["capabilities"] == {"drop": ["ALL"]}
    assert main["runAsNonRoot"] is True and main["runAsUser"] != 0
    assert main["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize(
    ("mutate", "violation"),
    [
        (lambda c, p: c.pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (lambda c, p: c.update(capabilities={"drop": ["NET_RAW"]}), "capabilities drop ALL"),
        (lambda c, p: (c.pop("runAsNonRoot"), p.pop("runAsNonRoot")), "runAsNonRoot"),
        (lambda c, p: (c.pop("seccompProfile"), p.pop("seccompProfile")), "seccompProfile"),
        (lambda c, p: c.update(capabilities={"add": ["NET_ADMIN"]}), "capability NET_ADMIN"),
        (lambda c, p: c.update(privileged=True), "privileged"),
    ],
)
def test_the_pss_checker_sees_each_restricted_rule(mutate: Any, violation: str) -> None:
    template = one(render({}), "Deployment", "meshguard-webhook")["spec"]["template"]
    spec = template["spec"]
    mutate(spec["containers"][0]["securityContext"], spec["securityContext"])
    assert ("webhook", violation) in _violations(template, "restricted")


POD, MAIN = pss.POD, "webhook"
Change = tuple[str, dict[str, Any]]


def _apply(template: dict[str, Any], change: Change) -> None:
    """Set fields (None: remove them) on a part of the webhook's pod template: its "spec",
    the "pod"'s or the "webhook"'s securityContext, the "container" or the "annotations"."""
    where, fields = change
    spec = template["spec"]
    target = {
        "spec": spec,
        POD: spec["securityContext"],
        MAIN: spec["containers"][0]["securityContext"],
        "container": spec["containers"][0],
        "annotations": template["metadata"]["annotations"],
    }[where]
    for key, value in fields.items():
        if value is None:
            target.pop(key)
        else:
            target[key] = value


APPARMOR = "container.apparmor.security.beta.kubernetes.io/webhook"
UNCONFINED = {"type": "Unconfined"}
SPC = {"type": "spc_t", "user": "u", "role": "r"}
SPC_FOUND = {"seLinuxOptions.type spc_t", "seLinuxOptions.user", "seLinuxOptions.role"}
#: id: (changes to the webhook's pod template, which passes restricted; exactly what baseline
#: then finds; exactly what restricted finds on top of it)
PSS_RULES: dict[str, tuple[list[Change], set[tuple[str, str]], set[tuple[str, str]]]] = {
    "hostNetwork": ([("spec", {"hostNetwork": True})], {(POD, "hostNetwork")}, set()),
    "hostPID": ([("spec", {"hostPID": True})], {(POD, "hostPID")}, set()),
    "hostIPC": ([("spec", {"hostIPC": True})], {(POD, "hostIPC")}, set()),
    "pod hostProcess": (
        [(POD, {"windowsOptions": {"hostProcess": True}})], {(POD, "hostProcess")}, set()
    ),
    "hostProcess": (
        [(MAIN, {"windowsOptions": {"hostProcess": True}})], {(MAIN, "hostProcess")}, set()
    ),
    "privileged": ([(MAIN, {"privileged": True})], {(MAIN, "privileged")}, set()),
    "capability": (
        [(MAIN, {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}})],
        {(MAIN, "capability SYS_ADMIN")}, {(MAIN, "restricted capability SYS_ADMIN")},
    ),
    "baseline capability": (
        [(MAIN, {"capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}})],
        set(), {(MAIN, "restricted capability CHOWN")},
    ),
    "NET_BIND_SERVICE": (
        [(MAIN, {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}})], set(), set()
    ),
    "hostPath": (
        [("spec", {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]})],
        {(POD, "hostPath volume host")}, {(POD, "volume type hostPath")},
    ),
    "volume type": (
        [("spec", {"volumes": [{"name": "n", "nfs": {"server": "s", "path": "/"}}]})],
        set(), {(POD, "volume type nfs")},
    ),
    "hostPort": (
        [("container", {"ports": [{"containerPort": 9443, "hostPort": 9443}]})],
        {(MAIN, "hostPort 9443")}, set(),
    ),
    "procMount": ([(MAIN, {"procMount": "Unmasked"})], {(MAIN, "procMount")}, set()),
    "sysctl": (
        [(POD, {"sysctls": [{"name": "kernel.msgmax", "value": "1"},
                            {"name": "net.ipv4.tcp_syncookies", "value": "1"}]})],
        {(POD, "sysctl kernel.msgmax")}, set(),
    ),
    "pod seccomp": ([(POD, {"seccompProfile": UNCONFINED})], {(POD, "seccomp Unconfined")}, set()),
    "seccomp": (
        [(MAIN, {"seccompProfile": UNCONFINED})],
        {(MAIN, "seccomp Unconfined")}, {(MAIN, "seccompProfile")},
    ),
    # a pod's own field is judged on the pod, also where each container sets its own
    "pod appArmor": (
        [(POD, {"appArmorProfile": UNCONFINED}),
         (MAIN, {"appArmorProfile": {"type": "RuntimeDefault"}})],
        {(POD, "appArmor Unconfined")}, set(),
    ),
    "appArmor": ([(MAIN, {"appArmorProfile": UNCONFINED})], {(MAIN, "appArmor Unconfined")}, set()),
    "AppArmor annotation": (
        [("annotations", {APPARMOR: "unconfined"})],
        {(POD, f"annotation {APPARMOR}=unconfined")}, set(),
    ),
    "AppArmor annotation allowed": (
        [("annotations", {APPARMOR: "runtime/default", f"{APPARMOR}2": "localhost/profile"})],
        set(), set(),
    ),
    "pod seLinuxOptions": (
        [(POD, {"seLinuxOptions": SPC}), (MAIN, {"seLinuxOptions": {"type": "container_t"}})],
        {(POD, found) for found in SPC_FOUND}, set(),
    ),
    "seLinuxOptions": (
        [(MAIN, {"seLinuxOptions": SPC | {"level": "s0:c1"}})],
        {(MAIN, found) for found in SPC_FOUND}, set(),
    ),
    "allowPrivilegeEscalation": (
        [(MAIN, {"allowPrivilegeEscalation": None})], set(), {(MAIN, "allowPrivilegeEscalation")}
    ),
    "runAsNonRoot": ([(MAIN, {"runAsNonRoot": False})], set(), {(MAIN, "runAsNonRoot")}),
    # the pod may not say false (or 0), even where its containers say otherwise
    "pod runAsNonRoot": ([(POD, {"runAsNonRoot": False})], set(), {(POD, "runAsNonRoot")}),
    "runAsUser": ([(MAIN, {"runAsUser": 0})], set(), {(MAIN, "runAsUser 0")}),
    "pod runAsUser": ([(POD, {"runAsUser": 0})], set(), {(POD, "runAsUser 0")}),
    "inherited runAsUser": (
        [(POD, {"runAsUser": 0}), (MAIN, {"runAsUser": None})],
        set(), {(POD, "runAsUser 0"), (MAIN, "runAsUser 0")},
    ),
    "seccompProfile": (
        [(POD, {"seccompProfile": None}), (MAIN, {"seccompProfile": None})],
        set(), {(MAIN, "seccompProfile")},
    ),
    "drop ALL": ([(MAIN, {"capabilities": {}})], set(), {(MAIN, "capabilities drop ALL")}),
    "init and ephemeral containers": (
        [("spec", {"initContainers": [{"name": "setup", "securityContext": {"privileged": True}}],
                   "ephemeralContainers": [{"name": "debug", "ports": [{"hostPort": 1}]}]})],
        {("setup", "privileged"), ("debug", "hostPort 1")},
        {(name, check) for name in ("setup", "debug")
         for check in ("allowPrivilegeEscalation", "capabilities drop ALL")},
    ),
}  # fmt: skip


@pytest.mark.parametrize("rule", PSS_RULES)
def test_the_pss_checker_sees_each_rule_exactly(rule: str) -> None:
    """Every rule of both levels, at the pod and at a container: the checker finds exactly
    the broken rule, on its owner, and at restricted also baseline's."""
    changes, baseline, restricted = PSS_RULES[rule]
    template = one(render({}), "Deployment", "meshguard-webhook")["spec"]["template"]
    assert _violations(template, "restricted") == set()
    for change in changes:
        _apply(template, change)
    assert _violations(template, "baseline") == baseline
    assert _violations(template, "restricted") == baseline | restricted


def _injected(sample: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Istio's pod template, the same pod after meshguard) for an Istio injector sample."""
    text = shared_file("istio-injector-samples", sample).read_text()
    (template,) = pod_templates([d for d in yaml.safe_load_all(text) if d])
    istio = {"metadata": template.metadata, "spec": template.spec}
    metadata, spec = copy.deepcopy(template.metadata), copy.deepcopy(template.spec)
    inject_pod(metadata, spec, settings=InjectSettings(request_template=False, signer=SIGNER))
    return istio, {"metadata": metadata, "spec": spec}


def test_meshguard_init_needs_the_level_istio_init_needs() -> None:
    """Sidecar mode: istio-init needs NET_ADMIN/NET_RAW already; meshguard-init, nothing more."""
    istio, meshguard = _injected("hello.yaml.injected")
    capabilities = {"capability NET_ADMIN", "capability NET_RAW"}
    assert _violations(istio, "baseline") == {("istio-init", c) for c in capabilities}
    assert _violations(meshguard, "baseline") == {
        *{("istio-init", c) for c in capabilities},
        *{("meshguard-init", c) for c in capabilities},
    }
    # so a namespace that runs Istio's sidecars runs meshguard's at the same level:
    # privileged (or exempted from baseline, as istio-init is)
    names = [c["name"] for c in meshguard["spec"]["initContainers"]]
    assert names.index("meshguard-init") == names.index("istio-init") + 1


def test_istio_cni_mode_costs_no_pod_security_level() -> None:
    """Istio CNI: istio-validation needs no capability, and neither does meshguard-validation."""
    istio, meshguard = _injected("hello.yaml.cni.injected")
    assert _violations(istio, "baseline") == set()
    assert _violations(meshguard, "baseline") == set()
    # meshguard adds no restricted violation (its posture fixes may remove some of the app's)
    assert _violations(meshguard, "restricted") <= _violations(istio, "restricted")
    names = [c["name"] for c in meshguard["spec"]["initContainers"]]
    assert "meshguard-init" not in names
    assert names.index("meshguard-validation") == names.index("istio-validation") + 1
