"""A throwaway PKI made with openssl for the TLS tests: a CA, a server certificate for
127.0.0.1/localhost and a client certificate it signed, and another CA with a client
certificate of its own (the stranger every TLS peer must refuse)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class Pki:
    """PEM files: ``ca`` signed ``server`` and ``client``; ``other_ca`` signed ``stranger``."""

    directory: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(cwd: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-noenc", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=cwd,
    )


def _leaf(cwd: Path, name: str, ca: str, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-noenc", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd,
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=cwd,
    )


def make_pki(cwd: Path) -> Pki:
    """The certificates and keys, as ``<name>.crt`` / ``<name>.key`` in ``cwd``."""
    _ca(cwd, "ca")
    _ca(cwd, "other_ca")
    client = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    _leaf(cwd, "server", "ca", "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _leaf(cwd, "client", "ca", client)
    _leaf(cwd, "stranger", "other_ca", client)
    return Pki(cwd)
