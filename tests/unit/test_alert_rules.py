"""The example Prometheus alert rules: valid (`promtool check rules`), each alert fires on its series and not
before (`promtool test rules`), and every pacsnode metric they use is one the node exports."""

from __future__ import annotations

import re
import subprocess

from node.metrics import Metrics
from tests.conftest import REPO, require_tool

RULES = REPO / "deploy" / "prometheus-alerts.yml"


def test_promtool_checks_and_tests_the_rules():
    promtool = require_tool("promtool")
    for args in (["check", "rules", RULES.name], ["test", "rules", "prometheus-alerts.test.yml"]):
        done = subprocess.run([promtool, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_use_only_metrics_the_node_exports():
    m = Metrics()
    m.bind(queue_depth=lambda: 0, jobs=lambda: {"dead": 1}, series=lambda: {"complete": 1},
           deliveries=lambda: {("pacs", "dead"): 1}, disk=lambda: {"/data/spool": (1, 2)},
           destination_up=lambda: {"pacs": False}, uncommitted=lambda: {"pacs": 1}, clock_skew=lambda: 0.5,
           certificate_expiry=lambda: {"node": 86400.0}, crl_next_update=lambda: {"CN=CA": 86400.0})
    m.job_ended("pneumonia", "unreported")
    m.bind_admission(lambda: {"disk_floor": True})
    exported = set(re.findall(r"^# TYPE (\w+)", m.render()[0].decode(), re.MULTILINE))
    exported |= {f"{name}_total" for name in exported}  # counters are exposed with the _total suffix
    used = set(re.findall(r"\b(pacsnode_\w+)", RULES.read_text()))
    assert used and used <= exported, used - exported
