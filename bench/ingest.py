"""Ingest benchmark: C-STORE throughput of the gateway against dcmtk and Orthanc, same run.

    python bench/ingest.py [--count 200] [--rounds 3] [--skip-large]

Passes, each with a fresh 200-instance 512x512 16-bit CT series (fresh UIDs, so no
archive deduplicates), sent by dcmtk's storescu with TCP_NODELAY=1:
  a) to dcmtk's storescp --ignore (the network ceiling),
  b) to the gateway, until storescu finishes (acknowledged = spooled durably),
  c) the same send, until every instance is delivered to Orthanc over STOW-RS,
  d) straight to Orthanc's own DIMSE port.
Ratios b/a and c/d are what we track (absolute rates drift on shared machines).
Then the gateway's peak RSS while receiving one ~500 MB multi-frame instance.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daemon import Gateway  # noqa: E402
from tests.support.dcmtk import dcmtk_env  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.ports import free_port, wait_for_port, wait_until  # noqa: E402
from tests.support.synth import ct_series  # noqa: E402


def storescu(port: int, called: str, files: list[Path]) -> float:
    """Send the files in one association; return seconds taken."""
    started = time.perf_counter()
    subprocess.run(
        ["/usr/bin/storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        check=True,
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="skip the 500 MB RSS pass")
    args = parser.parse_args()
    n = args.count

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    scp_port = free_port()
    scp = subprocess.Popen(
        ["/usr/bin/storescp", "--ignore", "-aet", "SINK", str(scp_port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    orthanc = Orthanc(workdir=work / "orthanc").start()
    gw = Gateway(work / "gw", upstream_url=orthanc.dicomweb_url).start()
    wait_for_port("127.0.0.1", scp_port, 10)
    rates: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
    try:
        for r in range(args.rounds):
            series = {k: ct_series(work / f"r{r}{k}", n) for k in ("a", "b", "d")}
            rates["a"].append(n / storescu(scp_port, "SINK", series["a"]))

            before = gw.counts()["delivered"]
            started = time.perf_counter()
            ack = storescu(gw.port, gw.ae_title, series["b"])
            wait_until(lambda: gw.counts()["delivered"] >= before + n, 600, 0.02, "not delivered")
            delivered = time.perf_counter() - started
            rates["b"].append(n / ack)
            rates["c"].append(n / delivered)

            rates["d"].append(n / storescu(orthanc.dicom_port, orthanc.aet, series["d"]))
            print(
                f"round {r + 1}: a {rates['a'][-1]:.0f}/s  b {rates['b'][-1]:.0f}/s  "
                f"c {rates['c'][-1]:.0f}/s  d {rates['d'][-1]:.0f}/s",
                flush=True,
            )
    finally:
        gw.stop()
        scp.terminate()
        scp.wait()

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\ningest of {n} x 512x512 16-bit CT (~512 KB each), median of {args.rounds} rounds")
    print(f"  a) dcmtk storescp --ignore       {med['a']:8.0f} instances/s")
    print(f"  b) gateway, acknowledged         {med['b']:8.0f} instances/s   b/a = {med['b'] / med['a']:.2f} (target >= 0.40)")
    print(f"  c) gateway, delivered to Orthanc {med['c']:8.0f} instances/s")
    print(f"  d) Orthanc's own DIMSE port      {med['d']:8.0f} instances/s   c/d = {med['c'] / med['d']:.2f} (target >= 1.00)")

    if not args.skip_large:
        big = ct_series(work / "big", 1, frames=1000)[0]
        fresh = Gateway(work / "gw-large", upstream_url=orthanc.dicomweb_url).start()
        try:
            assert fresh.proc is not None
            seconds = storescu(fresh.port, fresh.ae_title, [big])
            rss = peak_rss_mb(fresh.proc.pid)
            fresh.wait_counts(delivered=1, timeout=600)
            rss = max(rss, peak_rss_mb(fresh.proc.pid))
        finally:
            fresh.stop()
        size = big.stat().st_size / 2**20
        print(f"  one {size:.0f} MiB multi-frame instance: acknowledged in {seconds:.1f} s, "
              f"gateway peak RSS {rss:.0f} MiB through delivery (target < 150)")
    orthanc.cleanup()


if __name__ == "__main__":
    main()
