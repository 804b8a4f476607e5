"""The authz server's metrics and decision reasons are the documented ones (docs/operator.md,
"Authz metrics"): a new reason or metric fails here until it is documented."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from meshguard.authz.decision import Reason
from meshguard.authz.metrics import AuthzMetrics
from meshguard.authz.store import StaticStore

OPERATOR_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "operator.md"


def documented_section() -> str:
    text = OPERATOR_GUIDE.read_text(encoding="utf-8")
    start = text.index("### Authz metrics")
    return text[start : text.index("\n## ", start)]


def test_every_decision_reason_is_documented():
    section = documented_section()
    missing = [reason.value for reason in Reason if f"`{reason.value}`" not in section]
    assert not missing


def test_every_meshguard_metric_is_documented():
    exposed = generate_latest(AuthzMetrics(StaticStore([])).registry).decode()
    types = re.findall(r"^# TYPE (meshguard_\w+) ", exposed, re.MULTILINE)
    # (prometheus_client adds a *_created series beside each counter and histogram)
    names = {name.removesuffix("_total") for name in types if not name.endswith("_created")}
    assert {"meshguard_authz_cache_pods", "meshguard_authz_watch_restarts"} <= names
    section = documented_section()
    missing = [n for n in names if not re.search(rf"`{n}(_total)?[{{`]", section)]
    assert not missing
