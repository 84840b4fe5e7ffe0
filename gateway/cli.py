"""The ``dicom-gateway`` command: run the daemon, check a config, administer the spool."""

from __future__ import annotations

import argparse
import getpass
import asyncio
import json
import logging
import re
import socket
import ssl
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from gateway.audit.auditor import Auditor, StudyTally, audit_trail
from gateway.audit.message import Participant
from gateway.config import Config, ConfigError, load_config
from gateway.logfmt import FORMATS, PatientDataFilter, formatter
from gateway.spool.copies import Copies
from gateway.spool.export import export_rows
from gateway.spool.db import SpoolDatabaseUnreadable
from gateway.spool.lock import SpoolLock, SpoolLocked
from gateway.spool.queue import STATES, Spool
from gateway.uids import is_valid_uid
from gateway.upstream import make_upstream
from gateway.upstream.base import Health
from gateway.upstream.local import ArchiveIndexUnreadable


def setup_logging(level: str, kind: str = "text", include_patient_data: bool = False) -> None:
    """One line per event on stderr, as text or JSON (`gateway.logfmt`). pynetdicom and
    pydicom are kept quiet because their debug output and value warnings can carry
    patient names and IDs; our own such lines need ``include_patient_data``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    handler.addFilter(PatientDataFilter(include_patient_data))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom's warnings about invalid values quote the value, which may be a name; it
    # both logs them and raises them as Python warnings, which print on stderr.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # A frame no codec plugin can decode or encode is logged by pydicom once per plugin,
    # traceback and all, then raised with every plugin's reason, which we log in one line.
    for module in ("pydicom.pixels.decoders.base", "pydicom.pixels.encoders.base"):
        logging.getLogger(module).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d' or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 12h or 7d")
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * factor


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"configuration error in {path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    setup_logging(config.logging.level, args.log_format, config.logging.include_patient_data)
    from gateway.allocator import keep_freed_memory
    from gateway.daemon import run

    logging.getLogger("gateway").debug("allocator: %s set", ", ".join(keep_freed_memory()) or "nothing")

    try:
        asyncio.run(run(config, Path(args.config)))
    except (OSError, SpoolLocked, SpoolDatabaseUnreadable, ArchiveIndexUnreadable) as exc:  # logged, as the daemon logs
        logging.getLogger("gateway").error("cannot start: %s", exc)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file; with ``--online`` also try what the gateway will contact with
    the configured credentials: one signed search of the archive (a token obtained
    first where the auth type needs one) and the keys of ``[http.auth.oidc]``'s
    provider, so a wrong secret, scope or URL shows before the daemon runs. Exit
    status 1 when either failed."""
    config = _load(args.config)
    print(
        f"{args.config}: OK (AE {', '.join([config.dimse.ae_title, *sorted(config.dimse.own_ae_titles - {config.dimse.ae_title})])}"
        f" on port {config.dimse.port}, "
        f"upstream {config.upstream.type}, {len(config.dimse.peers)} peer(s))"
    )
    if not args.online:
        return 0
    ok = True
    if config.upstream.type == "local":
        print("upstream: the embedded archive, nothing to contact")
    else:
        health = asyncio.run(_probe_upstream(config))
        print(f"upstream {_upstream_location(config)}: {'OK' if health.reachable else 'FAILED'} ({health.detail})")
        ok = health.reachable
    if config.http.auth.oidc is not None:
        from gateway.web.oidc import KeysUnavailable, TokenVerifier

        try:
            keys = asyncio.run(TokenVerifier(config.http.auth.oidc).signing_keys())
            print(f"OpenID provider {config.http.auth.oidc.issuer}: OK ({keys} signing key(s))")
        except KeysUnavailable as exc:
            print(f"OpenID provider {config.http.auth.oidc.issuer}: FAILED ({exc})")
            ok = False
    return 0 if ok else 1


async def _probe_upstream(config: Config) -> Health:
    upstream = make_upstream(config)
    try:
        await upstream.start()
        return await upstream.health()
    finally:
        await upstream.close()


def _upstream_location(config: Config) -> str:
    if config.upstream.type == "healthimaging":
        return f"{config.upstream.dicomweb_endpoint_url} (data store {config.upstream.datastore_id})"
    return config.upstream.url


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'id':>8}  {'state':<9} {'att':>3}  {'received':<19}  {'from':<16}  {'to':<16}  {'sop instance uid':<64}  last error"
    )
    for r in rows:
        received = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["received_at"]))
        print(
            f"{r['id']:>8}  {r['state']:<9} {r['attempts']:>3}  {received}  {r['calling_ae'] or '':<16}  {r['called_ae'] or '':<16}  "
            f"{r['sop_instance_uid']:<64}  {r['last_error'] or ''}"
        )


def _daemon_problems(config: Config) -> tuple[str, list[dict[str, Any]] | None]:
    """Ask the running daemon's /healthz what keeps delivery from working (a held
    queue, a failing spool database): only the daemon knows, the spool rows do not.
    Returns (URL asked, problems), problems None when the daemon did not answer."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(config.http.host, config.http.host)
    scheme, context = "http", None
    if config.http.tls is not None:
        # Our own daemon, asked at an address its certificate may not name: trust
        # exactly the certificate it serves, whoever signed it.
        scheme, context = "https", ssl.create_default_context(cafile=config.http.tls.certificate)
        context.check_hostname = False
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{config.http.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):
        return url, None
    problems = body.get("problems") if isinstance(body, dict) else None
    return url, problems if isinstance(problems, list) else None


def _export(config: Config, spool: Spool, args: argparse.Namespace) -> int:
    """``spool export``: the chosen rows' instances into ``--to``, audited as a transfer
    to the operating-system user who ran it. Exit 1 if any could not be exported."""
    if sum(map(bool, (args.dead, args.id, args.study))) != 1:
        print("spool export: give one of --dead, --id N [N ...] or --study UID", file=sys.stderr)
        return 2
    rows = spool.list_rows("dead" if args.dead else None, 1_000_000, study_uid=args.study, ids=args.id or ())
    try:
        exported = export_rows(spool, rows, args.to)
    except OSError as exc:  # the directory cannot be made
        print(f"spool export: {args.to}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for row_id, problem in exported.problems:
        print(f"id {row_id}: {problem}", file=sys.stderr)
    print(f"exported {len(exported.written)} instance(s) to {args.to}")
    if exported.written:
        trail = audit_trail(config)
        if trail is not None:
            tally = StudyTally()
            for row, _ in exported.written:
                tally.add(row["study_uid"], row["sop_class_uid"])
            admin = Participant(getpass.getuser(), True, socket.gethostname())
            Auditor(config, trail).sent(admin, admin, tally, len(exported.written), len(exported.problems), f"spool export to {args.to}")
            trail.close()
    return 1 if exported.problems or not rows else 0


def _audit_discard(config: Config, study_uid: str, description: str) -> None:
    """Tell the audit trail an admin withdrew a study's instances (they will never
    reach the archive): the operating-system user on this host is the requestor."""
    trail = audit_trail(config)
    if trail is None:
        return
    admin = Participant(getpass.getuser(), True, socket.gethostname())
    Auditor(config, trail).deleted(admin, study_uid, True, description)
    trail.close()


def cmd_archive(args: argparse.Namespace) -> int:
    """``archive reindex``: rebuild the embedded archive's index from its files, the
    daemon stopped (the spool's lock is taken for the while)."""
    from gateway.upstream.archive_reindex import reindex

    config = _load(args.config)
    setup_logging(config.logging.level)  # pydicom's warnings quote values (names, IDs) read from the files
    if config.upstream.type != "local":
        print(f"error: the upstream is {config.upstream.type!r}, not the embedded archive", file=sys.stderr)
        return 2
    lock = SpoolLock(config.spool.directory)
    try:
        lock.acquire()
    except SpoolLocked as exc:
        print(f"error: {exc}: stop the daemon first", file=sys.stderr)
        return 1
    try:
        done = reindex(config.spool.directory / "archive")
    finally:
        lock.release()
    for path in done.set_aside:
        print(f"set aside: {path}")
    print(f"indexed: {done.indexed} instance(s)")
    for line in done.unreadable:
        print(f"not indexed (unreadable, left in place): {line}")
    for file in done.older_copies:
        print(f"not indexed (an older copy of an instance indexed from a newer file, left in place): {file}")
    return 1 if done.unreadable else 0


def cmd_spool(args: argparse.Namespace) -> int:
    """Spool administration, safe while the daemon runs, so without the daemon's lock.

    ``status`` and ``list`` only read. ``retry`` is one SQL transaction that moves
    dead or failed rows to queued, which the daemon's forwarder picks up on its next
    poll. ``purge`` touches only delivered rows, which nothing in the daemon changes
    any more; deleting a file and its row twice (with the daemon's own purger) is
    harmless, and embedded-archive copies are separate hard links. ``discard`` first
    turns the rows dead in the transaction that finds them, so no forwarder claims one
    while its file goes (`Spool.discard`). Taking the lock
    instead would make these commands unusable exactly when they are needed (after
    an archive outage, with the daemon running).
    """
    config = _load(args.config)
    spool = Spool(config.spool)
    try:
        if args.action == "status":
            status = spool.status()
            url, problems = _daemon_problems(config)
            status["problems"] = problems
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                for state in STATES:
                    print(
                        f"{state:<10} {status['counts'][state]:>8} instances "
                        f"{status['bytes'][state] / 2**20:>10.1f} MiB"
                    )
                if status["delivered_not_primary"]:
                    print(
                        f"not primary:    {status['delivered_not_primary']} delivered instances kept apart from their"
                        " study by the archive (HealthImaging non-primary image sets; upstream.include_non_primary)"
                    )
                age = status["oldest_pending_age_seconds"]
                print(f"oldest pending: {'-' if age is None else f'{age:.0f} s'}")
                print(f"free space:     {status['free_bytes'] / 2**30:.1f} GiB")
                for destination, route in status["routes"].items():
                    told = ", ".join(f"{n} {state}" for state, n in route["counts"].items() if n)
                    age = route["oldest_pending_age_seconds"]
                    print(f"route {destination}: copies {told}" + (f"; oldest waiting {age:.0f} s" if age else ""))
                    if route["last_error"] and (route["counts"]["failed"] or route["counts"]["dead"]):
                        print(f"  last error: {route['last_error']}")
                if status["commitments_owed"]:
                    print(f"commitments:    {status['commitments_owed']} storage commitment report(s) not yet delivered")
                if problems is None:
                    print(f"daemon:         not answering at {url}")
                elif not problems:
                    print("delivery:       no problems")
                for problem in problems or ():
                    print(f"problem:        {problem.get('reason')} (since {problem.get('since')})")
        elif args.action == "list":
            rows = spool.list_rows(
                args.state, args.limit, study_uid=args.study, series_uid=args.series,
                sop_instance_uid=args.instance, calling_ae=args.calling_ae, called_ae=args.called_ae,
                since=None if args.since is None else time.time() - args.since, route=args.route,
            )
            _print_rows(rows, args.json)
        elif args.action == "retry":
            if sum(map(bool, (args.dead, args.id, args.study))) != 1:
                print("spool retry: give one of --dead, --id N [N ...] or --study UID", file=sys.stderr)
                return 2
            print(f"requeued {spool.retry(args.id or (), dead=args.dead, study_uid=args.study)} instance(s)")
            if not args.id:
                copies = Copies(spool).retry(dead=args.dead, study_uid=args.study)
                if copies:
                    print(f"requeued {copies} route copies")
        elif args.action == "discard":
            counts = spool.discard(args.study, dry_run=not args.yes)
            taken = counts["queued"] + counts["failed"] + counts["dead"]
            detail = f"queued {counts['queued']}, failed {counts['failed']}, dead {counts['dead']}"
            if counts["copies"]:
                detail += f"; and {counts['copies']} route copies of its delivered instances"
                if counts["copies_sending"]:
                    detail += f" ({counts['copies_sending']} being sent now: not tried again if that fails)"
            if args.yes:
                print(f"discarded {taken} undelivered instance(s) of study {args.study} ({detail})")
                _audit_discard(config, args.study, f"spool discard: {taken} undelivered instance(s) withdrawn ({detail})")
            else:
                print(f"would discard {taken} undelivered instance(s) of study {args.study} ({detail}); add --yes to do it")
            if counts["sending"]:
                print(f"{counts['sending']} instance(s) of it are being sent now and were left alone: run again once"
                      " they are delivered or back in the queue", file=sys.stderr)
                return 1
        elif args.action == "export":
            return _export(config, spool, args)
        elif args.action == "purge":
            if not args.delivered:
                print("spool purge: only --delivered instances can be purged", file=sys.stderr)
                return 2
            print(f"purged {spool.purge_delivered(args.older_than)} delivered instance(s)")
    finally:
        spool.close()
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Where is my study: the spool's rows of it beside the archive's count, per series
    (`gateway.whereis`). Exit status 0 whatever it finds; 1 only when the archive could
    not be asked, so a script can tell "not there" from "could not look"."""
    from gateway.spool.study import discarded_at, study_in_spool
    from gateway.whereis import archive_view, format_report, report

    if not is_valid_uid(args.study_uid):
        print(f"study: {args.study_uid!r} is not a UID (digits and dots, at most 64 characters)", file=sys.stderr)
        return 2
    config = _load(args.config)
    spool = Spool(config.spool)
    try:
        in_spool = study_in_spool(spool.db, args.study_uid)
        discarded = discarded_at(spool.db, args.study_uid)
    finally:
        spool.close()
    archive = None if args.no_archive else asyncio.run(archive_view(config, args.study_uid))
    data = report(args.study_uid, in_spool, archive, discarded)
    print(json.dumps(data, indent=2) if args.json else format_report(data, config.upstream.type))
    return 1 if archive is not None and archive.error else 0


def cmd_peers(args: argparse.Namespace) -> int:
    """The configured peers (AE title, address, what each may do) and, with ``--echo``,
    whether each answers a C-ECHO from the gateway's AE title. Exit status 1 when an
    echoed peer did not answer Success."""
    config = _load(args.config)
    peers = [p for p in config.dimse.peers if not args.ae_titles or p.ae_title in args.ae_titles]
    unknown = sorted(set(args.ae_titles) - {p.ae_title for p in peers})
    if unknown:
        print(f"peers: not in [[dimse.peers]]: {', '.join(unknown)}", file=sys.stderr)
        return 2
    results: dict[str, tuple[bool, str]] = {}
    if args.echo:
        from gateway.dimse.verification import echo_peer

        async def echo_all() -> None:
            for peer in peers:
                results[peer.ae_title] = await echo_peer(config, peer, args.timeout)

        asyncio.run(echo_all())
    rows: list[dict[str, Any]] = [
        {
            "ae_title": p.ae_title, "host": p.host, "port": p.port, "permissions": sorted(p.permissions),
            "any_host": p.any_host, "max_associations": p.max_associations, "tls": p.tls,
            **({"echo": {"ok": results[p.ae_title][0], "detail": results[p.ae_title][1]}} if args.echo else {}),
        }
        for p in peers
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{config.dimse.ae_title} on port {config.dimse.port}; "
              f"{'only these peers may associate' if config.dimse.require_known_peers else 'any AE title may associate'}")
        for row in rows:
            print(f"{row['ae_title']:<16}  {row['host']}:{row['port']:<5}  {','.join(row['permissions'])}"
                  + ("  from any host" if row["any_host"] else "") + ("  called over TLS" if row["tls"] else ""))
            if args.echo:
                print(f"{'':<16}  {'ok' if row['echo']['ok'] else 'FAILED'}: {row['echo']['detail']}")
    return 1 if any(not ok for ok, _ in results.values()) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", required=True, help="path to the TOML configuration")
        return p

    run = with_config(sub.add_parser("run", help="run the gateway in the foreground"))
    run.add_argument("--log-format", choices=FORMATS, default="text", help="text lines, or one JSON object per line")
    run.set_defaults(func=cmd_run)
    check = with_config(sub.add_parser("check-config", help="validate a configuration file"))
    check.add_argument(
        "--online", action="store_true",
        help="also send the archive one search with the configured credentials, and fetch the OpenID provider's keys",
    )
    check.set_defaults(func=cmd_check_config)

    archive = sub.add_parser("archive", help="maintain the embedded archive")
    archive_sub = archive.add_subparsers(dest="action", required=True)
    reindex = with_config(
        archive_sub.add_parser("reindex", help="rebuild the embedded archive's index from its files (the daemon stopped)")
    )
    reindex.set_defaults(func=cmd_archive)
    spool = sub.add_parser("spool", help="inspect and manage the spool")
    spool_sub = spool.add_subparsers(dest="action", required=True)
    status = with_config(spool_sub.add_parser("status", help="counts per state"))
    status.add_argument("--json", action="store_true")
    listing = with_config(spool_sub.add_parser("list", help="list spooled instances"))
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--study", metavar="UID", help="only this study's instances")
    listing.add_argument("--series", metavar="UID", help="only this series' instances")
    listing.add_argument("--instance", metavar="UID", help="only rows of this SOP Instance UID")
    listing.add_argument("--calling-ae", metavar="AE", help="only instances this AE title sent")
    listing.add_argument("--called-ae", metavar="AE", help="only instances sent to this AE title of the gateway's")
    listing.add_argument("--since", type=parse_duration, help="only instances received in the last 30m, 12h, 7d...")
    listing.add_argument(
        "--route", metavar="AE", help="the copies a route owes this destination instead (--state: the copy's state)"
    )
    listing.add_argument("--json", action="store_true")
    retry = with_config(spool_sub.add_parser("retry", help="requeue dead or failed instances (and routes' copies)"))
    retry.add_argument("--dead", action="store_true", help="requeue every dead instance and dead route copy")
    retry.add_argument("--id", type=int, nargs="+", help="requeue these spool ids")
    retry.add_argument("--study", metavar="UID", help="requeue the study's dead and failed instances and route copies")
    discard = with_config(
        spool_sub.add_parser("discard", help="withdraw a study's undelivered instances so they are never sent")
    )
    discard.add_argument("--study", metavar="UID", required=True)
    discard.add_argument("--yes", action="store_true", help="do it (without: only say what would go)")
    export = with_config(
        spool_sub.add_parser("export", help="copy instances out of the spool as Part 10 files (e.g. dead ones, to inspect)")
    )
    export.add_argument("--to", type=Path, required=True, metavar="DIR", help="created 0700 if missing; files are 0600")
    export.add_argument("--id", type=int, nargs="+", help="these spool ids")
    export.add_argument("--study", metavar="UID", help="the study's instances still in the spool")
    export.add_argument("--dead", action="store_true", help="every dead instance")
    purge = with_config(spool_sub.add_parser("purge", help="delete delivered instances"))
    purge.add_argument("--delivered", action="store_true", required=True)
    purge.add_argument(
        "--older-than", type=parse_duration, default=0.0, help="e.g. 7d, 12h (default: all)"
    )
    spool.set_defaults(func=cmd_spool)
    peers = with_config(sub.add_parser("peers", help="the configured peers; --echo checks each answers C-ECHO"))
    peers.add_argument("ae_titles", metavar="AE", nargs="*", help="only these peers (default: all)")
    peers.add_argument("--echo", action="store_true", help="send each a C-ECHO from our AE title")
    peers.add_argument("--timeout", type=float, default=10.0, help="seconds per step of each echo (default 10)")
    peers.add_argument("--json", action="store_true")
    peers.set_defaults(func=cmd_peers)
    study = with_config(
        sub.add_parser("study", help="where is a study: its series in the spool and in the archive")
    )
    study.add_argument("study_uid", metavar="STUDY_UID")
    study.add_argument("--no-archive", action="store_true", help="only what the spool holds; do not ask the archive")
    study.add_argument("--json", action="store_true")
    study.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (SpoolDatabaseUnreadable, ArchiveIndexUnreadable) as exc:  # any command that reads them
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
