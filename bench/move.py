"""C-MOVE throughput: the gateway (from Orthanc's DICOMweb) against Orthanc's own C-MOVE.

In one run: a synthetic CT series (512x512, 16-bit, ~512 KB each) is loaded into a
fresh Orthanc, then moved to the same dcmtk storescp (a) through the gateway, whose
upstream is that Orthanc's WADO-RS, and (b) by Orthanc itself over DIMSE. Every dcmtk
tool runs with TCP_NODELAY=1. Prints instances/s for each and the ratio; each is the
best of ``--repeat`` runs, with storescp's files removed between runs.

Run: python bench/move.py [--count 300] [--repeat 3] [--fetch-concurrency 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.daemon import Gateway  # noqa: E402
from tests.support.dcmtk import StoreSCP, movescu  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.synth import ct_series  # noqa: E402


def timed_move(port: int, called: str, keys: dict[str, str], scp: StoreSCP, count: int, wait: float = 120) -> float:
    """Seconds from the C-MOVE request until ``count`` files are at ``scp`` (at most
    ``wait`` after movescu returns)."""
    for path in scp.files():
        path.unlink()
    started = time.perf_counter()
    proc = movescu(port, called, "STORESCP", keys, timeout=600)
    scp.wait_for_files(count, timeout=wait)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or len(scp.files()) != count:
        raise SystemExit(f"{called}: move failed ({len(scp.files())} of {count} files)\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fetch-concurrency", type=int, default=8, help="the gateway's retrieve.fetch_concurrency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-move-") as tmp:
        root = Path(tmp)
        paths = ct_series(root / "series", args.count, 512, 512)
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        keys = {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": str(first.StudyInstanceUID),
            "SeriesInstanceUID": str(first.SeriesInstanceUID),
        }
        scp = StoreSCP(output_dir=root / "received").start()
        orthanc = Orthanc(workdir=root / "orthanc", modalities={"STORESCP": ("STORESCP", "127.0.0.1", scp.port)})
        gateway: Gateway | None = None
        try:
            orthanc.start()
            orthanc.upload(paths)
            gateway = Gateway(
                root / "gw",
                upstream_url=orthanc.dicomweb_url,
                extra=f'\n[[dimse.peers]]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {scp.port}\n'
                f"\n[retrieve]\nfetch_concurrency = {args.fetch_concurrency}\n",
            ).start()
            gw_times, orthanc_times = [], []
            for _ in range(args.repeat):
                gw_times.append(timed_move(gateway.port, gateway.ae_title, keys, scp, args.count))
                orthanc_times.append(timed_move(orthanc.dicom_port, orthanc.aet, keys, scp, args.count))
            gw_rate = args.count / min(gw_times)
            orthanc_rate = args.count / min(orthanc_times)
            size = paths[0].stat().st_size / 1024
            print(f"series: {args.count} instances of {size:.0f} KB, best of {args.repeat}")
            print(f"(a) gateway C-MOVE from DICOMweb: {gw_rate:8.1f} instances/s  ({min(gw_times):.2f} s)")
            print(f"(b) Orthanc native C-MOVE:        {orthanc_rate:8.1f} instances/s  ({min(orthanc_times):.2f} s)")
            print(f"ratio gateway / Orthanc: {gw_rate / orthanc_rate:.2f}")
        finally:
            if gateway is not None:
                gateway.kill()
            scp.cleanup()
            orthanc.cleanup()


if __name__ == "__main__":
    main()
