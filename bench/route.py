"""Route benchmark: how fast a route's copies reach their destination, against the
modality sending there itself, same run.

    python bench/route.py [--count 200] [--rounds 3]

Each round, with a fresh 200-instance 512x512 16-bit CT series (~512 KB each), sent by
dcmtk's storescu with TCP_NODELAY=1 over one association:
  a) straight to dcmtk's `storescp -od DIR` (writes files, no fsync);
  r) to the gateway over its embedded archive with a `[[dimse.routes]]` to that same
     storescp, until every copy is delivered (the instances made durable in the spool,
     stored in the archive and sent on by the route sender, all on the same cores).
The ratio r/a says what the relay costs against no relay at all; the route's copies
cannot arrive faster than the modality could send them itself.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import storescp_sink, storescu  # noqa: E402
from gateway.config import SpoolConfig  # noqa: E402
from tests.support.daemon import Gateway  # noqa: E402
from tests.support.ports import wait_for_port, wait_until  # noqa: E402
from tests.support.synth import ct_series  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.count

    work = Path(tempfile.mkdtemp(prefix="bench-route-"))
    received = work / "storescp"
    received.mkdir()
    scp_port, scp = storescp_sink(received)
    gw = Gateway(
        work / "gw", spool={"reserve_mb": SpoolConfig().reserve_mb},
        extra=f'\n[[dimse.peers]]\nae_title = "SINK"\nhost = "127.0.0.1"\nport = {scp_port}\n'
        '\n[[dimse.routes]]\ndestination = "SINK"\n',
    ).start()
    wait_for_port("127.0.0.1", scp_port, 10)
    rates: dict[str, list[float]] = {"a": [], "r": []}

    def copied() -> int:
        return int(gw.health()["spool"]["routes"].get("SINK", {}).get("counts", {}).get("delivered", 0))

    try:
        for r in range(args.rounds):
            series = {k: ct_series(work / f"r{r}{k}", n) for k in rates}
            rates["a"].append(n / storescu(scp_port, "SINK", series["a"]))
            shutil.rmtree(received)
            received.mkdir()
            before = copied()
            started = time.perf_counter()
            storescu(gw.port, gw.ae_title, series["r"])
            wait_until(lambda: copied() >= before + n, 600, 0.02, "copies not delivered")
            rates["r"].append(n / (time.perf_counter() - started))
            for k in rates:
                shutil.rmtree(work / f"r{r}{k}")
            shutil.rmtree(received)
            received.mkdir()
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True)
    finally:
        gw.stop()
        scp.terminate()
        scp.wait()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nroute of {n} x 512x512 16-bit CT (~512 KB each), median of {args.rounds} rounds")
    print(f"  a) storescu straight to storescp -od          {med['a']:6.0f} instances/s")
    print(f"  r) through the gateway's route, all copied    {med['r']:6.0f} instances/s   r/a = {med['r'] / med['a']:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
