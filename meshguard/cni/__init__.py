"""Istio CNI mode: meshguard's rules installed from the node, not by a privileged init container.

A CNI plugin chained after istio-cni in the node's conflist (:mod:`meshguard.cni.plugin`,
``python -m meshguard.cni``, whose code the node agent runs in-process for the shim, see
:mod:`meshguard.cni.agent`) reads the
pod's admitted ruleset (``meshguard.io/ruleset``) from the API server and installs it into
the pod's network namespace with meshguard-init's own install code
(:mod:`meshguard.rules.install`) before any container starts; ``meshguard-validation`` in the
pod (:mod:`meshguard.cni.validate`, no capabilities) proves the rules are in place.
"""
