"""C-MOVE throughput: the gateway (from its embedded archive, and over Orthanc's
DICOMweb) against Orthanc's own C-MOVE, into a destination that is not the bound.

In one run: a synthetic CT series (512x512, 16-bit, ~512 KB each) is loaded into a
fresh Orthanc and, by C-STORE, into a gateway whose upstream is the embedded archive
(waiting until the spool has delivered every instance to it). Then the series is moved
to one dcmtk ``storescp --ignore`` (it receives every byte, with its default 16 KB
maximum PDU, and answers each C-STORE, but writes nothing) by (a) Orthanc over DIMSE,
(b) a gateway whose upstream is that Orthanc's WADO-RS, (b2) the same asked without
the StudyInstanceUID (SCUs leave it out; the gateway finds it with one series
search), (c) the embedded-archive gateway. Every dcmtk tool runs with TCP_NODELAY=1.
Each rate is the time from the C-MOVE request to its final response (movescu's
run), the median of ``--repeat`` runs taken in turn (the best is printed too); a
run counts only if it ends in Success and storescp logged every instance.

Targets (issue 11): (c)/(a) >= 1.2, (b)/(a) >= 1.0. The CPU time Orthanc and each
gateway spend per move is printed too: on a machine of two cores, (b) shares them
with Orthanc answering the series retrieval and with the destination.

Run: python bench/move.py [--count 300] [--repeat 5] [--fetch-concurrency 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
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

TARGETS = {"c": 1.2, "b": 1.0}


def timed_move(port: int, called: str, keys: dict[str, str], scp: StoreSCP, count: int) -> float:
    """Seconds from the C-MOVE request to its final response; fails unless it ended
    in Success and storescp logged ``count`` more C-STORE requests."""
    before = scp.log().count("Received Store Request")
    started = time.perf_counter()
    proc = movescu(port, called, "STORESCP", keys, extra_args=["-v"], timeout=600)
    elapsed = time.perf_counter() - started
    received = scp.log().count("Received Store Request") - before
    if proc.returncode != 0 or "Final Move Response (Success)" not in proc.stderr + proc.stdout or received != count:
        raise SystemExit(f"{called}: move failed ({received} of {count} received)\n{(proc.stdout + proc.stderr)[-2000:]}")
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_embedded(gateway: Gateway, paths: list[Path]) -> None:
    """C-STORE the series into the gateway and wait until its spool delivered every
    instance to the embedded archive."""
    proc = subprocess.run(
        ["/usr/bin/storescu", "-aet", "BENCH", "-aec", gateway.ae_title, "127.0.0.1", str(gateway.port), *map(str, paths)],
        capture_output=True, text=True, env={"TCP_NODELAY": "1"}, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"storescu into the gateway failed:\n{proc.stderr[-2000:]}")
    gateway.wait_counts(timeout=600, delivered=len(paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
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
        scp = StoreSCP(output_dir=root / "received", extra_args=["--ignore"]).start()
        orthanc = Orthanc(workdir=root / "orthanc", modalities={"STORESCP": ("STORESCP", "127.0.0.1", scp.port)})
        peer = f'\n[[dimse.peers]]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {scp.port}\n'
        retrieve = f"\n[retrieve]\nfetch_concurrency = {args.fetch_concurrency}\n"
        gateways: list[Gateway] = []
        try:
            orthanc.start()
            orthanc.upload(paths)
            web = Gateway(root / "gw-web", upstream_url=orthanc.dicomweb_url, extra=peer + retrieve).start()
            gateways.append(web)
            local = Gateway(root / "gw-local", extra=peer + retrieve).start()
            gateways.append(local)
            load_embedded(local, paths)
            without_study = {k: v for k, v in keys.items() if k != "StudyInstanceUID"}
            movers = {
                "a": (orthanc.dicom_port, orthanc.aet, keys),
                "b": (web.port, web.ae_title, keys),
                "b2": (web.port, web.ae_title, without_study),
                "c": (local.port, local.ae_title, keys),
            }
            # Whose CPU time each move costs: the two cores are shared by every process.
            pids = {"Orthanc": orthanc.pid, "gateway (b)": web.proc.pid, "gateway (c)": local.proc.pid}
            times: dict[str, list[float]] = {k: [] for k in movers}
            cpu: dict[str, dict[str, list[float]]] = {k: {name: [] for name in pids} for k in movers}
            for _ in range(args.repeat):
                for key, (port, aet, asked) in movers.items():
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    times[key].append(timed_move(port, aet, asked, scp, args.count))
                    for name, pid in pids.items():
                        cpu[key][name].append(cpu_seconds(pid) - before[name])
            rate = {k: args.count / statistics.median(v) for k, v in times.items()}
            size = paths[0].stat().st_size / 1024
            print(f"series: {args.count} instances of {size:.0f} KB into storescp --ignore, median of {args.repeat}")
            print(f"(a) Orthanc native C-MOVE:                {rate['a']:8.1f} instances/s  (best {args.count / min(times['a']):.1f})")
            print(f"(b) gateway C-MOVE over Orthanc DICOMweb: {rate['b']:8.1f} instances/s  (best {args.count / min(times['b']):.1f})")
            print(f"(b2) the same without StudyInstanceUID:   {rate['b2']:8.1f} instances/s  (best {args.count / min(times['b2']):.1f})")
            print(f"(c) gateway C-MOVE from embedded archive: {rate['c']:8.1f} instances/s  (best {args.count / min(times['c']):.1f})")
            for key in movers:
                spent = {name: statistics.median(v) * 1000 for name, v in cpu[key].items()}
                print(f"CPU per move ({key}), median: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in spent.items() if ms >= 5))
            best = {k: args.count / min(v) for k, v in times.items()}
            for key, target in TARGETS.items():
                ratio = rate[key] / rate["a"]
                verdict = "met" if ratio >= target else "MISSED"
                print(f"ratio ({key})/(a): {ratio:.2f} (best/best {best[key] / best['a']:.2f})  target >= {target:.1f}  {verdict}")
        finally:
            for gateway in gateways:
                gateway.kill()
            scp.cleanup()
            orthanc.cleanup()


if __name__ == "__main__":
    main()
