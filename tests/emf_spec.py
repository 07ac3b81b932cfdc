"""A checker for CloudWatch Embedded Metric Format lines, written from the EMF specification, for the tests.

Owns: ``check_line(line)`` (raises AssertionError naming the rule a line breaks, returns the parsed document) and
``metric_values(doc)``.  The rules, from the specification and the CloudWatch limits it refers to:
- the log event is one JSON object, nothing before or after it;
- ``_aws`` is an object holding ``Timestamp`` (an integer: milliseconds since the epoch) and ``CloudWatchMetrics``
  (an array of metric directives); no other member in the objects the specification defines;
- a directive has ``Namespace`` (1-255 characters of ``[A-Za-z0-9._#:/-]``, not ``AWS/``), ``Dimensions`` (an array of
  dimension sets, each an array of at most 30 dimension names) and ``Metrics`` (at most 100 metric definitions);
- every dimension name in a set is a top-level member of the document whose value is a string: a dimension value,
  ASCII without control characters, with at least one non-space character, at most 1024 characters; a dimension name
  is ASCII, 1-255 characters, not starting with ``:``;
- a metric definition has ``Name`` (1-1024 characters) and optionally ``Unit`` (one of CloudWatch's units) and
  ``StorageResolution`` (1 or 60); its target is a top-level member holding a finite number, or an array of at most
  100 finite numbers; a name is defined once per directive.

Must not: import the proxy's EMF module (a checker that shared the code under test could not catch its mistakes).
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

UNITS = {"Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
         "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
         "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
         "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None"}
_NAMESPACE = re.compile(r"[A-Za-z0-9._#:/-]{1,255}")
_YEAR_2000_MS = 946_684_800_000


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_dimension_value(name: str, value: Any) -> None:
    assert isinstance(value, str), f"dimension {name}: the value must be a string, got {value!r}"
    assert value.strip(), f"dimension {name}: the value needs a non-space character"
    assert len(value) <= 1024, f"dimension {name}: value longer than 1024 characters"
    assert all(0x20 <= ord(c) <= 0x7E for c in value), f"dimension {name}: value not printable ASCII: {value!r}"


def check_document(doc: Any) -> dict[str, Any]:
    assert isinstance(doc, dict), "the log event must be a JSON object"
    meta = doc.get("_aws")
    assert isinstance(meta, dict), "no _aws metadata object"
    assert set(meta) == {"Timestamp", "CloudWatchMetrics"}, f"_aws members: {sorted(meta)}"
    stamp = meta["Timestamp"]
    assert isinstance(stamp, int) and not isinstance(stamp, bool), "Timestamp must be an integer"
    assert _YEAR_2000_MS < stamp < (time.time() + 86400) * 1000, f"Timestamp {stamp} is not milliseconds since 1970"
    directives = meta["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives, "CloudWatchMetrics must be a non-empty array"
    for directive in directives:
        assert isinstance(directive, dict) and set(directive) == {"Namespace", "Dimensions", "Metrics"}, directive
        namespace = directive["Namespace"]
        assert isinstance(namespace, str) and _NAMESPACE.fullmatch(namespace) and not namespace.startswith("AWS/"), (
            f"bad namespace {namespace!r}")
        sets = directive["Dimensions"]
        assert isinstance(sets, list) and sets, "Dimensions must be a non-empty array of dimension sets"
        for dimension_set in sets:
            assert isinstance(dimension_set, list) and len(dimension_set) <= 30, f"dimension set {dimension_set!r}"
            assert len(set(dimension_set)) == len(dimension_set), f"repeated dimension in {dimension_set!r}"
            for name in dimension_set:
                assert isinstance(name, str) and 1 <= len(name) <= 255 and name.isascii() and \
                    not name.startswith(":"), f"bad dimension name {name!r}"
                assert name in doc, f"dimension {name} is not a top-level member"
                _check_dimension_value(name, doc[name])
        metrics = directive["Metrics"]
        assert isinstance(metrics, list) and 1 <= len(metrics) <= 100, "Metrics: 1 to 100 metric definitions"
        names = [m.get("Name") if isinstance(m, dict) else None for m in metrics]
        assert len(set(names)) == len(names), f"a metric defined twice: {names}"
        for definition in metrics:
            assert isinstance(definition, dict) and set(definition) <= {"Name", "Unit", "StorageResolution"}, definition
            name = definition.get("Name")
            assert isinstance(name, str) and 1 <= len(name) <= 1024, f"bad metric name {name!r}"
            assert definition.get("Unit", "None") in UNITS, f"{name}: unit {definition.get('Unit')!r}"
            assert definition.get("StorageResolution", 60) in (1, 60), f"{name}: storage resolution"
            assert name in doc, f"metric {name} is not a top-level member"
            value = doc[name]
            if isinstance(value, list):
                assert 1 <= len(value) <= 100 and all(map(_is_number, value)), f"{name}: bad value array"
            else:
                assert _is_number(value), f"{name}: value must be a finite number, got {value!r}"
            assert all(name not in s for s in sets), f"{name} is both a metric and a dimension"
    return doc


def check_line(line: str) -> dict[str, Any]:
    assert line.endswith("\n") and line.count("\n") == 1, "one document per line"
    doc = json.loads(line)  # raises on anything but exactly one JSON value
    return check_document(doc)


def metric_values(doc: dict[str, Any]) -> dict[str, Any]:
    """metric name -> value for every metric a document defines."""
    return {m["Name"]: doc[m["Name"]] for d in doc["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}


def dimensions(doc: dict[str, Any]) -> list[list[str]]:
    return [s for d in doc["_aws"]["CloudWatchMetrics"] for s in d["Dimensions"]]
