"""C-MOVE throughput from AWS HealthImaging (its emulator): the DICOMweb instance path
against the metadata-plus-frames path, with Orthanc behind the gateway for scale.

In one run: a synthetic CT series (256x256, 16-bit, by default) is loaded into the
HealthImaging emulator (default quotas: GetDICOMInstance 50/s, GetImageFrame 1000/s,
stored as HTJ2K as the service does) and into a fresh Orthanc, then moved to the same
dcmtk storescp through the gateway (a) with ``retrieve_path = "dicomweb"``
(GetDICOMInstance per instance), (b) with ``retrieve_path = "frames"``
(GetImageSetMetadata once, GetImageFrame per frame), (c) with Orthanc's WADO-RS as its
upstream. The emulator runs in this process, in Python: its own cost (SigV4
verification, HTJ2K and JSON work) is part of what is measured. Prints instances/s of
each (best of ``--repeat``, storescp's files removed between runs) and the ratios.

Run: python bench/healthimaging.py [--count 300] [--repeat 2] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # botocore (here and in the gateways) asks nothing of the network

from tests.support.daemon import Gateway
from tests.support.dcmtk import StoreSCP
from tests.support.healthimaging import Emulator
from tests.support.orthanc import Orthanc
from bench.move import timed_move  # noqa: E402
from tests.support.synth import ct_series


def healthimaging_gateway(root: Path, emulator: Emulator, retrieve_path: str, peers: str) -> Gateway:
    key, secret = emulator.add_key()
    upstream = (
        f'type = "healthimaging"\nregion = "{emulator.region}"\ndatastore_id = "{emulator.datastore.id}"\n'
        f'dicomweb_endpoint_url = "{emulator.dicomweb_url}"\nruntime_endpoint_url = "{emulator.runtime_url}"\n'
        f'timeout = 60\nretrieve_path = "{retrieve_path}"\n'
    )
    env = {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(root / "absent-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "absent-aws-credentials"),
    }
    return Gateway(root / f"gw-{retrieve_path}", upstream=upstream, env=env, extra=peers).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each instance")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-healthimaging-") as tmp:
        root = Path(tmp)
        paths = ct_series(root / "series", args.count, args.size, args.size)
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        keys = {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": str(first.StudyInstanceUID),
            "SeriesInstanceUID": str(first.SeriesInstanceUID),
        }
        scp = StoreSCP(output_dir=root / "received").start()
        peers = f'\n[[dimse.peers]]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {scp.port}\n'
        emulator = Emulator().start()
        orthanc = Orthanc(workdir=root / "orthanc", modalities={"STORESCP": ("STORESCP", "127.0.0.1", scp.port)})
        gateways: list[Gateway] = []
        try:
            emulator.load(p.read_bytes() for p in paths)
            orthanc.start()
            orthanc.upload(paths)
            by_path = {name: healthimaging_gateway(root, emulator, name, peers) for name in ("dicomweb", "frames")}
            gateways += by_path.values()
            gateways.append(Gateway(root / "gw-orthanc", upstream_url=orthanc.dicomweb_url, extra=peers).start())
            times: dict[str, list[float]] = {"dicomweb": [], "frames": [], "orthanc": []}
            for _ in range(args.repeat):
                for name, gw in (*by_path.items(), ("orthanc", gateways[2])):
                    times[name].append(timed_move(gw.port, gw.ae_title, keys, scp, args.count, wait=300))
            rates = {name: args.count / min(t) for name, t in times.items()}
            throttled = sum(emulator.throttle.refused.values())
            print(f"series: {args.count} instances of {args.size}x{args.size} 16-bit, {paths[0].stat().st_size / 1024:.0f} KB each, best of {args.repeat}")
            print(f"(a) HealthImaging, DICOMweb instance path:   {rates['dicomweb']:8.1f} instances/s  ({min(times['dicomweb']):.2f} s)")
            print(f"(b) HealthImaging, metadata + frames path:   {rates['frames']:8.1f} instances/s  ({min(times['frames']):.2f} s)")
            print(f"(c) Orthanc DICOMweb through the gateway:    {rates['orthanc']:8.1f} instances/s  ({min(times['orthanc']):.2f} s)")
            print(f"ratio frames / dicomweb: {rates['frames'] / rates['dicomweb']:.2f}")
            print(f"ratio frames / orthanc:  {rates['frames'] / rates['orthanc']:.2f}; dicomweb / orthanc: {rates['dicomweb'] / rates['orthanc']:.2f}")
            print(f"emulator throttled requests (429): {throttled}")
        finally:
            for gw in gateways:
                gw.kill()
            scp.cleanup()
            orthanc.cleanup()
            emulator.stop()


if __name__ == "__main__":
    main()
