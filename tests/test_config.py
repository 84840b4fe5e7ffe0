"""Config validation: every problem is reported with the key that has it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]

ISSUE_EXAMPLE = """
[dimse]
ae_title = "DICOMGW"
host = "0.0.0.0"
port = 11112

[[dimse.peers]]
ae_title = "STORESCP"
host = "127.0.0.1"
port = 11113

[spool]
directory = "/var/lib/dicom-gateway"

[upstream]
type = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"
[upstream.auth]
type = "none"

[http]
host = "127.0.0.1"
port = 8080
"""

HEALTHIMAGING = {"type": "healthimaging", "region": "us-east-1", "datastore_id": "d9a2a515ab294163a2d2f4069eed584c"}
OAUTH2 = {"type": "oauth2", "token_url": "https://login.example/tenant/token", "client_id": "gw", "client_secret": "s"}


def test_issue_example_loads_as_written(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(ISSUE_EXAMPLE)
    cfg = load_config(path)
    assert cfg.dimse.ae_title == "DICOMGW" and cfg.dimse.port == 11112
    assert cfg.peer("STORESCP").port == 11113  # type: ignore[union-attr]
    assert cfg.upstream.type == "dicomweb" and cfg.upstream.url.endswith("/dicom-web")
    assert cfg.spool.directory == Path("/var/lib/dicom-gateway")
    assert cfg.http.port == 8080


def test_shipped_default_is_valid_and_local() -> None:
    cfg = load_config(REPO / "config" / "gateway.toml")
    assert cfg.upstream.type == "local"
    assert cfg.spool.directory.is_absolute()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ({"dimse": {"port": 70000}}, "dimse.port: expected an integer from 1 to 65535"),
        ({"dimse": {"port": "11112"}}, "dimse.port"),
        ({"dimse": {"ae_title": "WAY_TOO_LONG_AE_TITLE"}}, "dimse.ae_title"),
        ({"dimse": {"ack": "sometimes"}}, "dimse.ack: 'sometimes' is not one of"),
        ({"dimse": {"peers": [{"ae_title": "X", "host": "h"}]}}, "dimse.peers[0].port: required"),
        (
            {"dimse": {"peers": [{"ae_title": "X", "host": "h", "port": 1, "permissions": ["fly"]}]}},
            "dimse.peers[0].permissions: unknown ['fly']",
        ),
        ({"upstream": {"type": "dicomweb"}}, "upstream.url"),
        ({"upstream": {"type": "s3"}}, "upstream.type"),
        ({"upstream": {"auth": {"type": "basic", "username": "u"}}}, "upstream.auth.password: required"),
        ({"upstream": {"auth": {"type": "oauth2", "client_id": "c", "client_secret": "s"}}}, "upstream.auth.token_url: required when upstream.auth.type = 'oauth2'"),
        ({"upstream": {"auth": {"type": "oauth2", "token_url": "https://idp/token", "client_id": "c"}}}, "upstream.auth.client_secret: required"),
        ({"upstream": {"auth": {**OAUTH2, "token_url": "login.example/token"}}}, "upstream.auth.token_url: 'login.example/token' is not an http(s) URL"),
        ({"upstream": {"auth": {**OAUTH2, "client_auth": "jwt"}}}, "upstream.auth.client_auth: 'jwt' is not one of 'basic', 'post'"),
        ({"upstream": {"auth": {**OAUTH2, "params": {"scope": "x"}}}}, "upstream.auth.params.scope: set by the gateway"),
        ({"upstream": {"auth": {**OAUTH2, "params": {"resource": 3}}}}, "upstream.auth.params.resource: expected a string"),
        ({"upstream": {"auth": {"type": "bearer", "token": "t", "client_id": "c"}}}, "upstream.auth.client_id: only used with upstream.auth.type = 'oauth2' or 'azure_managed_identity'"),
        ({"upstream": {"auth": {**OAUTH2, "service_account_file": "sa.json"}}}, "upstream.auth.service_account_file: only used with upstream.auth.type = 'google'"),
        ({"upstream": {"auth": {**OAUTH2, "resource": "https://r"}}}, "upstream.auth.resource: only used with upstream.auth.type = 'azure_managed_identity'"),
        ({"upstream": {"auth": {"type": "azure_managed_identity", "client_secret": "s"}}}, "upstream.auth.client_secret: only used with upstream.auth.type = 'oauth2'"),
        ({"spool": {"concurency": 4}}, "spool.concurency: unknown key"),
        ({"dimse": {"user_identity": {"required": True}}}, "dimse.user_identity.required: no identity could ever be accepted"),
        ({"dimse": {"user_identity": {"jwt": True}}}, "dimse.user_identity.jwt: needs [http.auth.oidc]"),
        ({"dimse": {"user_identity": {"users": {"tech1": ""}}}}, "dimse.user_identity.users.tech1: expected a passcode"),
        ({"dimse": {"user_identity": {"users": ["tech1"]}}}, "dimse.user_identity.users: expected a table of user = passcode"),
        ({"dimse": {"user_identity": {"users": {"a": "b"}, "permissions": {"a": ["fly"]}}}}, "dimse.user_identity.permissions.a: expected a list of find, get, move, store"),
        (
            {"dimse": {"peers": [{"ae_title": "WS1", "host": "127.0.0.1", "port": 104, "require_user_identity": True}]}},
            "dimse.peers[0].require_user_identity: needs [dimse.user_identity] users or jwt = true",
        ),
        ({"upstream": {"auth": {"type": "bearer", "token": "env:DICOMGW_TEST_UNSET"}}}, "DICOMGW_TEST_UNSET is not set"),
        ({"upstream": {"type": "healthimaging", "datastore_id": "d9a2a515ab294163a2d2f4069eed584c"}}, "upstream.region: required"),
        ({"upstream": {"type": "healthimaging", "region": "us-east-1"}}, "upstream.datastore_id: required"),
        ({"upstream": {**HEALTHIMAGING, "region": "US East"}}, "upstream.region: 'US East' is not an AWS region"),
        ({"upstream": {**HEALTHIMAGING, "datastore_id": "D9A2"}}, "upstream.datastore_id: 'D9A2' is not"),
        ({"upstream": {**HEALTHIMAGING, "dicomweb_endpoint_url": "dicom.local"}}, "upstream.dicomweb_endpoint_url: 'dicom.local' is not an http(s) URL"),
        ({"upstream": {**HEALTHIMAGING, "runtime_endpoint_url": "ftp://x"}}, "upstream.runtime_endpoint_url"),
        ({"upstream": {**HEALTHIMAGING, "url": "http://x/dicom-web"}}, "upstream.url: not used with upstream.type = 'healthimaging'"),
        ({"upstream": {**HEALTHIMAGING, "auth": {"type": "bearer", "token": "t"}}}, "upstream.auth: not used with upstream.type = 'healthimaging'"),
        ({"upstream": {"type": "dicomweb", "url": "http://x", "region": "us-east-1"}}, "upstream.region: only used with upstream.type = 'healthimaging'"),
        ({"upstream": {**HEALTHIMAGING, "rate_limits": {"GetDICOMInstanse": 10}}}, "upstream.rate_limits.GetDICOMInstanse: unknown key"),
        ({"upstream": {**HEALTHIMAGING, "rate_limits": {"GetImageFrame": 0}}}, "upstream.rate_limits.GetImageFrame: expected a number"),
        ({"upstream": {**HEALTHIMAGING, "retrieve_path": "wado"}}, "upstream.retrieve_path: 'wado' is not one of 'dicomweb', 'frames'"),
        ({"upstream": {"type": "dicomweb", "url": "http://x", "include_non_primary": True}}, "upstream.include_non_primary: only used with upstream.type = 'healthimaging'"),
        ({"dimse": {"max_associations": 32, "max_connections": 32}}, "dimse.max_connections: 32 leaves no room beyond dimse.max_associations (32)"),
        ({"http": {"max_connections": 0}}, "http.max_connections"),
        ({"upstream": {"type": "dicomweb", "url": "http://x", "max_answer_mb": 0}}, "upstream.max_answer_mb: expected an integer from 1"),
    ],
)
def test_errors_name_the_key(toml: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(toml)
    assert message in str(info.value)


def test_healthimaging_example_of_the_issue_loads_with_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        '[upstream]\ntype = "healthimaging"\nregion = "eu-west-1"\ndatastore_id = "d9a2a515ab294163a2d2f4069eed584c"\n'
        'profile = "imaging"\n[upstream.rate_limits]\nGetDICOMInstance = 20\n'
    )
    up = load_config(path).upstream
    assert (up.type, up.region, up.datastore_id, up.profile) == ("healthimaging", "eu-west-1", "d9a2a515ab294163a2d2f4069eed584c", "imaging")
    assert up.dicomweb_endpoint_url == "https://dicom-medical-imaging.eu-west-1.amazonaws.com"
    assert up.runtime_endpoint_url == "https://runtime-medical-imaging.eu-west-1.amazonaws.com"
    assert up.rate_limits["GetDICOMInstance"] == 20 and up.rate_limits["GetImageFrame"] == 1000
    assert up.rate_limits["SearchImageSets"] == 25 and up.rate_limits["GetImageSetMetadata"] == 50
    assert (up.retrieve_path, up.include_non_primary) == ("frames", False)
    local = parse_config({"upstream": {**HEALTHIMAGING, "dicomweb_endpoint_url": "http://127.0.0.1:9/", "runtime_endpoint_url": "http://127.0.0.1:8"}}).upstream
    assert (local.dicomweb_endpoint_url, local.runtime_endpoint_url) == ("http://127.0.0.1:9", "http://127.0.0.1:8")


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"dimse": {"port": 0, "ack": "x"}, "http": {"port": -1}})
    assert len(info.value.problems) == 3


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TOKEN", "s3cret")
    cfg = parse_config({"upstream": {"auth": {"type": "bearer", "token": "env:GW_TOKEN"}}})
    assert cfg.upstream.auth.token == "s3cret"


def test_google_service_account_file_is_resolved_and_checked_at_load(tmp_path: Path) -> None:
    from tests.support.googleidp import GoogleIdp

    idp = GoogleIdp(audience="https://archive.example")
    idp.service_account_file(tmp_path / "sa.json")
    config = tmp_path / "g.toml"
    config.write_text('[upstream]\ntype = "dicomweb"\nurl = "https://healthcare.googleapis.com/v1/x/dicomWeb"\n'
                      '[upstream.auth]\ntype = "google"\nservice_account_file = "sa.json"\n')
    assert load_config(config).upstream.auth.service_account_file == str(tmp_path / "sa.json")
    (tmp_path / "sa.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"upstream.auth.service_account_file: not a service account key"):
        load_config(config)
    (tmp_path / "sa.json").unlink()
    with pytest.raises(ConfigError, match=r"upstream.auth.service_account_file: cannot read .*sa.json"):
        load_config(config)
    config.write_text('[upstream]\ntype = "dicomweb"\nurl = "https://h/dicomWeb"\n[upstream.auth]\ntype = "google"\n')
    assert load_config(config).upstream.auth.service_account_file == ""  # Google's default chain


def test_oidc_tokens_are_credentials_of_a_facade_off_loopback() -> None:
    oidc = {"issuer": "https://sso.example/realms/hospital/", "audience": ["dicom-gateway", "ohif"], "required_scopes": ["dicom.read"]}
    auth = parse_config({"http": {"host": "0.0.0.0", "auth": {"oidc": oidc}}}).http.auth
    assert auth.oidc is not None and not auth.open
    assert auth.oidc.issuer == "https://sso.example/realms/hospital" and auth.oidc.audience == ("dicom-gateway", "ohif")
    with pytest.raises(ConfigError) as info:
        parse_config({"http": {"auth": {"oidc": {"issuer": "sso.example"}}}})
    assert "http.auth.oidc.issuer: required" in str(info.value) and "http.auth.oidc.audience: required" in str(info.value)


def test_oauth2_client_credentials_load_with_the_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_CLIENT_SECRET", "s3cret")
    auth = parse_config({"upstream": {"auth": {
        **OAUTH2, "client_secret": "env:GW_CLIENT_SECRET", "scope": "https://dicom.healthcareapis.azure.com/.default",
        "client_auth": "post", "params": {"resource": "r", "audience": "a"},
    }}}).upstream.auth
    assert (auth.type, auth.client_secret, auth.client_auth) == ("oauth2", "s3cret", "post")
    assert auth.scope == "https://dicom.healthcareapis.azure.com/.default"
    assert auth.params == (("audience", "a"), ("resource", "r"))
    assert parse_config({"upstream": {"auth": OAUTH2}}).upstream.auth.client_auth == "basic"  # RFC 6749 2.3.1


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(ISSUE_EXAMPLE)
    assert _check(good).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[dimse]\nport = "eleven"\n[upstream]\ntype = "dicomweb"\n')
    result = _check(bad)
    assert result.returncode != 0
    assert "dimse.port" in result.stderr and "upstream.url" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[dimse\n")
    result = _check(broken)
    assert result.returncode != 0 and "invalid TOML" in result.stderr
    result = _check(tmp_path / "missing.toml")
    assert result.returncode != 0 and "file not found" in result.stderr
    incomplete = tmp_path / "healthimaging.toml"
    incomplete.write_text('[upstream]\ntype = "healthimaging"\n')
    result = _check(incomplete)
    assert result.returncode != 0
    assert "upstream.region: required" in result.stderr and "upstream.datastore_id: required" in result.stderr


def test_run_refuses_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[spool]\nmax_attempts = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode != 0 and "spool.max_attempts" in result.stderr


HTTP_ISSUE_EXAMPLE = """
[http]
host = "127.0.0.1"
port = 8080
base_path = "/dicom-web"
cors_origins = ["*"]
[http.auth]
bearer_tokens = ["env:GW_TOKEN"]
api_key_header = "apikey"
api_keys = ["env:GW_APIKEY"]
basic_users = { viewer = "env:GW_VIEWER_PASSWORD" }
"""


def test_http_facade_keys_load_as_the_issue_writes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TOKEN", "t0k")
    monkeypatch.setenv("GW_APIKEY", "k3y")
    monkeypatch.setenv("GW_VIEWER_PASSWORD", "pw")
    path = tmp_path / "g.toml"
    path.write_text(HTTP_ISSUE_EXAMPLE)
    http = load_config(path).http
    assert http.base_path == "/dicom-web" and http.cors_origins == ("*",)
    assert http.auth.bearer_tokens == ("t0k",) and http.auth.api_keys == ("k3y",)
    assert http.auth.basic_users == (("viewer", "pw"),) and http.auth.api_key_header == "apikey"


def test_an_open_facade_must_listen_on_loopback_or_say_so() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"http": {"host": "0.0.0.0"}})
    assert "http.auth" in str(info.value) and "allow_anonymous" in str(info.value)
    assert parse_config({"http": {"host": "0.0.0.0", "auth": {"allow_anonymous": True}}}).http.auth.open
    assert not parse_config({"http": {"host": "0.0.0.0", "auth": {"bearer_tokens": ["x"]}}}).http.auth.open
    with pytest.raises(ConfigError) as info:
        parse_config({"http": {"auth": {"bearer_tokens": ["env:GW_SURELY_UNSET"], "tokens": []}}})
    assert "GW_SURELY_UNSET" in str(info.value) and "http.auth.tokens: unknown key" in str(info.value)


def test_routes_name_a_peer_and_what_they_take() -> None:
    peers = [{"ae_title": "AI", "host": "127.0.0.1", "port": 104}]
    cfg = parse_config({"dimse": {"peers": peers, "routes": [
        {"destination": "AI", "calling_ae": ["CT01 ", "CT02"], "sop_classes": ["CTImageStorage", "1.2.840.10008.5.1.4.1.1.4"]},
        {"destination": "AI"},
        {"destination": "AI", "modalities": ["MR", "CT"]},
        {"destination": "AI", "called_ae": ["GW_AI "]},
    ]}})
    first, anything, by_modality, by_called = cfg.dimse.routes
    assert by_modality.matches("X", "GW", "1.2.3", "MR") and not by_modality.matches("X", "GW", "1.2.3", "US")
    assert not by_modality.matches("X", "GW", "1.2.3", "")
    assert by_called.matches("X", "GW_AI", "1.2.3") and not by_called.matches("X", "DICOMGW", "1.2.3")
    assert not by_called.matches("STOW-RS 127.0.0.1", "", "1.2.3")
    assert cfg.dimse.own_ae_titles == {"DICOMGW", "GW_AI"}
    assert first.calling_ae == {"CT01", "CT02"}
    assert first.sop_classes == {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"}
    assert first.matches("CT01", "GW", "1.2.840.10008.5.1.4.1.1.2") and not first.matches("MR01", "GW", "1.2.840.10008.5.1.4.1.1.2")
    assert not first.matches("CT01", "GW", "1.2.840.10008.5.1.4.1.1.7")
    assert anything.matches("STOW-RS 127.0.0.1", "", "1.2.3")
    with pytest.raises(ConfigError) as exc:
        parse_config({"dimse": {"peers": peers, "routes": [
            {"destination": "NOPE", "sop_classes": ["ExplicitVRLittleEndian", "CTImageStorage"], "modality": "CT"},
            {"calling_ae": ["BAD\\AE"], "modalities": ["ct"], "called_ae": ["WAY_TOO_LONG_AE_TITLE"]},
        ]}})
    assert exc.value.problems == [
        "dimse.routes[0].destination: 'NOPE' is not a [[dimse.peers]] AE title (its host and port are where copies go)",
        "dimse.routes[0].sop_classes: 'ExplicitVRLittleEndian' is neither a UID nor a SOP class keyword",
        "dimse.routes[0].modality: unknown key",
        "dimse.routes[1].destination: required",
        "dimse.routes[1].calling_ae: 'BAD\\\\AE' is not a valid AE title",
        "dimse.routes[1].called_ae: 'WAY_TOO_LONG_AE_TITLE' is not a valid AE title",
        "dimse.routes[1].modalities: 'ct' is not a Modality code (CS: CT, MR, US...)",
    ]


def test_the_audit_trail_names_a_repository_and_a_writable_file(tmp_path: Path) -> None:
    assert not parse_config({}).audit.enabled
    cfg = parse_config({"audit": {"syslog": "tls://arr.example.org:6514", "source_id": "GW1", "enterprise_site_id": "RAD"}})
    assert cfg.audit.enabled and cfg.audit.file is None and cfg.audit.source_id == "GW1"
    with pytest.raises(ConfigError) as exc:
        parse_config({"audit": {"syslog": "https://arr:443", "facility": 10}})
    assert exc.value.problems == [
        "audit.syslog: 'https://arr:443' is not udp://, tcp:// or tls:// with a host and port",
        "audit.facility: unknown key",
    ]
    config = tmp_path / "gateway.toml"
    config.write_text('[audit]\nfile = "logs/audit.log"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(config)
    assert exc.value.problems == [f"audit.file: cannot write in {tmp_path / 'logs'} (missing, or not writable by this user)"]
    (tmp_path / "logs").mkdir()
    assert load_config(config).audit.file == tmp_path / "logs" / "audit.log"


def test_check_config_names_every_ae_title_the_gateway_answers_to(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[dimse]\nae_title = "GW"\n[[dimse.peers]]\nae_title = "AI"\nhost = "127.0.0.1"\nport = 104\n'
        '[[dimse.routes]]\ndestination = "AI"\ncalled_ae = ["GW_B", "GW_AI"]\n'
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n'
    )
    result = _check(path)
    assert result.returncode == 0 and "OK (AE GW, GW_AI, GW_B on port 11112" in result.stdout, result.stdout + result.stderr


def test_a_peer_names_the_transfer_syntaxes_it_is_sent_in() -> None:
    peer = {"ae_title": "WAN", "host": "127.0.0.1", "port": 104}
    cfg = parse_config({"dimse": {"peers": [{**peer, "transfer_syntaxes": ["JPEG2000Lossless", "1.2.840.10008.1.2.1"]}]}})
    assert cfg.dimse.peers[0].transfer_syntaxes == ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1")
    with pytest.raises(ConfigError) as exc:
        parse_config({"dimse": {"peers": [{**peer, "transfer_syntaxes": ["JPEGLosslessSV1", "JPEGBaseline8Bit"]}]}})
    assert exc.value.problems == [
        "dimse.peers[0].transfer_syntaxes: 'JPEGLosslessSV1' is not a transfer syntax the gateway can write",
        "dimse.peers[0].transfer_syntaxes: 1.2.840.10008.1.2.4.50 would lose pixel data; it needs retrieve.allow_lossy = true",
    ]
    lossy = {"dimse": {"peers": [{**peer, "transfer_syntaxes": ["JPEGBaseline8Bit"]}]}, "retrieve": {"allow_lossy": True}}
    assert parse_config(lossy).dimse.peers[0].transfer_syntaxes == ("1.2.840.10008.1.2.4.50",)
