"""The native L7 engine: a pod's admitted policy compiled into Envoy RBAC. Pure, deterministic.

The authz server's decision (:mod:`meshguard.authz.decision`) in Envoy's own terms, so that
the sidecar decides without a round trip:

- :func:`compile_rbac` turns the policy and mode the webhook admitted, and the source
  address of each container (``meshguard.io/status``, ``listener.sources``), into a
  DiscoveryResponse holding one ``TypedExtensionConfig`` of
  ``envoy.filters.http.rbac.v3.RBAC``: the file the sidecar's RBAC filter reads by ECDS
  (``config_discovery`` with a ``path_config_source``). One policy per rule and source
  container, named ``rules[007]/cache``; principals by ``direct_remote_ip`` (the SNAT
  source: never ``remote_ip``, which ``X-Forwarded-For`` sets), permissions by
  ``destination_port`` (the original port, restored by ``original_dst``), exact ``:method``
  (case-sensitive), ``:path`` regexes that hold the parameter rule, exact headers. Enforce
  mode is action ALLOW; audit mode is action LOG (every request passes; the matched rule,
  if any, is in the metadata, under the ``meshguard_audit_`` prefix). The shadow rules
  name the source container of every request (``shadow_effective_policy_id``) for the
  access log.
- :func:`ambiguity_rbac` is the static DENY filter in front of it, in every mode: the paths,
  method overrides and form bodies the decision refuses as ambiguous, as merged RE2
  regexes (see :func:`path_ambiguity_regexes`).

Header names with ``_`` are refused by the connection manager itself
(``headers_with_underscores_action: REJECT_REQUEST``) before any filter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from meshguard.l7 import (
    FORM_MEDIA_TYPES,
    METHOD_OVERRIDE_HEADERS,
    METHOD_PARAMETER,
    OVERRIDABLE_METHOD,
)
from meshguard.policy import ANY_CONTAINER, Action, HttpMatch, Mode, Policy, Rule

RBAC_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
EXTENSION_CONFIG_TYPE: Final = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
#: The name of the RBAC filter that reads the pod's file, and of the resource in it.
POD_FILTER_NAME: Final = "meshguard.pod_rbac"
AMBIGUITY_FILTER_NAME: Final = "meshguard.ambiguity"
#: The policy of the filter's default config (file missing at reload, empty or malformed):
#: every request denied, with this name in the response details and the access log.
NO_POLICY: Final = "meshguard-pod-policy-unavailable"
#: The ambiguity filter's policies, named as Istio names an AuthorizationPolicy's rules
#: (``ns[NAMESPACE]-policy[NAME]-rule[RULE]``) so that ``istioctl x authz check`` lists them as
#: ``ambiguity.meshguard.io`` (no namespace has a dot: no real policy has that name), and a
#: denial's details read like Istio's own (``rbac_access_denied_matched_policy[ns[...]...]``).
AMBIGUITY_POLICY: Final = "ns[meshguard.io]-policy[ambiguity]"
AMBIGUOUS_PATH: Final = f"{AMBIGUITY_POLICY}-rule[path]"
AMBIGUOUS_METHOD: Final = f"{AMBIGUITY_POLICY}-rule[method]"
#: The RE2 program size Envoy must accept (Istio's bootstrap sets this runtime key).
RE2_PROGRAM_SIZE: Final = 32768
RE2_RUNTIME_KEY: Final = "re2.max_program_size.error_level"
#: The shadow rules' stat prefix (and so of their metadata keys, as Envoy names them).
SOURCE_PREFIX: Final = "meshguard_source_"
#: The audit-mode rules' stat prefix (so ``http.*.rbac.meshguard_audit_.allowed`` counts
#: would-be allowed requests, and the metadata keys tell audit from enforce).
AUDIT_PREFIX: Final = "meshguard_audit_"
#: The default config's stat prefix: ``http.*.rbac.meshguard_pod_policy_unavailable_.denied``
#: counts the requests denied because the pod's document gave no config (Envoy joins a
#: rules prefix and the counter's name with a dot).
NO_POLICY_PREFIX: Final = "meshguard_pod_policy_unavailable_"


def policy_id(index: int, container: str) -> str:
    """The id of rule ``index`` for one source container; sorted ids keep the rules' order
    (Envoy reports the first matching policy in name order, as the decision its first rule)."""
    return f"rules[{index:03d}]/{container}"


DEFAULT_ALLOW_ID: Final = "rules[default]"  # sorts after every numbered rule


def compile_rbac(
    *, policy: Policy, mode: Mode, sources: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """The pod's ECDS document (a DiscoveryResponse) for its policy, mode and sources
    (container -> its SNAT source addresses)."""
    config: dict[str, Any] = {
        "@type": RBAC_TYPE,
        "rules": {
            "action": "ALLOW" if mode is Mode.ENFORCE else "LOG",
            "policies": _policies(policy, sources),
        },
        "shadow_rules": {"action": "ALLOW", "policies": _identities(sources)},
        "shadow_rules_stat_prefix": SOURCE_PREFIX,
    }
    if mode is Mode.AUDIT:  # its stats and metadata keys say so: the log line's audit fields
        config["rules_stat_prefix"] = AUDIT_PREFIX
    resource = {"@type": EXTENSION_CONFIG_TYPE, "name": POD_FILTER_NAME, "typed_config": config}
    return {"version_info": "1", "type_url": EXTENSION_CONFIG_TYPE, "resources": [resource]}


def rbac_document_text(document: Mapping[str, Any]) -> str:
    """The document as the pod carries it: compact JSON, keys sorted (so same policy, same
    bytes, same digest)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def rbac_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _policies(policy: Policy, sources: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    policies: dict[str, Any] = {}
    for index, rule in enumerate(policy.rules):
        permission = _permission(rule)
        if permission is None:
            continue  # no request can match it (a path with ; ? or #)
        for container in _rule_sources(rule, sources):
            policies[policy_id(index, container)] = {
                "permissions": [permission],
                "principals": [_principal(sources[container])],
            }
    if policy.default_action is Action.ALLOW and sources:
        policies[DEFAULT_ALLOW_ID] = {
            "permissions": [{"any": True}],
            "principals": [_principal([a for c in sorted(sources) for a in sources[c]])],
        }
    return policies


def _identities(sources: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """One shadow policy per container, named after it: the access log's source name."""
    return {
        container: {"permissions": [{"any": True}], "principals": [_principal(addresses)]}
        for container, addresses in sorted(sources.items())
    }


def _rule_sources(rule: Rule, sources: Mapping[str, Sequence[str]]) -> list[str]:
    if ANY_CONTAINER in rule.sources:
        return sorted(sources)
    return sorted(c for c in rule.sources if c in sources)


def _principal(addresses: Iterable[str]) -> dict[str, Any]:
    ids = [
        {
            "direct_remote_ip": {
                "address_prefix": address,
                "prefix_len": 128 if ":" in address else 32,
            }
        }
        for address in addresses
    ]
    return {"or_ids": {"ids": ids}} if ids else {"not_id": {"any": True}}


def _permission(rule: Rule) -> dict[str, Any] | None:
    ports = [{"destination_port": port} for port in rule.ports]
    rules: list[dict[str, Any]] = [_any_of(ports)]
    if rule.http is not None:
        http = _http_rules(rule.http)
        if http is None:
            return None
        rules.extend(http)
    return rules[0] if len(rules) == 1 else {"and_rules": {"rules": rules}}


def _http_rules(http: HttpMatch) -> list[dict[str, Any]] | None:
    rules: list[dict[str, Any]] = []
    if http.methods:
        rules.append(_any_of([_header(":method", exact=m) for m in http.methods]))
        rules.append({"not_rule": form_body_rule()})
    if http.paths:
        regexes = [path_regex(p) for p in http.paths]
        possible = [r for r in regexes if r is not None]
        if not possible:
            return None
        rules.append(_any_of([_header(":path", regex=r) for r in possible]))
    rules.extend(_header(name, exact=value) for name, value in sorted(http.headers.items()))
    return rules


def _any_of(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return rules[0] if len(rules) == 1 else {"or_rules": {"rules": rules}}


def _header(
    name: str,
    *,
    exact: str | None = None,
    regex: str | None = None,
    present: bool = False,
    invert: bool = False,
) -> dict[str, Any]:
    matcher: dict[str, Any] = {"name": name}
    if exact is not None:
        matcher["string_match"] = {"exact": exact}
    elif regex is not None:
        matcher["string_match"] = {"safe_regex": {"regex": regex}}
    elif present:
        matcher["present_match"] = True
    if invert:
        matcher["invert_match"] = True
    return {"header": matcher}


def path_regex(pattern: str) -> str | None:
    """The ``:path`` (with its query) a rule's path pattern matches, as a full-match RE2
    regex; None when no request can match it. The decision matches the path without its
    query both as received and with its ``;`` parameters stripped: an exact path never
    matches with a parameter, a prefix (``/api/*``) only after it — so a pattern holding
    ``;`` (or ``?``, ``#``) matches nothing."""
    literal = pattern[:-1] if pattern.endswith("*") else pattern
    if any(char in literal for char in ";?#"):
        return None
    rest = r"[^?]*" if pattern.endswith("*") else ""
    return f"(?s){re.escape(literal)}{rest}(?:\\?.*)?"


@functools.cache
def form_body_rule() -> dict[str, Any]:
    """A request whose body a framework may read as a form, where ``_method`` hides
    (:func:`meshguard.authz.decision.form_body`): a form media type in Content-Type, or a
    POST with a body (Content-Length other than 0, or Transfer-Encoding) and no
    Content-Type."""
    media = "|".join(re.escape(t) for t in FORM_MEDIA_TYPES)
    form_type = _header("content-type", regex=rf"(?is)(?:.*,)?\s*(?:{media})\s*(?:[;,].*)?")
    body = _any_of(
        [
            {
                "and_rules": {
                    "rules": [
                        _header("content-length", present=True),
                        _header("content-length", exact="0", invert=True),
                    ]
                }
            },
            _header("transfer-encoding", present=True),
        ]
    )
    bare_post = {
        "and_rules": {
            "rules": [
                _header(":method", exact=OVERRIDABLE_METHOD),
                _header("content-type", present=True, invert=True),
                body,
            ]
        }
    }
    return _any_of([form_type, bare_post])


# --- the static ambiguity filter -----------------------------------------------------------


def ambiguity_rbac() -> dict[str, Any]:
    """The static DENY filter, in every mode: ambiguous paths (:func:`path_ambiguity_regexes`)
    and method overrides (a header, a ``_method`` query parameter)."""
    bad, good = path_ambiguity_regexes()
    overrides = [_header(name, present=True) for name in METHOD_OVERRIDE_HEADERS]
    overrides.append(_header(":path", regex=method_parameter_regex()))
    return {
        "@type": RBAC_TYPE,
        "rules": {
            "action": "DENY",
            "policies": {
                AMBIGUOUS_PATH: {
                    "permissions": [
                        _header(":path", regex=bad),
                        _header(":path", regex=good, invert=True),
                    ],
                    "principals": [{"any": True}],
                },
                AMBIGUOUS_METHOD: {
                    "permissions": overrides,
                    "principals": [{"any": True}],
                },
            },
        },
    }


def default_config() -> dict[str, Any]:
    """The pod filter's config while its file gives none (missing on reload, empty,
    malformed): every request denied, naming :data:`NO_POLICY` in the response details
    and counting it under :data:`NO_POLICY_PREFIX`."""
    return {
        "@type": RBAC_TYPE,
        "rules_stat_prefix": NO_POLICY_PREFIX,
        "rules": {
            "action": "DENY",
            "policies": {
                NO_POLICY: {"permissions": [{"any": True}], "principals": [{"any": True}]}
            },
        },
    }


def method_parameter_regex() -> str:
    """A ``:path`` whose query holds the ``_method`` parameter, its name in any case and any
    percent-encoding of its characters (as PHP and Rack decode it)."""
    name = "".join(_char_forms(char) for char in METHOD_PARAMETER)
    return rf"(?s)[^?]*\?(?:.*[&;])?{name}(?:[=&;#].*)?"


def _char_forms(char: str) -> str:
    forms = {re.escape(char), re.escape(char.upper())}
    forms |= {_escaped(ord(c)) for c in {char, char.upper()}}
    return "(?:" + "|".join(sorted(forms)) + ")"


def _escaped(byte: int) -> str:
    return f"%{_hex_class(byte >> 4)}{_hex_class(byte & 0xF)}"


def _hex_class(nibble: int) -> str:
    digit = f"{nibble:X}"
    return digit if digit.isdigit() else f"[{digit}{digit.lower()}]"


@functools.cache
def path_ambiguity_regexes() -> tuple[str, str]:
    """Two full-match RE2 regexes over ``:path`` that together are
    :func:`meshguard.authz.decision.path_ambiguity`: a path is ambiguous when it matches
    ``bad`` (its segments: ``//``, a parameter on an empty segment, a name ending in a dot
    or a space) or does not match ``good`` (origin-form, no fragment, only printable ASCII,
    no backslash, well-formed escapes of no control or path syntax, valid UTF-8 of no
    character that normalization or best-fit mapping turns into syntax)."""
    ending = r"(?:\.|%20)"
    bad = "|".join(
        [
            r"[^?]*//.*",  # an empty segment before another
            r"[^?]*/;.*",  # a parameter on an empty segment
            rf"[^?]*/[^/;?]*{ending}(?:[;/?].*)?",  # a name ending in . or space
        ]
    )
    raw = _class(c for c in range(0x21, 0x7F) if chr(c) not in "%\\#?")
    ascii_escapes = _byte_escapes([b for b in range(0x20, 0x7F) if chr(b) not in ".\\/;?#%"])
    token = f"(?:{raw}|{ascii_escapes}|{_utf8_escapes(_good_code_points())})"
    good = f"(?s)/{token}*(?:\\?[^#]*)?"
    return f"(?s){bad}", good


def _class(codes: Iterable[int]) -> str:
    # only ASCII here: \xHH reads the same in RE2 and Python's re
    return "[" + "".join(f"\\x{lo:02x}" + (f"-\\x{hi:02x}" if hi > lo else "")
                         for lo, hi in _ranges(sorted(codes))) + "]"  # fmt: skip


def _ranges(values: Sequence[int]) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    for value in values:
        if found and found[-1][1] + 1 == value:
            found[-1] = (found[-1][0], value)
        else:
            found.append((value, value))
    return found


def _byte_escapes(bytes_: Sequence[int]) -> str:
    """``%XX`` for each byte, hex digits in either case, grouped by high nibble."""
    by_high: dict[int, list[int]] = {}
    for byte in bytes_:
        by_high.setdefault(byte >> 4, []).append(byte & 0xF)
    parts = [f"{_hex_class(high)}{_nibbles(lows)}" for high, lows in sorted(by_high.items())]
    return "%(?:" + "|".join(parts) + ")"


def _nibbles(lows: Sequence[int]) -> str:
    chars = set()
    for low in lows:
        digit = f"{low:X}"
        chars.add(digit)
        chars.add(digit.lower())
    return _class(ord(c) for c in chars)


_PATH_SYNTAX: Final = frozenset("./\\;?#%")
_LOOKALIKES: Final = frozenset("\u2215\u2044\u29f5\u29f8\u29f9\u3002\uff61\u2024\u2025\u2026")


@functools.cache
def _good_code_points() -> tuple[tuple[int, int], ...]:
    """The non-ASCII characters a path may carry percent-encoded: not a control, format,
    unassigned, private-use or space character, not a lookalike, and nothing NFKC turns
    into path syntax (the decision's ``_unicode_ambiguity``, for this Python's Unicode)."""
    good = [
        code
        for code in range(0x80, sys.maxunicode + 1)
        if not 0xD800 <= code <= 0xDFFF and _good_char(chr(code))
    ]
    return tuple(_ranges(good))


def _good_char(char: str) -> bool:
    if unicodedata.category(char)[0] in "CZ" or char in _LOOKALIKES:
        return False
    return not _PATH_SYNTAX & set(unicodedata.normalize("NFKC", char))


def _utf8_escapes(ranges: Sequence[tuple[int, int]]) -> str:
    """The percent-encoded UTF-8 of every code point in ``ranges``, as a regex: each range
    split into byte-range sequences, merged into a trie."""
    trie: dict[tuple[int, int], Any] = {}
    for low, high in ranges:
        for sequence in _utf8_sequences(low, high):
            node = trie
            for byte_range in sequence:
                node = node.setdefault(byte_range, {})
    return _trie_regex(trie)


def _trie_regex(trie: Mapping[tuple[int, int], Any]) -> str:
    # children that lead to equal subtrees share one alternative (their byte ranges merge)
    by_rest: dict[str, list[tuple[int, int]]] = {}
    for byte_range, child in sorted(trie.items()):
        rest = _trie_regex(child) if child else ""
        by_rest.setdefault(rest, []).append(byte_range)
    parts = [
        _byte_range_escapes([b for lo, hi in byte_ranges for b in range(lo, hi + 1)]) + rest
        for rest, byte_ranges in by_rest.items()
    ]
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _byte_range_escapes(bytes_: Sequence[int]) -> str:
    return _byte_escapes(bytes_)


_MAX_BY_LENGTH: Final = (0x7F, 0x7FF, 0xFFFF, 0x10FFFF)


def _utf8_sequences(low: int, high: int) -> list[list[tuple[int, int]]]:
    """Byte-range sequences whose products are exactly the UTF-8 encodings of low..high
    (the split of Rust's ``utf8-ranges``)."""
    for limit in _MAX_BY_LENGTH[:-1]:
        if low <= limit < high:
            return _utf8_sequences(low, limit) + _utf8_sequences(limit + 1, high)
    length = len(chr(low).encode())
    for i in range(1, length):
        mask = (1 << (6 * i)) - 1
        if low & ~mask != high & ~mask:
            if low & mask:
                return _utf8_sequences(low, low | mask) + _utf8_sequences((low | mask) + 1, high)
            if high & mask != mask:
                return _utf8_sequences(low, (high & ~mask) - 1) + _utf8_sequences(
                    high & ~mask, high
                )
    first, last = chr(low).encode(), chr(high).encode()
    return [[(first[i], last[i]) for i in range(length)]]
