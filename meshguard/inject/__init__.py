"""Injection: what the webhook and ``meshguard inject`` do to an Istio-injected pod.

One code path for both: :func:`meshguard.inject.transform.inject_pod` takes a pod's metadata
and spec, checks its posture, compiles its ruleset, records it on the pod and inserts the
``meshguard-init`` container right after Istio's init step.
"""
