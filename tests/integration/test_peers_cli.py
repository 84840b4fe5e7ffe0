"""`dicom-gateway peers --echo`: each configured peer checked with a C-ECHO from the
gateway's own AE title, against real dcmtk storescp processes (one that accepts, one
that refuses every association) and a port nobody listens on."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.dcmtk import StoreSCP
from tests.support.ports import free_port


def peer(ae: str, port: int, permissions: str = "") -> str:
    return f'\n[[dimse.peers]]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n{permissions}'


def test_peers_are_listed_and_echoed_from_our_ae_title(tmp_path: Path, gateway) -> None:
    with StoreSCP(tmp_path / "dest", ae_title="DEST") as dest, \
            StoreSCP(tmp_path / "refuser", ae_title="REFUSER", extra_args=["--refuse"]) as refuser:
        gone = free_port()
        gw = gateway(extra=peer("DEST", dest.port) + peer("REFUSER", refuser.port)
                     + peer("GONE", gone, 'permissions = ["store"]\n'))

        listed = gw.cli("peers")
        assert listed.returncode == 0, listed.stderr
        assert f"DEST              127.0.0.1:{dest.port}" in listed.stdout
        assert f"GONE              127.0.0.1:{gone:<5}  store" in listed.stdout

        echoed = gw.cli("peers", "--echo", "--timeout", "5", "--json")
        assert echoed.returncode == 1  # not every peer answered
        rows = {r["ae_title"]: r for r in json.loads(echoed.stdout)}
        assert rows["DEST"]["echo"]["ok"] and rows["DEST"]["echo"]["detail"].startswith("C-ECHO answered 0x0000")
        assert rows["REFUSER"]["echo"] == {"ok": False, "detail": rows["REFUSER"]["echo"]["detail"]}
        assert rows["REFUSER"]["echo"]["detail"].startswith("association rejected (permanent: ")
        assert rows["GONE"]["echo"] == {"ok": False, "detail": f"cannot connect to 127.0.0.1:{gone}: ConnectionRefusedError"}
        assert rows["GONE"]["permissions"] == ["store"]
        # The destination saw the gateway's own AE title calling, and released cleanly.
        assert "Received Echo Request" in dest.log()

        one = gw.cli("peers", "DEST", "--echo")
        assert one.returncode == 0 and "ok: C-ECHO answered 0x0000" in one.stdout and "REFUSER" not in one.stdout
        missing = gw.cli("peers", "NOPE")
        assert missing.returncode == 2 and "not in [[dimse.peers]]: NOPE" in missing.stderr
