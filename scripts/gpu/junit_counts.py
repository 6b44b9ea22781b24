#!/usr/bin/env python3
"""One line of counts from a pytest junit xml: ``<n> passed, <n> failed, <n> errors, <n> skipped``.

python scripts/gpu/junit_counts.py pytest_junit.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def counts(path: str) -> str:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


if __name__ == "__main__":
    print(counts(sys.argv[1]))
