"""Ingest benchmark: C-STORE throughput of the gateway against dcmtk and Orthanc, same run.

    python bench/ingest.py [--count 200] [--rounds 3] [--skip-large] [--scanner-header]

Passes, each with a fresh 200-instance 512x512 16-bit CT series (fresh UIDs, so no
archive deduplicates), sent by dcmtk's storescu with TCP_NODELAY=1:
  a1) to dcmtk's `storescp -od DIR` (writes files, no fsync), one association;
  a4) the same, four storescu at once with a quarter each (storescp serves them in turn);
  b1) to the gateway over its embedded archive, until storescu finishes
      (acknowledged = durable in the spool), one association;
  b4) the same, four associations at once;
  c)  to a gateway over Orthanc, until every instance is delivered by STOW-RS;
  d)  straight to Orthanc's own DIMSE port.
Ratios b1/a1, b4/a4 (target 0.5) and c/d (target 1.0) are what we track: absolute
rates drift on shared machines, ratios measured side by side hold. Then the gateway's
peak RSS while receiving and delivering one ~500 MB multi-frame instance.

Each instance carries the 23 header elements an archive needs; ``--scanner-header``
gives each the 258 of pydicom's CT_small.dcm, as a scanner writes them, so that what
the gateway does per element weighs as it does in a hospital.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import SpoolConfig  # noqa: E402
from tests.support.daemon import Gateway  # noqa: E402
from tests.support.dcmtk import dcmtk_env  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.ports import free_port, wait_for_port, wait_until  # noqa: E402
from tests.support.synth import ct_series  # noqa: E402


def storescu(port: int, called: str, files: list[Path], senders: int = 1) -> float:
    """Send the files, split over ``senders`` storescu started at once (one association
    each); return seconds until the last one finished."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port)]
            + [str(f) for f in files[k::senders]],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k in range(senders)
    ]
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"storescu to port {port} failed with {proc.returncode}")
    return time.perf_counter() - started


def storescp_sink(directory: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """dcmtk's storescp writing what it receives into ``directory`` (no fsync), AE title
    SINK, on a free port: the reference receiver of the benchmarks."""
    port = free_port()
    scp = subprocess.Popen(
        ["/usr/bin/storescp", "-od", str(directory), "-aet", "SINK", str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return port, scp


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
    parser.add_argument(
        "--scanner-header", action="store_true",
        help="instances carrying CT_small.dcm's 258 elements, as a scanner writes them, not 23",
    )
    args = parser.parse_args()
    n = args.count

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    received = work / "storescp"
    received.mkdir()
    scp_port, scp = storescp_sink(received)
    orthanc = Orthanc(workdir=work / "orthanc").start()
    # The product's reserve of blanks, not the small one test daemons get.
    reserve = {"reserve_mb": SpoolConfig().reserve_mb}
    local = Gateway(work / "gw-local", spool=reserve).start()
    gw = Gateway(work / "gw", upstream_url=orthanc.dicomweb_url, spool=reserve).start()
    wait_for_port("127.0.0.1", scp_port, 10)
    rates: dict[str, list[float]] = {k: [] for k in ("a1", "a4", "b1", "b4", "c", "d")}
    try:
        for r in range(args.rounds):
            series = {k: ct_series(work / f"r{r}{k}", n, scanner_header=args.scanner_header) for k in rates}
            rates["a1"].append(n / storescu(scp_port, "SINK", series["a1"]))
            rates["a4"].append(n / storescu(scp_port, "SINK", series["a4"], senders=4))
            shutil.rmtree(received)
            received.mkdir()
            rates["b1"].append(n / storescu(local.port, local.ae_title, series["b1"]))
            rates["b4"].append(n / storescu(local.port, local.ae_title, series["b4"], senders=4))

            before = gw.counts()["delivered"]
            started = time.perf_counter()
            storescu(gw.port, gw.ae_title, series["c"])
            wait_until(lambda: gw.counts()["delivered"] >= before + n, 600, 0.02, "not delivered")
            rates["c"].append(n / (time.perf_counter() - started))

            rates["d"].append(n / storescu(orthanc.dicom_port, orthanc.aet, series["d"]))
            for k in rates:
                shutil.rmtree(work / f"r{r}{k}")
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True)
    finally:
        local.stop()
        gw.stop()
        scp.terminate()
        scp.wait()

    med = {k: statistics.median(v) for k, v in rates.items()}
    header = "a scanner's header (258 elements)" if args.scanner_header else "23 header elements"
    print(f"\ningest of {n} x 512x512 16-bit CT (~512 KB each, {header}), median of {args.rounds} rounds")
    print(f"  a1) dcmtk storescp -od, one association       {med['a1']:6.0f} instances/s")
    print(f"  a4) dcmtk storescp -od, 4 associations at once {med['a4']:6.0f} instances/s")
    print(f"  b1) gateway acknowledged, one association      {med['b1']:6.0f} instances/s"
          f"   b1/a1 = {med['b1'] / med['a1']:.2f} (target >= 0.50)")
    print(f"  b4) gateway acknowledged, 4 associations       {med['b4']:6.0f} instances/s"
          f"   b4/a4 = {med['b4'] / med['a4']:.2f} (target >= 0.50)")
    print(f"  c)  gateway, delivered to Orthanc              {med['c']:6.0f} instances/s")
    print(f"  d)  Orthanc's own DIMSE port                   {med['d']:6.0f} instances/s"
          f"   c/d = {med['c'] / med['d']:.2f} (target >= 1.00)")

    if not args.skip_large:
        big = ct_series(work / "big", 1, frames=1000)[0]
        fresh = Gateway(work / "gw-large", upstream_url=orthanc.dicomweb_url, spool=reserve).start()
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
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
