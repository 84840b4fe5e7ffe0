"""C-FIND latency: the gateway over Orthanc's DICOMweb and over its embedded archive,
against Orthanc's own C-FIND and Orthanc's QIDO-RS, in one run (issue 11, target 4).

    python bench/find.py [--studies 1000] [--series 100] [--runs 7] [--page-size N]

Starts an Orthanc, a gateway whose upstream is that Orthanc's DICOMweb and a gateway
whose upstream is its embedded archive, all on free ports. Loads ``--studies``
one-instance studies of one patient and one study with ``--series`` series into
Orthanc (REST upload) and the same files into the embedded archive (C-STORE through
that gateway, waited for until delivered to the archive), then runs two queries with
dcmtk's findscu, round-robin against each SCP:

* study level, Study Root: PatientID of the bench patient (matches every study);
* series level: all series of the many-series study.

For each it prints the median time from the request to the first and to the last
response (read from findscu's verbose output as it streams, so process start-up and
association set-up are not counted), and the medians of the QIDO-RS request the
gateway sends (same match parameters and includefield), timed alone:

* in one request (no limit): the archive's own time for the whole answer, the
  reference of the target "gateway/QIDO <= 1.10";
* in the pages the gateway asks for, as it asks them (``limit``/``offset``: a first
  page of 100, then pages doubling up to ``find.page_size``, two asked ahead at once):
  what paging costs, or saves, against the one request.

and the two ratios of issue 11 with their targets: gateway over Orthanc / QIDO-RS in
one request (<= 1.10) and embedded archive / Orthanc's native C-FIND (<= 1.00). It
also prints the floor of a gateway that would ask the whole search in one request:
Orthanc's QIDO-RS sends nothing until its answer is complete, and findscu takes
answers no faster than Orthanc's own C-FIND delivers them after its first (about 0.1
ms each), so such a gateway ends no sooner than the QIDO-RS request plus that time.
Pages asked two at a time go under it: Orthanc builds each on a core of its own.

One Orthanc, with one configuration (``tests/support/orthanc.py`` plus
``DefaultEncoding: Utf8``), answers both the QIDO-RS path and its own C-FIND, so the
comparison is fair. What was measured on Orthanc 1.10.1 with the DICOMweb plugin 1.7:

* Orthanc's C-FIND answers these keys (all "main DICOM tags") from its index.
* The plugin's QIDO-RS does one ``/tools/find`` (~20 ms for the 1000 studies,
  whatever the limit) and then, per result, reads one instance's tags through the
  REST API and parses its file: ~0.35 ms per study or series. That holds for any
  ``includefield`` list, including only the unique key, and for ``includefield=all``;
  the answer is sent only once complete (time to first byte = total).
* ``StorageAccessOnFind`` ("Always", the default, or "Never") changes neither path;
  ``DicomWeb.StudiesMetadata``/``SeriesMetadata`` concern WADO-RS metadata, not
  QIDO-RS; ``ExtraMainDicomTags`` does not exist before Orthanc 1.11.
* A request with an offset costs Orthanc ~20 ms more than one without (limit=1:
  4 ms; limit=1&offset=999: 22 ms): its lookup walks every match before the offset.
* Concurrent QIDO-RS pages: the two halves at once took 305 ms at best against 412 ms
  for one request, but the same in the median (469 against 459 ms) on a day when
  other work took the cores. Pages doubling from 100, two asked ahead (the gateway's
  paging since 2026-11-28): the whole study-level search 1,332 against 1,883 ms
  paged one after another, and 1,830 ms for one request, on a slow day.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import UpstreamConfig  # noqa: E402
from gateway.dicomweb.qido import QidoOptions  # noqa: E402
from gateway.model.query import STUDY_ROOT_FIND, UNIQUE_KEY, Model, parse_identifier  # noqa: E402
from gateway.model.search import Search  # noqa: E402
from gateway.upstream.dicomweb import DicomWebUpstream  # noqa: E402
from tests.support.daemon import Gateway  # noqa: E402
from tests.support.dcmtk import DCMTK_BIN, LOOPBACK, dcmtk_env, storescu  # noqa: E402
from tests.support.finddata import many_series_study, simple_studies  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402

STUDY_KEYS = ["StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientName", "StudyDescription"]
SERIES_KEYS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"]
SERIES_STUDY = "1.2.826.0.1.3680043.10.1137.7.1"
# Issue 11, target 4.
QIDO_TARGET = 1.10
EMBEDDED_TARGET = 1.00


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


def qido_once(url: str) -> float:
    """Seconds of one QIDO-RS request, body read."""
    started = time.perf_counter()
    with urllib.request.urlopen(url) as response:
        response.read()
    return time.perf_counter() - started


def search_of(keys: list[str]) -> tuple[str, Search]:
    """The level and the upstream search the gateway makes of a findscu key list."""
    identifier = Dataset()
    for text in keys:
        keyword, _, value = text.partition("=")
        setattr(identifier, keyword, value)
    query = parse_identifier(identifier, Model(STUDY_ROOT_FIND))
    tags = {k.tag for k in query.keys} | {UNIQUE_KEY[query.level]}
    search = Search(
        keys=query.match_keys,
        include=tuple(sorted(t for t in tags if not query.is_below(t))),
        study_uid=query.uid("STUDY") if query.level in ("SERIES", "IMAGE") else None,
    )
    return query.level, search


def client_once(url: str, options: QidoOptions, level: str, search: Search) -> float:
    """Seconds of the gateway's own QIDO-RS client paging through the whole answer
    (its page sizes, two pages asked ahead while the current one is handed on)."""

    async def run() -> float:
        client = DicomWebUpstream(UpstreamConfig(type="dicomweb", url=url), options)
        await client.start()
        try:
            method = client.search_for_studies if level == "STUDY" else client.search_for_series
            started = time.perf_counter()
            async for _ in method(search):
                pass
            return time.perf_counter() - started
        finally:
            await client.close()

    return asyncio.run(run())


def _includes(keywords: list[str]) -> str:
    """The includefield parameters the gateway sends for these keys."""
    return "&".join(f"includefield={tag_for_keyword(k):08X}" for k in keywords)


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms"


def bench(name: str, targets: dict[str, tuple[int, str]], keys: list[str], runs: int, qido: str, client: tuple[str, QidoOptions]) -> None:
    firsts: dict[str, list[float]] = {t: [] for t in targets}
    lasts: dict[str, list[float]] = {t: [] for t in targets}
    counts: dict[str, int] = {}
    alone: list[float] = []
    paged: list[float] = []
    level, search = search_of(keys)
    for target, (port, ae) in targets.items():
        timed_find(port, ae, keys)  # warm-up: caches, connection pools
    qido_once(qido)
    for _ in range(runs):
        for target, (port, ae) in targets.items():
            first, last, count = timed_find(port, ae, keys)
            firsts[target].append(first)
            lasts[target].append(last)
            counts[target] = count
        alone.append(qido_once(qido))
        paged.append(client_once(*client, level, search))
    print(f"\n{name} ({runs} rounds, medians)")
    for target in targets:
        print(f"  {target:30s} {counts[target]:5d} matches  first {ms(firsts[target])}  last {ms(lasts[target])}")
    print(f"  {'Orthanc QIDO-RS, one request':30s}                     whole {ms(alone)}")
    print(f"  {'gateway QIDO-RS client, paged':30s}                     whole {ms(paged)}")
    last = {t: statistics.median(v) for t, v in lasts.items()}
    native = last["Orthanc C-FIND"]
    over = last["gateway over Orthanc QIDO-RS"] / statistics.median(alone)
    embedded = last["gateway, embedded archive"] / native
    print(f"  ratio gateway over Orthanc / QIDO-RS one request: {over:.2f}  (target <= {QIDO_TARGET:.2f})"
          f"  {'met' if over <= QIDO_TARGET else 'MISSED'}")
    print(f"  ratio embedded archive / Orthanc C-FIND:          {embedded:.2f}  (target <= {EMBEDDED_TARGET:.2f})"
          f"  {'met' if embedded <= EMBEDDED_TARGET else 'MISSED'}")
    print(f"  gateway over Orthanc / Orthanc C-FIND: {last['gateway over Orthanc QIDO-RS'] / native:.2f};"
          f" QIDO-RS one request / Orthanc C-FIND: {statistics.median(alone) / native:.2f}")
    # Orthanc's QIDO-RS sends nothing before its answer is complete, and findscu takes
    # answers no faster than Orthanc's own C-FIND delivers them once the first is out:
    # a gateway answering through QIDO-RS cannot end before the sum of the two.
    take = native - statistics.median(firsts["Orthanc C-FIND"])
    floor = statistics.median(alone) + take
    print(f"  floor of one request at a time: QIDO-RS one request + findscu taking the answers"
          f" (Orthanc C-FIND last - first, {take * 1000:.1f} ms) = {floor * 1000:.1f} ms"
          f" = {floor / statistics.median(alone):.2f} x QIDO-RS")


def load_embedded(gateway: Gateway, files: list[Path]) -> None:
    """C-STORE the files to a gateway whose upstream is its embedded archive and wait
    until every one is in the archive (delivered), not only spooled."""
    result = storescu(gateway.port, files, gateway.ae_title, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"storescu to the embedded gateway failed: {result.stderr[-500:]}")
    gateway.wait_counts(timeout=180, delivered=len(files))


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
        embedded = Gateway(work / "embedded", ae_title="EMBEDDED", extra=extra)
        options = QidoOptions(page_size=args.page_size) if args.page_size else QidoOptions()
        client = (orthanc.dicomweb_url, options)
        try:
            orthanc.start()
            started = time.perf_counter()
            orthanc.upload(files)
            print(f"loaded {len(files)} instances into Orthanc in {time.perf_counter() - started:.1f} s")
            embedded.start()
            started = time.perf_counter()
            load_embedded(embedded, files)
            print(f"loaded {len(files)} instances into the embedded archive in {time.perf_counter() - started:.1f} s")
            gateway.start()
            targets = {
                "Orthanc C-FIND": (orthanc.dicom_port, orthanc.aet),
                "gateway over Orthanc QIDO-RS": (gateway.port, gateway.ae_title),
                "gateway, embedded archive": (embedded.port, embedded.ae_title),
            }
            bench(
                f"study level, {args.studies} matches",
                targets,
                ["QueryRetrieveLevel=STUDY", "PatientID=BENCH", *STUDY_KEYS],
                args.runs,
                f"{orthanc.dicomweb_url}/studies?00100020=BENCH&{_includes(['PatientID', *STUDY_KEYS])}",
                client,
            )
            bench(
                f"series level, one study of {args.series} series",
                targets,
                ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={SERIES_STUDY}", *SERIES_KEYS],
                args.runs,
                f"{orthanc.dicomweb_url}/studies/{SERIES_STUDY}/series?{_includes(SERIES_KEYS)}",
                client,
            )
        finally:
            gateway.kill()
            embedded.kill()
            orthanc.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
