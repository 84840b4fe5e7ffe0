"""The open-file limit raised at start to cover both listeners' caps."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, resource, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stdout)
from gateway.connection_cap import ensure_open_files
ensure_open_files(1280)
print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _run_under(soft: int, hard: int) -> str:
    result = subprocess.run(
        ["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return result.stdout


def test_the_soft_limit_is_raised_to_cover_the_caps_and_the_reserve() -> None:
    assert _run_under(1024, 8192).splitlines() == ["soft 1536"]


def test_a_hard_limit_too_low_is_taken_whole_and_reported() -> None:
    lines = _run_under(256, 1024).splitlines()
    assert lines[-1] == "soft 1024"
    assert lines[0].startswith("WARNING the open-file limit (1024) is below the 1536"), lines
