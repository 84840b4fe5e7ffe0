"""Thin wrappers around dcmtk's command-line tools, plus a storescp fixture class.

Why dcmtk and not pynetdicom for the client side: the gateway must interoperate
with a DICOM implementation it shares no code with, and dcmtk is what most
modalities and PACS are built on.

Two traps this module hides:

* pynetdicom installs its own ``storescu``, ``findscu``... console scripts that
  come earlier on PATH, so every tool is run by absolute path from ``/usr/bin``.
* dcmtk only sets TCP_NODELAY on its sockets when the ``TCP_NODELAY``
  environment variable is set; without it every loopback C-STORE stalls for
  about 40 ms in Nagle/delayed-ACK, which turns a 100-file test into seconds.

dcmtk 3.6.7 facts that matter for tests (checked here, not assumed):

* ``--config-file`` profiles accept transfer syntax UIDs verbatim, so
  :func:`storescu_for_syntax` can propose any syntax dcmtk knows, including the
  ones without a ``-x`` flag (JPEG Extended .51, JPEG Lossless .57, JPEG 2000
  Part 2 .92/.93, ...).
* dcmtk 3.6.7 knows transfer syntaxes up to ``1.2.840.10008.1.2.4.108`` (plus
  deflate, RLE and the 1.2.840.10008.1.2.6/.7 families). It does not know
  HTJ2K (``1.2.840.10008.1.2.4.201``-``.203``) nor JPEG XL: it parses such a file
  as Explicit VR Little Endian, negotiates the UID fine, then fails the C-STORE
  locally with "DIMSE Unsupported transfer syntax". Use
  :func:`tests.support.pyscu.send_files` to send those.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from tests.support.ports import free_port, port_is_open, wait_until
from tests.support.process import terminate

DCMTK_BIN = Path("/usr/bin")
LOOPBACK = "127.0.0.1"

#: Query keys: either ``{"PatientID": "X", "StudyInstanceUID": ""}`` or the raw
#: ``-k`` strings dcmtk takes (``["0008,0052=STUDY", "PatientID"]``).
QueryKeys = Mapping[str, str] | Sequence[str]

_QUERY_MODEL_FLAGS = {"patient": "-P", "study": "-S", "psonly": "-O", "worklist": "-W"}

#: Presentation context IDs are the odd numbers 1-255, so at most 128 per association.
MAX_PRESENTATION_CONTEXTS = 128


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: the caller's plus ``TCP_NODELAY=1``."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def run_dcmtk(tool: str, args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``/usr/bin/<tool> args...`` and capture its text output.

    The exit code is not checked: tests routinely assert on refusals, so the
    caller decides what success means.
    """
    return subprocess.run(
        [str(DCMTK_BIN / tool), *args],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _key_args(keys: QueryKeys) -> list[str]:
    """Turn query keys into repeated ``-k`` options."""
    items = [f"{tag}={value}" for tag, value in keys.items()] if isinstance(keys, Mapping) else list(keys)
    args: list[str] = []
    for item in items:
        args += ["-k", item]
    return args


def _model_flag(model: str) -> str:
    try:
        return _QUERY_MODEL_FLAGS[model]
    except KeyError:
        raise ValueError(f"unknown query model {model!r}; use one of {sorted(_QUERY_MODEL_FLAGS)}") from None


def echoscu(
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    host: str = LOOPBACK,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO ``called_ae`` at host:port; returncode 0 means verified."""
    return run_dcmtk(
        "echoscu", ["-aet", calling_ae, "-aec", called_ae, *extra_args, host, str(port)], timeout=timeout
    )


def storescu(
    port: int,
    paths: Iterable[Path | str],
    called_ae: str,
    calling_ae: str = "STORESCU",
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """C-STORE files (or whole directories) in one association.

    If a directory is given and ``extra_args`` has no ``+sd``, ``+sd +r`` is
    added so the directory is scanned recursively. Observed storescu 3.6.7
    behaviour to plan tests around:

    * it stops at the first failed store with returncode 1; with ``-nh`` it
      goes on and then exits 0 even if stores failed, so count what arrived
      or look for ``E:`` lines in stderr;
    * by default it proposes a fixed list of SOP classes (e.g. no Segmentation
      Storage: "No presentation context for: (SG)"); ``-R`` proposes exactly
      the files' SOP classes;
    * by default it proposes only uncompressed syntaxes and tries to
      decompress compressed files, which it cannot ("DIMSE Failed to send
      message"); send compressed files with ``-x?`` flags or, for exactly
      the file's syntax, :func:`storescu_for_syntax`.
    """
    path_list = [str(p) for p in paths]
    if not path_list:
        raise ValueError("storescu needs at least one file or directory")
    args = ["-aet", calling_ae, "-aec", called_ae]
    scan = ("+sd", "--scan-directories")
    if any(Path(p).is_dir() for p in path_list) and not any(a in scan for a in extra_args):
        args += ["+sd", "+r"]
    return run_dcmtk("storescu", [*args, *extra_args, host, str(port), *path_list], timeout=timeout)


def findscu(
    port: int,
    called_ae: str,
    keys: QueryKeys,
    model: str = "study",
    calling_ae: str = "FINDSCU",
    output_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """C-FIND with ``keys`` (include ``QueryRetrieveLevel``) in ``model``.

    With ``output_dir`` each response is written there as ``rsp0001.dcm``... so a
    test can parse the identifiers instead of scraping the log.
    """
    args = [_model_flag(model), "-aet", calling_ae, "-aec", called_ae, *_key_args(keys)]
    if output_dir is not None:
        args += ["-X", "-od", str(output_dir)]
    return run_dcmtk("findscu", [*args, *extra_args, host, str(port)], timeout=timeout)


def movescu(
    port: int,
    called_ae: str,
    move_destination: str,
    keys: QueryKeys,
    model: str = "study",
    calling_ae: str = "MOVESCU",
    receive_port: int | None = None,
    output_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """C-MOVE ``keys`` to ``move_destination``.

    The destination is normally another SCP (e.g. a :class:`StoreSCP` known to
    the mover). With ``receive_port`` movescu itself listens there and stores
    the sub-operations into ``output_dir``; the mover must then map
    ``move_destination`` to 127.0.0.1:receive_port.
    """
    args = [_model_flag(model), "-aet", calling_ae, "-aec", called_ae, "-aem", move_destination, *_key_args(keys)]
    if receive_port is not None:
        args += ["+P", str(receive_port), "+xa"]
        if output_dir is not None:
            args += ["-od", str(output_dir)]
    return run_dcmtk("movescu", [*args, *extra_args, host, str(port)], timeout=timeout)


def getscu(
    port: int,
    called_ae: str,
    keys: QueryKeys,
    output_dir: Path,
    model: str = "study",
    calling_ae: str = "GETSCU",
    extra_args: Sequence[str] = (),
    host: str = LOOPBACK,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """C-GET ``keys``; the retrieved instances are written into ``output_dir``."""
    args = [_model_flag(model), "-aet", calling_ae, "-aec", called_ae, *_key_args(keys), "-od", str(output_dir)]
    return run_dcmtk("getscu", [*args, *extra_args, host, str(port)], timeout=timeout)


_config_dir: Path | None = None


def _storescu_config_dir() -> Path:
    """One directory per test process for generated storescu profiles."""
    global _config_dir
    if _config_dir is None:
        _config_dir = Path(tempfile.mkdtemp(prefix="storescu-profiles-"))
        atexit.register(shutil.rmtree, _config_dir, True)
    return _config_dir


def storescu_for_syntax(
    transfer_syntax_uid: str,
    sop_class_uids: Iterable[str],
    config_dir: Path | None = None,
) -> list[str]:
    """Return storescu ``extra_args`` that propose exactly one transfer syntax.

    Writes an association negotiation profile (dcmtk ``--config-file`` format)
    with one presentation context per SOP class, each offering only
    ``transfer_syntax_uid``. Because nothing else is offered, storescu cannot
    fall back to transcoding: either the peer accepts that syntax and gets the
    file's bytes in it, or the store fails with "no presentation context".
    The files sent must already be in that syntax.
    """
    sop_classes = sorted(set(sop_class_uids))
    if not sop_classes:
        raise ValueError("at least one SOP Class UID is needed")
    if len(sop_classes) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(sop_classes)} SOP classes exceed the {MAX_PRESENTATION_CONTEXTS} contexts allowed")
    lines = ["[[TransferSyntaxes]]", "[OnlySyntax]", f"TransferSyntax1 = {transfer_syntax_uid}", ""]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{i} = {uid}\\OnlySyntax" for i, uid in enumerate(sop_classes, start=1)]
    lines += ["", "[[Profiles]]", "[Single]", "PresentationContexts = Contexts", ""]
    text = "\n".join(lines)
    directory = config_dir if config_dir is not None else _storescu_config_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"storescu-{hashlib.sha1(text.encode()).hexdigest()[:16]}.cfg"
    if not path.exists():
        path.write_text(text)
    return ["--config-file", str(path), "Single"]


class StoreSCP:
    """A real ``/usr/bin/storescp`` listening on a free loopback port.

    Used as a C-MOVE destination or as a downstream peer. By default it accepts
    every transfer syntax dcmtk knows (``+xa``) and unknown SOP classes (``-pm``)
    and writes what it receives bit-preserving (``+B``), so a test sees the
    exact data set that went over the wire. ``implicit_only`` makes it accept
    Implicit VR Little Endian only, to test peers that must transcode or fail.
    ``profile`` (``--config-file`` arguments, e.g. from :func:`storescu_for_syntax`)
    makes it accept exactly the profile's contexts instead; dcmtk allows neither
    ``+xa``/``+xi`` nor ``-pm`` with it, so those are then left out.
    Files are named ``<modality>.<SOPInstanceUID>`` by storescp. It serves one
    association at a time; pass ``extra_args=["--fork"]`` when a test needs
    concurrent associations.
    """

    def __init__(
        self,
        output_dir: Path | None = None,
        ae_title: str = "STORESCP",
        implicit_only: bool = False,
        promiscuous: bool = True,
        bit_preserving: bool = True,
        extra_args: Sequence[str] = (),
        log_file: Path | None = None,
        port: int | None = None,
        profile: Sequence[str] = (),
    ) -> None:
        self._workdir: Path | None = None
        if output_dir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="storescp-"))
            output_dir = self._workdir / "received"
        self.output_dir = output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port if port is not None else free_port()
        self.log_file = log_file if log_file is not None else self.output_dir.parent / f"storescp-{self.port}.log"
        args = ["-aet", ae_title, "-od", str(self.output_dir), "-v"]
        if profile:
            args += profile
        else:
            args.append("+xi" if implicit_only else "+xa")
            if promiscuous:
                args.append("-pm")
        if bit_preserving:
            args.append("+B")
        self._args = [*args, *extra_args, str(self.port)]
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: BinaryIO | None = None

    def start(self, timeout: float = 10.0) -> StoreSCP:
        """Start storescp and wait until its port accepts connections.

        The readiness probe is a bare TCP connect, which storescp logs as an
        association that never completed; that line in the log is expected.
        """
        if self._process is not None and self._process.poll() is None:
            return self
        log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._log_handle = log
        process = self._process = subprocess.Popen(
            [str(DCMTK_BIN / "storescp"), *self._args],
            env=dcmtk_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: process.poll() is not None or port_is_open(LOOPBACK, self.port),
                timeout=timeout,
                message=f"storescp did not listen on port {self.port}",
            )
            if process.poll() is not None:
                raise AssertionError(f"storescp exited with {process.returncode}: {self.log()}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate storescp (SIGTERM, then SIGKILL); received files stay."""
        process, self._process = self._process, None
        terminate(process, timeout)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def cleanup(self) -> None:
        """Stop and delete the temporary directory this instance created."""
        self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def pause(self) -> None:
        """Freeze storescp (SIGSTOP): connections are accepted by the kernel but nothing
        is answered until `resume`."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def files(self) -> list[Path]:
        """Received files, sorted by name."""
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 10.0) -> list[Path]:
        """Wait until at least ``count`` files arrived and storescp finished them.

        storescp writes straight to the final name, so "present" is not
        "complete"; a file counts once its size stopped changing between polls.
        """
        sizes: dict[Path, int] = {}

        def settled() -> list[Path] | None:
            files = self.files()
            current = {p: p.stat().st_size for p in files}
            stable = len(files) >= count and current == sizes
            sizes.clear()
            sizes.update(current)
            return files if stable else None

        return wait_until(settled, timeout=timeout, interval=0.1, message=f"storescp got fewer than {count} files")

    def log(self) -> str:
        """The storescp log so far (for assertion messages)."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

