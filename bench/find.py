"""C-FIND latency: the gateway (upstream: Orthanc's DICOMweb) against Orthanc's own DIMSE.

    python bench/find.py [--studies 1000] [--series 100] [--runs 7]

Starts an Orthanc and a gateway on free ports, loads ``--studies`` one-instance
studies of one patient and one study with ``--series`` series, then runs two
queries with dcmtk's findscu, alternately against each SCP:

* study level, Study Root: PatientID of the bench patient (matches every study);
* series level: all series of the many-series study.

For each it prints the median time from the request to the first and to the last
response, and the gateway/Orthanc ratio of the latter (target: at most 1.5).
Times are read from findscu's verbose output as it streams, so process start-up
and association set-up are not counted.

It also times the QIDO-RS request alone, which bounds what any DICOMweb client of
this archive can reach: the gateway cannot answer before its archive has. One Orthanc,
with one configuration (``tests/support/orthanc.py`` plus ``DefaultEncoding: Utf8``),
answers both the QIDO-RS path and its own C-FIND, so the comparison is fair. What
was measured on Orthanc 1.10.1 with the DICOMweb plugin 1.7, and why no setting
narrows the gap:

* Orthanc's C-FIND answers these keys (all "main DICOM tags") from its index.
* The plugin's QIDO-RS does one ``/tools/find`` (~20 ms for the 1000 studies,
  whatever the limit) and then, per result, reads one instance's tags through the
  REST API and parses its file: ~0.35 ms per study or series. That holds for any
  ``includefield`` list, including only the unique key, and for ``includefield=all``;
  the answer is sent only once complete (time to first byte = total).
* ``StorageAccessOnFind`` ("Always", the default, or "Never") changes neither path;
  ``DicomWeb.StudiesMetadata``/``SeriesMetadata`` concern WADO-RS metadata, not
  QIDO-RS; ``ExtraMainDicomTags`` does not exist before Orthanc 1.11.
* Concurrent QIDO-RS pages do not add up: the plugin's REST calls serialise inside
  Orthanc, and both processes share the machine's cores.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pydicom.datadict import tag_for_keyword

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daemon import Gateway  # noqa: E402
from tests.support.dcmtk import DCMTK_BIN, LOOPBACK, dcmtk_env  # noqa: E402
from tests.support.finddata import many_series_study, simple_studies  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402

STUDY_KEYS = ["StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientName", "StudyDescription"]
SERIES_KEYS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"]


def timed_find(port: int, called_ae: str, keys: list[str]) -> tuple[float, float, int]:
    """(seconds to first response, seconds to the final response, pending count)."""
    argv = [str(DCMTK_BIN / "findscu"), "-S", "-v", "-aec", called_ae]
    for key in keys:
        argv += ["-k", key]
    proc = subprocess.Popen([*argv, LOOPBACK, str(port)], env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    sent = first = last = 0.0
    count = 0
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        if "Sending Find Request" in line:
            sent = time.perf_counter()
        elif "(Pending)" in line and "Find Response" in line:
            count += 1
            if count == 1:
                first = time.perf_counter()
        elif "Final Find Response" in line:
            last = time.perf_counter()
            if "Success" not in line:
                raise RuntimeError(f"{called_ae}: {line.strip()}")
    proc.wait()
    return first - sent, last - sent, count


def qido_seconds(url: str, runs: int) -> float:
    """Median time of one QIDO-RS request, body read (the upstream's share of a C-FIND)."""
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        with urllib.request.urlopen(url) as response:
            response.read()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def _includes(keywords: list[str]) -> str:
    """The includefield parameters the gateway sends for these keys."""
    return "&".join(f"includefield={tag_for_keyword(k):08X}" for k in keywords)


def bench(name: str, targets: dict[str, tuple[int, str]], keys: list[str], runs: int, qido: str) -> None:
    firsts: dict[str, list[float]] = {t: [] for t in targets}
    lasts: dict[str, list[float]] = {t: [] for t in targets}
    counts: dict[str, int] = {}
    for target, (port, ae) in targets.items():
        timed_find(port, ae, keys)  # warm-up: caches, connection pools
    for _ in range(runs):
        for target, (port, ae) in targets.items():
            first, last, count = timed_find(port, ae, keys)
            firsts[target].append(first)
            lasts[target].append(last)
            counts[target] = count
    print(f"\n{name}")
    for target in targets:
        print(
            f"  {target:8s} {counts[target]:5d} matches  first {statistics.median(firsts[target]) * 1000:8.1f} ms"
            f"  last {statistics.median(lasts[target]) * 1000:8.1f} ms"
        )
    orthanc_last = statistics.median(lasts["orthanc"])
    ratio = statistics.median(lasts["gateway"]) / orthanc_last
    alone = qido_seconds(qido, runs)
    print(f"  ratio gateway/orthanc (last response): {ratio:.2f}  (target <= 1.5)")
    print(
        f"  Orthanc QIDO-RS alone, the whole answer in one request: {alone * 1000:.1f} ms"
        f" = {alone / orthanc_last:.2f} x Orthanc's C-FIND (the floor of the ratio through QIDO-RS)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=None, help="gateway find.page_size (default: its default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-find-") as tmp:
        work = Path(tmp)
        files = simple_studies(work / "studies", args.studies) + many_series_study(work / "series", args.series)
        orthanc = Orthanc(workdir=work / "orthanc", extra_config={"DefaultEncoding": "Utf8"})
        extra = f"\n[find]\npage_size = {args.page_size}\n" if args.page_size else ""
        gateway = Gateway(work / "gateway", upstream_url=orthanc.dicomweb_url, extra=extra)
        try:
            orthanc.start()
            started = time.perf_counter()
            orthanc.upload(files)
            print(f"loaded {len(files)} instances into Orthanc in {time.perf_counter() - started:.1f} s")
            gateway.start()
            targets = {"orthanc": (orthanc.dicom_port, orthanc.aet), "gateway": (gateway.port, gateway.ae_title)}
            series_study = "1.2.826.0.1.3680043.10.1137.7.1"
            bench(
                f"study level, {args.studies} matches",
                targets,
                ["QueryRetrieveLevel=STUDY", "PatientID=BENCH", *STUDY_KEYS],
                args.runs,
                f"{orthanc.dicomweb_url}/studies?00100020=BENCH&{_includes(['PatientID', *STUDY_KEYS])}",
            )
            bench(
                f"series level, one study of {args.series} series",
                targets,
                ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={series_study}", *SERIES_KEYS],
                args.runs,
                f"{orthanc.dicomweb_url}/studies/{series_study}/series?{_includes(SERIES_KEYS)}",
            )
        finally:
            gateway.kill()
            orthanc.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
