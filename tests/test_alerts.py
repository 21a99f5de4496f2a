"""The Prometheus alerting rules shipped for a node (docker/alerts.yml): valid rules by
Prometheus' own checker, firing as their promtool unit tests (tests/alerts_test.yml) say, and
naming only metrics the node exports and the admin guide describes."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "docker" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(not PROMTOOL, reason="promtool (Debian's prometheus "
                                    "package, which .ci/run installs) is not installed")


@needs_promtool
def test_the_rules_are_valid_and_fire_as_tested(tmp_path):
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 12 rules found" in check.stdout
    shutil.copy(RULES, tmp_path / "alerts.yml")
    shutil.copy(REPO / "tests" / "alerts_test.yml", tmp_path / "alerts_test.yml")
    run = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_rules_name_metrics_the_node_exports():
    """A misspelt metric would make an alert that never fires."""
    names = set(re.findall(r"\bvoxarc_[a-z0-9_]+", RULES.read_text()))
    assert len(names) >= 9
    guide = (REPO / "docs" / "admin.md").read_text()
    sources = "".join(p.read_text() for p in (REPO / "service").glob("*.py"))
    for name in names:
        base = re.sub(r"_total$", "", name)
        assert f'"{base}"' in sources, name              # a metric family the code makes
        assert name in guide, name                         # and the admin guide describes
