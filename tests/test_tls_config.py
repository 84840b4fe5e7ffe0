"""``[dimse.tls]`` and ``[http.tls]``: required keys, keys each table does not have, and
certificate paths resolved against the config file's directory."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config


def _problems(data: dict) -> list[str]:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_keys_are_checked_per_table() -> None:
    assert _problems({"dimse": {"tls": {"certificate": "a.crt"}}}) == [
        "dimse.tls.port: required", "dimse.tls.private_key: required",
    ]
    assert _problems({"dimse": {"port": 2762, "tls": {"port": 2762, "certificate": "a", "private_key": "b"}}}) == [
        "dimse.tls.port: 2762 is dimse.port already; TLS needs a port of its own",
    ]
    http = {"certificate": "a", "private_key": "b", "port": 8443, "ca_certificates": "c"}
    assert _problems({"http": {"tls": http}}) == ["http.tls.ca_certificates: unknown key", "http.tls.port: unknown key"]


def test_relative_files_resolve_against_the_config_file_and_make_a_tls12_context(tmp_path: Path) -> None:
    subprocess.run(
        ["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-noenc", "-days", "1", "-subj", "/CN=t",
         "-keyout", "server.key", "-out", "server.crt"],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )
    (tmp_path / "gateway.toml").write_text(
        '[dimse.tls]\nport = 2762\ncertificate = "server.crt"\nprivate_key = "server.key"\n'
        'ca_certificates = "server.crt"\n[http.tls]\ncertificate = "server.crt"\nprivate_key = "server.key"\n'
    )
    config = load_config(tmp_path / "gateway.toml")
    assert config.dimse.tls is not None and config.http.tls is not None
    assert config.dimse.tls.certificate == tmp_path / "server.crt"
    assert config.dimse.tls.ca_certificates == tmp_path / "server.crt"
    assert config.http.tls.private_key == tmp_path / "server.key"
    dimse = config.dimse.tls.server_context()
    assert dimse.minimum_version == ssl.TLSVersion.TLSv1_2 and dimse.verify_mode == ssl.CERT_REQUIRED
    assert config.http.tls.server_context().verify_mode == ssl.CERT_NONE


def test_a_key_that_is_not_the_certificates_is_named(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("not a certificate\n")
    (tmp_path / "server.key").write_text("not a key\n")
    (tmp_path / "gateway.toml").write_text('[http.tls]\ncertificate = "server.crt"\nprivate_key = "server.key"\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "gateway.toml")
    assert info.value.problems[0].startswith("http.tls.certificate, http.tls.private_key: not a PEM certificate")
