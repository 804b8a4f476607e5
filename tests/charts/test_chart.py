"""The Helm chart ``charts/meshguard``, rendered and linted by the real Helm engine.

helm-python-sdk binds Helm's Go SDK (``libhelm_c``, shipped in the wheel) through ctypes:
rendering, values.schema.json validation and ``helm lint`` run offline, with no helm binary
and no cluster. Every rendered object is validated against the Kubernetes OpenAPI schemas of
kubernetes-validate (strict: unknown fields are errors); cert-manager's Certificate and Issuer
and the Prometheus Operator's ServiceMonitor have no schema there and are checked by hand.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshguard import __version__
from meshguard.authz.decision import DECISION_HEADERS
from meshguard.authz.istio_config import IstioSettings
from meshguard.cli import build_parser
from meshguard.cli.inject import injection_settings
from meshguard.init_container import DEFAULT_IMAGE, DEFAULT_INIT_IMAGE
from meshguard.inject.posture import PostureAction
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.policy import Mode
from tests.support.keys import signing_key_file
from tests.support.kube import istio_crd_schema, selector_matches
from tests.support.samples import istio_pod

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed (pip install -e '.[test]')"
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "meshguard"
RELEASE = "meshguard"
NAMESPACE = "meshguard-system"
K8S_VERSION = kubernetes_validate.latest_version()
#: Kinds of CRDs kubernetes-validate has no schema for: checked by hand below (and the
#: DestinationRule against Istio's CRD schema in ../shared).
NO_SCHEMA_KINDS = {"Certificate", "Issuer", "ServiceMonitor", "DestinationRule"}
#: Istio's own MutatingWebhookConfigurations: meshguard's must sort after them.
ISTIO_WEBHOOK_CONFIGURATIONS = ("istio-sidecar-injector", "istio-revision-tag-default")

CERT_MANAGER = {"tls": {"mode": "certManager"}}
OBSERVED = {"networkPolicy": {"enabled": True}, "serviceMonitor": {"enabled": True}}
IGNORE = {"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 5}}
NO_TEMPLATE = {
    "webhook": {"requestTemplate": False, "postureAction": "deny"},
    "image": {"repository": "registry.example/mg", "digest": "sha256:" + "a" * 64},
    "init": {"image": {"repository": "registry.example/mg-init", "digest": "sha256:" + "b" * 64}},
}
DESTINATION_RULE = {"istio": {"destinationRule": {"enabled": True}}}
VALUE_SETS = {
    "default": {},
    "destination-rule": DESTINATION_RULE,
    "cert-manager": CERT_MANAGER,
    "netpol+servicemonitor": OBSERVED,
    "failure-ignore": IGNORE,
    "no-template+digest": NO_TEMPLATE,
    "cni": {"cni": {"enabled": True}},
    "authz-revision+pull-secrets": {
        "authz": {"istioRevision": "canary"},
        "imagePullSecrets": [{"name": "regcred"}],
    },
}


# --- rendering ---------------------------------------------------------------------------


@cache
def _render(values_json: str) -> tuple[tuple[str, ...], str]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(
            json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    notes = rendered.pop(f"{CHART.name}/templates/NOTES.txt", "")
    return tuple(rendered[name] for name in sorted(rendered)), notes


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The objects the chart renders with these values (a fresh copy each call)."""
    documents, _ = _render(json.dumps(values or {}, sort_keys=True))
    return [obj for text in documents for obj in yaml.safe_load_all(text) if obj]


def notes(values: dict[str, Any] | None = None) -> str:
    return _render(json.dumps(values or {}, sort_keys=True))[1]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def namespace_labels(name: str, **labels: str) -> dict[str, str]:
    """A namespace's labels as the API server sees them (with the automatic name label)."""
    return {"kubernetes.io/metadata.name": name, **labels}


def pem(data: str) -> bytes:
    return base64.b64decode(data)


def chart_injection_settings(argv: list[str]) -> InjectSettings:
    """The webhook's injection settings from the chart's args; its signing key (a Secret
    mounted in the pod) is the tests' key, written to a file of the same role."""
    with tempfile.TemporaryDirectory() as directory:
        key = signing_key_file(Path(directory))
        argv = [f"--signing-key={key}" if a.startswith("--signing-key=") else a for a in argv]
        return injection_settings(build_parser().parse_args(argv), request_template=False)


# --- every object is a valid Kubernetes object -----------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_is_valid(values: dict[str, Any]) -> None:
    objects = render(values)
    assert objects
    unvalidated = set()
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["kind"] in NO_SCHEMA_KINDS, f"no schema for {obj['kind']}"
            unvalidated.add(obj["kind"])
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
        namespaced = obj["kind"] not in {
            "ClusterRole",
            "ClusterRoleBinding",
            "MutatingWebhookConfiguration",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        }
        assert (obj["metadata"].get("namespace") == NAMESPACE) == namespaced, obj["kind"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshguard"
    assert unvalidated <= NO_SCHEMA_KINDS


def test_default_objects() -> None:
    names = sorted((o["kind"], o["metadata"]["name"]) for o in render())
    assert names == sorted(
        [
            ("ClusterRole", "meshguard-authz"),
            ("ClusterRoleBinding", "meshguard-authz"),
            ("ConfigMap", "meshguard-trusted-keys"),
            ("Deployment", "meshguard-authz"),
            ("Deployment", "meshguard-webhook"),
            ("MutatingWebhookConfiguration", "zz-meshguard"),
            ("PodDisruptionBudget", "meshguard-authz"),
            ("PodDisruptionBudget", "meshguard-webhook"),
            ("Secret", "meshguard-attestation"),
            ("Secret", "meshguard-webhook-tls"),
            ("Service", "meshguard-authz"),
            ("Service", "meshguard-webhook"),
            ("ServiceAccount", "meshguard-authz"),
            ("ServiceAccount", "meshguard-webhook"),
            ("ValidatingAdmissionPolicy", "meshguard-annotation-guard"),
            ("ValidatingAdmissionPolicyBinding", "meshguard-annotation-guard"),
        ]
    )


# --- the workloads ---------------------------------------------------------------------


@pytest.mark.parametrize("component", ["webhook", "authz"])
def test_deployment_security_and_availability(component: str) -> None:
    objects = render()
    deployment = one(objects, "Deployment", f"meshguard-{component}")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    main = container(deployment)
    security = main["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 65532
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["image"] == DEFAULT_IMAGE == f"ghcr.io/meshguard/meshguard:{__version__}"
    assert main["command"] == ["meshguard"]
    assert set(main["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(main["resources"]["requests"])
    assert "memory" in main["resources"]["limits"]
    assert main["livenessProbe"] and main["readinessProbe"]
    # spread over nodes: preferred pod anti-affinity by hostname, on this component's pods
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pod_labels = spec["template"]["metadata"]["labels"]
    assert selector_matches(term["podAffinityTerm"]["labelSelector"], pod_labels)
    assert selector_matches(spec["selector"], pod_labels)
    annotations = spec["template"]["metadata"]["annotations"]
    if component == "authz":  # an Istio-injected pod: meshguard never admits its own
        assert annotations["meshguard.io/inject"] == "false"
    # the webhook runs without Istio; the authz pods get Istio's sidecar for their workload
    # certificate only (mTLS on the Check channel, see test_authz_terminates_mtls_...)
    expected = "true" if component == "authz" else "false"
    assert annotations["sidecar.istio.io/inject"] == expected
    # one PodDisruptionBudget per component, over exactly its pods, leaving room to drain
    pdb = one(objects, "PodDisruptionBudget", f"meshguard-{component}")
    assert pdb["spec"]["selector"] == spec["selector"]
    assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]
    other = "authz" if component == "webhook" else "webhook"
    other_labels = one(objects, "Deployment", f"meshguard-{other}")["spec"]["template"]
    assert not selector_matches(pdb["spec"]["selector"], other_labels["metadata"]["labels"])


def test_a_fresh_install_audits_first_and_the_operator_can_enforce_and_pin_a_baseline() -> None:
    """Install day changes no pod: audit mode by default, posture reported; the values reach
    the real CLI's settings."""
    main = container(one(render(), "Deployment", "meshguard-webhook"))
    settings = chart_injection_settings(main["args"])
    assert settings.default_mode is Mode.AUDIT
    assert settings.posture.audit_action is PostureAction.REPORT
    assert str(settings.posture.baseline) == "latest (v1.37)"
    values = {"webhook": {"defaultMode": "enforce", "baselineVersion": "v1.33"}}
    main = container(one(render(values), "Deployment", "meshguard-webhook"))
    settings = chart_injection_settings(main["args"])
    assert settings.default_mode is Mode.ENFORCE
    assert str(settings.posture.baseline) == "v1.33"


def test_webhook_command_line_is_the_real_cli() -> None:
    deployment = one(render(), "Deployment", "meshguard-webhook")
    main = container(deployment)
    args = build_parser().parse_args(main["args"])
    assert args.handler == "meshguard.cli.serve:webhook"
    assert (str(args.cert), str(args.key)) == (
        "/etc/meshguard/tls/tls.crt",
        "/etc/meshguard/tls/tls.key",
    )
    assert (args.host, args.port) == ("0.0.0.0", 9443)
    assert args.log_level == "info"
    assert str(args.signing_key) == "/etc/meshguard/attestation/signing-key.pem"
    args.signing_key = None  # the Secret's file (tests/charts/test_attestation_chart.py)
    settings = injection_settings(args, request_template=not args.no_template)
    # no template by default: a missing `meshguard` template in istiod cannot block pods
    assert settings.request_template is False
    assert settings.posture.default_action is PostureAction.FIX
    # the slim init image (Dockerfile --target init), the same default as meshguard inject's
    assert (
        settings.init.image
        == DEFAULT_INIT_IMAGE
        == f"ghcr.io/meshguard/meshguard-init:{__version__}"
    )
    # TLS files come from the Secret mounted read-only where --cert/--key point
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["tls"]["mountPath"] == "/etc/meshguard/tls"
    assert mounts["tls"]["readOnly"] is True
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "meshguard-webhook-tls"
    assert "emptyDir" in volumes["tmp"]  # the only writable path
    # HTTPS probes on the server's own port
    (port,) = main["ports"]
    assert port == {"name": "https", "containerPort": 9443, "protocol": "TCP"}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = main[probe]["httpGet"]
        assert http == {"path": path, "port": "https", "scheme": "HTTPS"}
    # no Kubernetes API: no token mounted
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False


def test_webhook_flags_follow_values() -> None:
    main = container(one(render(NO_TEMPLATE), "Deployment", "meshguard-webhook"))
    image = "registry.example/mg@sha256:" + "a" * 64
    assert main["image"] == image
    args = build_parser().parse_args(main["args"])
    assert args.no_template is True
    args.signing_key = None  # the Secret's file (tests/charts/test_attestation_chart.py)
    settings = injection_settings(args, request_template=not args.no_template)
    assert settings.request_template is False
    assert settings.posture.default_action is PostureAction.DENY
    assert settings.init.image == "registry.example/mg-init@sha256:" + "b" * 64
    init = render({"webhook": {"initImage": "other/init:1"}, "image": {"tag": "9.9"}})
    main = container(one(init, "Deployment", "meshguard-webhook"))
    assert main["image"] == "ghcr.io/meshguard/meshguard:9.9"
    assert "--image=other/init:1" in main["args"]
    # init.image follows its own tag (default: the appVersion), not the servers' image
    tagged = render({"init": {"image": {"tag": "9.8"}}, "image": {"tag": "9.9"}})
    main = container(one(tagged, "Deployment", "meshguard-webhook"))
    assert "--image=ghcr.io/meshguard/meshguard-init:9.8" in main["args"]


def test_authz_command_line_is_the_real_cli() -> None:
    deployment = one(render(), "Deployment", "meshguard-authz")
    main = container(deployment)
    args = build_parser().parse_args(main["args"])
    assert args.handler == "meshguard.cli.serve:authz"
    assert args.kubernetes is True
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", 9191, 9192)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"grpc": 9191, "metrics": 9192}
    # the standard gRPC health service, which the server registers for service ""
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["grpc"] == {"port": 9191}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "meshguard-authz"
    assert pod["automountServiceAccountToken"] is True


# --- services and the Istio side ---------------------------------------------------------


def _target(service: dict[str, Any], port_name: str, deployment: dict[str, Any]) -> int:
    """The container port a Service port reaches (by name), checking the selector too."""
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == port_name]
    named = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    return named[port["targetPort"]]


def test_services() -> None:
    objects = render()
    webhook = one(objects, "Service", "meshguard-webhook")
    (port,) = webhook["spec"]["ports"]
    assert port["port"] == 443
    assert _target(webhook, "https", one(objects, "Deployment", "meshguard-webhook")) == 9443
    authz = one(objects, "Service", "meshguard-authz")
    ports = {p["name"]: p["port"] for p in authz["spec"]["ports"]}
    assert ports == {"grpc": 9191, "metrics": 9192}
    deployment = one(objects, "Deployment", "meshguard-authz")
    assert _target(authz, "grpc", deployment) == 9191
    assert _target(authz, "metrics", deployment) == 9192


def test_authz_service_is_what_the_envoyfilter_calls() -> None:
    istio = IstioSettings()
    authz = one(render(), "Service", istio.service)
    name, namespace = authz["metadata"]["name"], authz["metadata"]["namespace"]
    grpc = next(p for p in authz["spec"]["ports"] if p["name"] == "grpc")
    host = f"{name}.{namespace}.svc.cluster.local"
    assert f"outbound|{grpc['port']}||{host}" == istio.cluster
    envoy_filter = (ROOT / "istio" / "loopback-listener.envoyfilter.yaml").read_text()
    assert istio.cluster in envoy_filter
    assert "WARNING" not in notes()
    elsewhere = notes({"authz": {"service": {"port": 9000}}})
    assert "outbound|9000||meshguard-authz.meshguard-system.svc.cluster.local" in elsewhere


# --- RBAC --------------------------------------------------------------------------------


def test_rbac_reads_pods_only() -> None:
    objects = render()
    (role,) = kinds(objects, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert not kinds(objects, "Role") and not kinds(objects, "RoleBinding")
    (binding,) = kinds(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "meshguard-authz", "namespace": NAMESPACE}
    ]
    webhook_account = one(objects, "ServiceAccount", "meshguard-webhook")
    assert webhook_account["automountServiceAccountToken"] is False
    pod = one(objects, "Deployment", "meshguard-webhook")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "meshguard-webhook"


# --- the MutatingWebhookConfiguration ----------------------------------------------------


def configuration(values: dict[str, Any] | None = None) -> dict[str, Any]:
    (config,) = kinds(render(values), "MutatingWebhookConfiguration")
    return config


def test_webhook_configuration() -> None:
    config = configuration()
    assert all(config["metadata"]["name"] > istio for istio in ISTIO_WEBHOOK_CONFIGURATIONS)
    hooks = config["webhooks"]
    # what Istio's injection left on the pod; the admitted pods' debug containers
    # (tests/charts/test_selection.py)
    # one entry per namespace mode (meshguard.io/mode), each with its own path
    modes = [("", "/inject"), ("audit.", "/inject/audit"), ("enforce.", "/inject/enforce"),
             ("other-mode.", "/inject/other")]  # fmt: skip
    expected = [
        (f"{prefix}{entry}", path)
        for entry in ("sidecar.injected.meshguard.io", "template.injected.meshguard.io")
        for prefix, path in modes
    ] + [("admitted.meshguard.io", "/inject")]
    assert [(h["name"], h["clientConfig"]["service"]["path"]) for h in hooks] == expected
    for hook in hooks:
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["sideEffects"] == "None"
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["failurePolicy"] == "Fail"
        assert hook["timeoutSeconds"] == 10
        assert hook["clientConfig"]["service"] == {
            "name": "meshguard-webhook",
            "namespace": NAMESPACE,
            "path": hook["clientConfig"]["service"]["path"],
            "port": 443,
        }
    create = {
        "operations": ["CREATE"],
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "resources": ["pods"],
        "scope": "Namespaced",
    }
    debug = create | {"operations": ["UPDATE"], "resources": ["pods/ephemeralcontainers"]}
    assert [h["rules"] for h in hooks] == [[create]] * 8 + [[debug]]


@pytest.mark.parametrize(
    ("mode_label", "path"),
    [
        (None, "/inject"),  # the cluster default (webhook.defaultMode)
        ("audit", "/inject/audit"),
        ("enforce", "/inject/enforce"),
        ("Enforce", "/inject/other"),  # not a mode: the webhook refuses the pod, naming it
        ("", "/inject/other"),
    ],
)
def test_a_namespaces_mode_label_reaches_the_webhook_as_its_path(
    mode_label: str | None, path: str
) -> None:
    extra = {} if mode_label is None else {"meshguard.io/mode": mode_label}
    namespace = namespace_labels("shop", **{"istio-injection": "enabled", **extra})
    for pod in (INJECTED, {"app": "gw", "service.istio.io/canonical-name": "gw"}):
        matching = [
            h["clientConfig"]["service"]["path"]
            for h in configuration()["webhooks"]
            if "CREATE" in h["rules"][0]["operations"]
            and selector_matches(h["namespaceSelector"], namespace)
            and selector_matches(h["objectSelector"], pod)
        ]
        assert matching == [path]


def test_failure_policy_and_timeout_are_configurable() -> None:
    for hook in configuration(IGNORE)["webhooks"]:
        assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Ignore", 5)
    assert "WITHOUT meshguard" in notes(IGNORE)


INJECTED = {"app": "shop", "security.istio.io/tlsMode": "istio"}


@pytest.mark.parametrize(
    ("namespace", "selected"),
    [
        # any namespace Istio injects in, whatever its labels: the pod's labels decide
        (namespace_labels("shop", **{"istio-injection": "enabled"}), True),
        (namespace_labels("shop", **{"istio.io/rev": "canary"}), True),
        (namespace_labels("shop"), True),
        # the opt-out label
        (namespace_labels("shop", **{"istio.io/rev": "x", "meshguard.io/inject": "disabled"}),
         False),
        (namespace_labels("shop", **{"meshguard.io/inject": "enabled"}), True),
        # meshguard's own namespace and kube-system, even if labeled
        (namespace_labels(NAMESPACE, **{"istio-injection": "enabled"}), False),
        (namespace_labels("kube-system", **{"istio.io/rev": "x"}), False),
    ],
)  # fmt: skip
def test_namespace_selector(namespace: dict[str, str], selected: bool) -> None:
    matching = [
        h["name"]
        for h in configuration()["webhooks"]
        if "CREATE" in h["rules"][0]["operations"]
        and selector_matches(h["namespaceSelector"], namespace)
        and selector_matches(h["objectSelector"], INJECTED)
    ]
    assert len(matching) == (1 if selected else 0), matching


@pytest.mark.parametrize(
    ("pod_labels", "selected"),
    [
        ({"app": "shop"}, False),  # not injected (yet)
        (INJECTED, True),
        ({**INJECTED, "security.istio.io/tlsMode": "disabled"}, True),  # the pod's own value
        ({"app": "gw", "service.istio.io/canonical-name": "gw"}, True),  # gateway template
    ],
)
def test_object_selector(pod_labels: dict[str, str], selected: bool) -> None:
    namespace = namespace_labels("shop", **{"istio-injection": "enabled"})
    matching = [
        h["name"]
        for h in configuration()["webhooks"]
        if "CREATE" in h["rules"][0]["operations"]
        and selector_matches(h["namespaceSelector"], namespace)
        and selector_matches(h["objectSelector"], pod_labels)
    ]
    assert len(matching) == (1 if selected else 0), matching


# --- TLS ---------------------------------------------------------------------------------

DNS_NAMES = [
    "meshguard-webhook",
    f"meshguard-webhook.{NAMESPACE}",
    f"meshguard-webhook.{NAMESPACE}.svc",
    f"meshguard-webhook.{NAMESPACE}.svc.cluster.local",
]


def test_generated_tls() -> None:
    objects = render()
    secret = one(objects, "Secret", "meshguard-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    ca = x509.load_pem_x509_certificate(pem(secret["data"]["ca.crt"]))
    leaf = x509.load_pem_x509_certificate(pem(secret["data"]["tls.crt"]))
    key = serialization.load_pem_private_key(pem(secret["data"]["tls.key"]), password=None)
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == DNS_NAMES
    assert key.public_key() == leaf.public_key()
    # the API server trusts that CA, in both webhook entries
    for hook in one(objects, "MutatingWebhookConfiguration", "zz-meshguard")["webhooks"]:
        assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    assert kinds(objects, "Certificate") == kinds(objects, "Issuer") == []


def test_cert_manager_tls() -> None:
    objects = render(CERT_MANAGER)
    assert [s["metadata"]["name"] for s in kinds(objects, "Secret")] == ["meshguard-attestation"]
    issuer = one(objects, "Issuer", "meshguard-selfsigned")
    assert issuer["apiVersion"] == "cert-manager.io/v1"
    assert issuer["spec"] == {"selfSigned": {}}
    certificate = one(objects, "Certificate", "meshguard-webhook")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert spec["dnsNames"] == DNS_NAMES
    assert spec["secretName"] == "meshguard-webhook-tls"
    assert spec["issuerRef"] == {
        "name": "meshguard-selfsigned",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    assert "server auth" in spec["usages"]
    assert re.fullmatch(r"\d+h", spec["duration"]) and re.fullmatch(r"\d+h", spec["renewBefore"])
    # the webhook mounts the Secret cert-manager writes; cainjector fills the caBundle
    pod = one(objects, "Deployment", "meshguard-webhook")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == spec["secretName"]
    config = one(objects, "MutatingWebhookConfiguration", "zz-meshguard")
    annotation = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{certificate['metadata']['namespace']}/meshguard-webhook"
    for hook in config["webhooks"]:
        assert "caBundle" not in hook["clientConfig"]


def test_cert_manager_with_an_existing_issuer() -> None:
    values = {"tls": {"mode": "certManager", "certManager": {"issuerRef": {"name": "corp-ca"}}}}
    values["tls"]["certManager"]["issuerRef"]["kind"] = "ClusterIssuer"
    objects = render(values)
    assert not kinds(objects, "Issuer")
    certificate = one(objects, "Certificate", "meshguard-webhook")
    assert certificate["spec"]["issuerRef"] == {
        "name": "corp-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


# --- NetworkPolicy and ServiceMonitor ----------------------------------------------------


def test_network_policies() -> None:
    objects = render(OBSERVED)
    webhook = one(objects, "NetworkPolicy", "meshguard-webhook")
    deployment = one(objects, "Deployment", "meshguard-webhook")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(webhook["spec"]["podSelector"], labels)
    assert webhook["spec"]["policyTypes"] == ["Ingress"]
    # the API server is not a pod: the HTTPS port is open to any source
    assert webhook["spec"]["ingress"] == [{"ports": [{"port": "https", "protocol": "TCP"}]}]

    authz = one(objects, "NetworkPolicy", "meshguard-authz")
    deployment = one(objects, "Deployment", "meshguard-authz")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(authz["spec"]["podSelector"], labels)
    grpc_rule, metrics_rule = authz["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert "from" not in metrics_rule  # metricsFrom empty: any scraper

    def admitted(namespace: dict[str, str], pod: dict[str, str]) -> bool:
        return any(
            selector_matches(p["namespaceSelector"], namespace)
            and selector_matches(p.get("podSelector") or {}, pod)
            for p in grpc_rule["from"]
        )

    # Every Istio-injected pod (Istio labels it), whichever way Istio selected it.
    injected = {"security.istio.io/tlsMode": "istio"}
    assert admitted(namespace_labels("shop", **{"istio-injection": "enabled"}), injected)
    assert admitted(namespace_labels("shop", **{"istio.io/rev": "canary"}), injected)
    assert admitted(namespace_labels("shop"), injected)  # injected by its own pod label
    assert not admitted(namespace_labels("shop", **{"istio-injection": "enabled"}), {"a": "b"})

    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    restricted = render({"networkPolicy": {"enabled": True, "metricsFrom": [scraper]}})
    rules = one(restricted, "NetworkPolicy", "meshguard-authz")["spec"]["ingress"]
    assert rules[1]["from"] == [scraper]
    assert not kinds(render(), "NetworkPolicy")


def test_service_monitors() -> None:
    objects = render(OBSERVED)
    assert not kinds(render(), "ServiceMonitor")
    for component, port_name, scheme in (
        ("webhook", "https", "https"),
        ("authz", "metrics", "http"),
    ):
        monitor = one(objects, "ServiceMonitor", f"meshguard-{component}")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        service = one(objects, "Service", f"meshguard-{component}")
        assert selector_matches(spec["selector"], service["metadata"]["labels"])
        other = "authz" if component == "webhook" else "webhook"
        other_labels = one(objects, "Service", f"meshguard-{other}")["metadata"]["labels"]
        assert not selector_matches(spec["selector"], other_labels)
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == (
            port_name,
            "/metrics",
            scheme,
        )
    webhook = one(objects, "ServiceMonitor", "meshguard-webhook")["spec"]["endpoints"][0]
    assert webhook["tlsConfig"] == {
        "serverName": f"meshguard-webhook.{NAMESPACE}.svc",
        "ca": {"secret": {"name": "meshguard-webhook-tls", "key": "ca.crt"}},
    }


# --- the Istio DestinationRule ------------------------------------------------------------


def test_destination_rule_is_istio_mutual_to_the_authz_service() -> None:
    assert not kinds(render(), "DestinationRule")
    objects = render(DESTINATION_RULE)
    rule = one(objects, "DestinationRule", "meshguard-authz")
    group, version = rule["apiVersion"].split("/")
    assert group == "networking.istio.io"
    jsonschema.validate(rule, istio_crd_schema("DestinationRule", version))
    assert rule["spec"]["host"] == IstioSettings().host
    assert rule["spec"]["trafficPolicy"] == {"tls": {"mode": "ISTIO_MUTUAL"}}


def test_authz_terminates_mtls_with_istios_workload_certificate() -> None:
    """The authz pod gets Istio's sidecar for its certificate only (no inbound capture),
    the server reads the files the agent writes (OUTPUT_CERTS) and checks callers against
    the trust domain; mtls.enabled false is plaintext, said so on the command line."""
    values = {"authz": {"mtls": {"trustDomain": "example.org"}}}
    pod = one(render(values), "Deployment", "meshguard-authz")["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    assert annotations["traffic.sidecar.istio.io/includeInboundPorts"] == ""
    assert json.loads(annotations["proxy.istio.io/config"]) == {
        "proxyMetadata": {"OUTPUT_CERTS": "/etc/istio-output-certs"}
    }
    (mount,) = json.loads(annotations["sidecar.istio.io/userVolumeMount"])
    assert mount == {"name": "istio-certs", "mountPath": "/etc/istio-output-certs"}
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert "--tls-cert=/etc/istio-output-certs/cert-chain.pem" in args
    assert "--tls-key=/etc/istio-output-certs/key.pem" in args
    assert "--tls-ca=/etc/istio-output-certs/root-cert.pem" in args
    assert "--trust-domain=example.org" in args
    assert "--insecure-plaintext" not in args
    assert {"name": "istio-certs", "mountPath": "/etc/istio-output-certs", "readOnly": True} in (
        container["volumeMounts"]
    )
    assert any(v["name"] == "istio-certs" for v in pod["spec"]["volumes"])

    plain = render({"authz": {"mtls": {"enabled": False, "insecureAnyCaller": True}},
                    **DESTINATION_RULE})  # fmt: skip
    rule = one(plain, "DestinationRule", "meshguard-authz")
    assert rule["spec"]["trafficPolicy"] == {"tls": {"mode": "DISABLE"}}
    pod = one(plain, "Deployment", "meshguard-authz")["spec"]["template"]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert "--insecure-plaintext" in pod["spec"]["containers"][0]["args"]


def test_the_envoyfilter_forwards_only_the_listed_headers() -> None:
    values = {"istio": {"envoyFilter": {"enabled": True}}, "authz": {"forwardHeaders": ["X-Token"]}}
    envoy_filter = one(render(values), "EnvoyFilter", "meshguard-loopback-listener")
    text = json.dumps(envoy_filter)
    filters = [
        f
        for patch in envoy_filter["spec"]["configPatches"]
        if patch["applyTo"] == "LISTENER"
        for chain in patch["patch"]["value"]["filter_chains"]
        for f in chain["filters"][0]["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    ]
    assert len(filters) == 2
    for ext_authz in filters:
        config = ext_authz["typed_config"]
        assert config["allowed_headers"]["patterns"] == [
            {"exact": name, "ignore_case": True}
            for name in ("x-meshguard-pod", *DECISION_HEADERS, "x-token")
        ]
        assert "with_request_body" not in config
    assert "authorization" not in text.lower()


def test_a_broken_destination_rule_fails_istios_schema() -> None:
    rule = one(render(DESTINATION_RULE), "DestinationRule", "meshguard-authz")
    rule["spec"]["trafficPolicy"]["tls"]["mode"] = "PLAINTEXT"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, istio_crd_schema("DestinationRule", "v1"))


# --- values, schema, lint ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"webhook": {"replicas": "two"}}, "/webhook/replicas"),
        ({"authz": {"replicas": 0}}, "/authz/replicas"),
        ({"tls": {"mode": "vault"}}, "/tls/mode"),
        ({"webhook": {"postureAction": "warn"}}, "/webhook/postureAction"),
        ({"webhook": {"defaultMode": "permissive"}}, "/webhook/defaultMode"),
        ({"webhook": {"auditPostureAction": "ignore"}}, "/webhook/auditPostureAction"),
        ({"webhook": {"baselineVersion": "1.30"}}, "/webhook/baselineVersion"),
        ({"webhook": {"failurePolicy": "Sometimes"}}, "/webhook/failurePolicy"),
        ({"webhook": {"timeoutSeconds": 31}}, "/webhook/timeoutSeconds"),
        ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
        ({"replicas": 2}, "replicas"),
        ({"webhook": {"replica": 2}}, "replica"),
        ({"init": {"image": {"digest": "latest"}}}, "/init/image/digest"),
        ({"init": {"image": {"pullPolicy": "Always"}}}, "pullPolicy"),
    ],
)
def test_bad_values_are_rejected_by_the_schema(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(values))


def test_schema_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return schema["definitions"][ref.rsplit("/", 1)[1]] if ref else node

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        assert "type" in node or "oneOf" in node, f"{path}: no type in the schema"
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: open object"
            assert set(value) <= set(node["properties"]), path
            for key, child in value.items():
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(defaults, schema, "")


def test_every_value_is_commented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*[\w.-]+:", line):
            previous = lines[number - 1].strip()
            assert previous.startswith("#"), f"values.yaml:{number + 1}: {line.strip()}"


def test_chart_metadata() -> None:
    with helm.Chart.load(CHART) as chart:
        metadata = chart.metadata
    assert metadata["apiVersion"] == "v2"
    assert (metadata["name"], metadata["version"]) == ("meshguard", "0.1.0")
    assert metadata["appVersion"] == __version__


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # severity 1 is informational ("icon is recommended"); 2 warning, 3 error
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_helm_lint_reports_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "meshguard"
    shutil.copytree(CHART, broken)
    services = broken / "templates" / "services.yaml"
    services.write_text(services.read_text().replace("  type: ClusterIP\n", "   type: [\n", 1))
    report = helm.lint(broken, strict=True, namespace=NAMESPACE)
    assert any("services.yaml" in m["path"] for m in report["messages"] if m["severity"] == 3)


def test_servers_run_as_the_images_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    # one user for both targets (the servers' image and the init image)
    (user,) = set(re.findall(r"^USER (\d+):(\d+)$", dockerfile, flags=re.MULTILINE))
    assert re.search(r'^ENTRYPOINT \["meshguard"\]$', dockerfile, flags=re.MULTILINE)
    for component in ("webhook", "authz"):
        deployment = one(render(), "Deployment", f"meshguard-{component}")
        security = container(deployment)["securityContext"]
        assert (str(security["runAsUser"]), str(security["runAsGroup"])) == user
        assert container(deployment)["command"] == ["meshguard"]


# --- the init image's pull secrets reach application pods (issue 24 item 7) -------------


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({}, ()),
        ({"imagePullSecrets": [{"name": "regcred"}]}, ("regcred",)),
        (
            {"imagePullSecrets": [{"name": "regcred"}],
             "init": {"imagePullSecrets": [{"name": "init-a"}, {"name": "init-b"}]}},
            ("init-a", "init-b"),
        ),
    ],
)  # fmt: skip
def test_the_init_image_pull_secrets_reach_the_injected_pods(
    values: dict[str, Any], names: tuple[str, ...]
) -> None:
    main = container(one(render(values), "Deployment", "meshguard-webhook"))
    settings = chart_injection_settings(main["args"])
    assert settings.init.pull_secrets == names
    pod = istio_pod()
    pod["spec"]["imagePullSecrets"] = [{"name": "app-own"}]
    inject_pod(pod["metadata"], pod["spec"], settings=settings)
    assert pod["spec"]["imagePullSecrets"] == [{"name": n} for n in ("app-own", *names)]
    inject_pod(pod["metadata"], pod["spec"], settings=settings)  # reinvoked: no duplicate
    assert pod["spec"]["imagePullSecrets"] == [{"name": n} for n in ("app-own", *names)]


def test_kube_version_is_the_one_the_annotation_guard_needs() -> None:
    """ValidatingAdmissionPolicy (the annotation guard) is GA in Kubernetes 1.30."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.30.0-0"
    assert kinds(render(), "ValidatingAdmissionPolicy")


def test_notes_audit_leaves_out_what_meshguard_is_told_to_stay_away_from() -> None:
    text = notes()
    (selector,) = re.findall(r"kubectl get namespaces -o name -l '([^']+)'", text)
    assert selector == (
        f"meshguard.io/inject!=disabled,kubernetes.io/metadata.name notin ({NAMESPACE},kube-system)"
    )
    assert "| meshguard describe -f - --only-unprotected --fail-on-unprotected" in text
    assert "no longer" not in text  # istio.revisions at its default: nothing to say
    assert "no longer" in notes({"istio": {"revisions": ["canary"]}})


def test_notes_explain_istio_cni_mode_without_the_node_agent() -> None:
    text = notes()
    assert "cni.enabled is false" in text and "never start" in text
    assert "cni.enabled is false" not in notes({"cni": {"enabled": True}})
