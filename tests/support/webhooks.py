"""How the API server and ``istioctl analyze`` read MutatingWebhookConfigurations.

Two reimplementations for the chart tests, each from its source:

- :func:`admit_create` / :func:`called_on_update`: kube-apiserver's mutating dispatcher
  (``staging/src/k8s.io/apiserver/pkg/admission/plugin/webhook/mutating/dispatcher.go`` and
  ``configuration/mutating_webhook_manager.go``). Configurations are sorted by name and their
  entries called in that order; each entry's selectors are evaluated on the object as the
  entries before it left it (``attrForCheck`` is the patched object); an entry with
  ``reinvocationPolicy: IfNeeded`` that was called is called again when a later one changed
  the object, but "during reinvocation, a webhook will not be called for the first time"
  (the dispatcher's own comment: an entry skipped in the first round because its labels did
  not match is never called). On UPDATE the objectSelector is tried on the old and the new
  object: the entry is called if either matches (``object.go`` ``MatchObjectSelector``).
- :func:`analyze`: Istio's webhook analyzer (IST0139, ``pkg/config/analysis/analyzers/
  webhook/webhook.go``, ../shared/istio-analyzers/webhook.go), as ``istioctl analyze`` and
  ``istioctl tag set`` run it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tests.support.kube import selector_matches

Labels = dict[str, str]
#: What a webhook does to the pod's labels when called (None: nothing).
Mutator = Callable[[Labels], Labels | None]

REV = "istio.io/rev"


@dataclass(frozen=True)
class Entry:
    configuration: str
    hook: dict[str, Any]

    @property
    def uid(self) -> str:
        return f"{self.configuration}/{self.hook['name']}"


def ordered(configurations: Mapping[str, list[dict[str, Any]]]) -> list[Entry]:
    """Every entry in the order the API server calls them (configurations by name)."""
    return [Entry(name, hook) for name in sorted(configurations) for hook in configurations[name]]


def rule_matches(hook: dict[str, Any], *, operation: str, resource: str) -> bool:
    for rule in hook.get("rules") or []:
        operations = rule.get("operations") or []
        if ("*" in operations or operation in operations) and resource in (
            rule.get("resources") or []
        ):
            return True
    return False


def admit_create(
    configurations: Mapping[str, list[dict[str, Any]]],
    *,
    namespace: Labels,
    pod: Labels,
    mutators: Mapping[str, Mutator],
) -> tuple[list[str], Labels]:
    """The entries a pod CREATE calls (in order, reinvocations included) and the pod's final
    labels. ``mutators``: configuration name -> what its webhook does to the labels."""
    labels = dict(pod)
    called: list[str] = []
    first_round: set[str] = set()
    changed_after: dict[str, bool] = {}
    entries = ordered(configurations)
    for round_ in (0, 1):
        for entry in entries:
            hook = entry.hook
            if not rule_matches(hook, operation="CREATE", resource="pods"):
                continue
            if not (
                selector_matches(hook.get("namespaceSelector"), namespace)
                and selector_matches(hook.get("objectSelector"), labels)
            ):
                continue
            if round_ == 1 and not (
                entry.uid in first_round
                and hook.get("reinvocationPolicy") == "IfNeeded"
                and changed_after.get(entry.uid)
            ):
                continue  # never called for the first time in a reinvocation
            called.append(entry.uid)
            if round_ == 0:
                first_round.add(entry.uid)
            changed_after[entry.uid] = False
            mutate = mutators.get(entry.configuration)
            result = mutate(copy.deepcopy(labels)) if mutate is not None else None
            if result is not None and result != labels:
                labels = result
                for uid in changed_after:
                    if uid != entry.uid:
                        changed_after[uid] = True
        if not any(changed_after.values()):
            break
    return called, labels


def called_on_update(
    configurations: Mapping[str, list[dict[str, Any]]],
    *,
    namespace: Labels,
    old: Labels,
    new: Labels,
    resource: str,
) -> list[str]:
    """The entries an UPDATE of ``resource`` calls: selectors on the old OR the new object."""
    return [
        entry.uid
        for entry in ordered(configurations)
        if rule_matches(entry.hook, operation="UPDATE", resource=resource)
        and selector_matches(entry.hook.get("namespaceSelector"), namespace)
        and (
            selector_matches(entry.hook.get("objectSelector"), old)
            or selector_matches(entry.hook.get("objectSelector"), new)
        )
    ]


# --- istioctl analyze: the webhook analyzer (IST0139) ------------------------------------


@dataclass(frozen=True)
class Message:
    """One IST0139 (InvalidWebhook, level Error) report."""

    webhook: str  # configuration/entry
    text: str


def _revisions(configuration: dict[str, Any]) -> set[str]:
    """extractRevisions: the istio.io/rev label, and istio.io/rev in any selector."""
    found: set[str] = set()
    labels = (configuration.get("metadata") or {}).get("labels") or {}
    if REV in labels:
        found.add(labels[REV])
    for hook in configuration.get("webhooks") or []:
        for key in ("namespaceSelector", "objectSelector"):
            selector = hook.get(key)
            if selector is None:
                continue
            if REV in (selector.get("matchLabels") or {}):
                found.add(selector["matchLabels"][REV])
            for expression in selector.get("matchExpressions") or []:
                if expression["key"] == REV:
                    found.update(expression.get("values") or [])
    return found


def _is_istio_webhook(configuration: dict[str, Any]) -> bool:
    return any(h["name"].endswith("istio.io") for h in configuration.get("webhooks") or [])


def _namespace_labels() -> list[Labels]:
    return [{}, {"istio-injection": "enabled"}, {"istio-injection": "disabled"}]


def _object_labels() -> list[Labels]:
    return [{}, {"sidecar.istio.io/inject": "true"}, {"sidecar.istio.io/inject": "false"}]


def analyze(
    configurations: Iterable[dict[str, Any]],
    *,
    services: Iterable[tuple[str, str]] | None,
) -> list[Message]:
    """Analyzer.Analyze over MutatingWebhookConfiguration objects; ``services``: the
    (namespace, name) of every Service (None: SkipServiceCheck)."""
    webhooks: dict[str, list[dict[str, Any]]] = {}
    revisions: set[str] = set()
    for configuration in configurations:
        revs = _revisions(configuration)
        if not revs and not _is_istio_webhook(configuration):
            continue  # neither names istio.io/rev nor has an entry ending in istio.io
        webhooks[configuration["metadata"]["name"]] = configuration.get("webhooks") or []
        revisions |= revs
    namespace_labels = _namespace_labels()
    object_labels = _object_labels()
    for rev in sorted(revisions):
        namespace_labels += [base | {REV: rev} for base in _namespace_labels()]
        object_labels += [base | {REV: rev} for base in _object_labels()]
    messages: list[Message] = []
    for ns in namespace_labels:
        for obj in object_labels:
            matches = sorted(
                f"{name}/{hook['name']}"
                for name, hooks in webhooks.items()
                for hook in hooks
                if selector_matches(hook.get("namespaceSelector"), ns)
                and selector_matches(hook.get("objectSelector"), obj)
            )
            if len(matches) > 1:
                for match in matches:
                    others = [m for m in matches if m != match]
                    messages.append(
                        Message(match, f"Webhook overlaps with others: {others}. This may cause"
                                " injection to occur twice.")
                    )  # fmt: skip
    if services is None:
        return messages
    known = set(services)
    for name, hooks in webhooks.items():
        for hook in hooks:
            service = (hook.get("clientConfig") or {}).get("service")
            if service is None:
                continue
            if (service["namespace"], service["name"]) not in known:
                messages.append(
                    Message(f"{name}/{hook['name']}", "Injector refers to a control plane service"
                            f" that does not exist: {service['namespace']}/{service['name']}.")
                )  # fmt: skip
    return messages
