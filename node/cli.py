"""The `pacsnode` command: parses the node's arguments and runs the subcommand (entry point `main`).

``serve`` runs a `node.service.Service` (the stages are wired there): every role in one process, one role's stages
with ``--role listener|worker|dispatcher``, or, with ``[node] process_model = "processes"``, the
`node.processes.ProcessSupervisor` of role children. Other subcommands: ``config check|reload``, ``audit``,
``echo``, ``send``, ``status`` (its report in `node.statusreport`), ``purge``, ``retry``, ``db upgrade|downgrade|current``;
``demo`` and the training side's (``phantom``, ``train``, ``evaluate`` ...) come from the ``pacsnode.commands`` entry points when their
packages and extras are installed. Exit codes: 0 success, 1 operation failed, 2 bad usage/config,
70 ``serve`` stopped because a supervised loop kept dying (let the process supervisor restart it).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if sys.argv[1:2] == ["serve"]:  # before the imports below (~0.4 s) and the start (~1 s): a SIGHUP meanwhile
    # waits for node.signals' handler, which unblocks it (a reload), instead of ending the node by SIGHUP's default
    # action - which systemd counts as a clean exit, so Restart=on-failure would leave the node down
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

from node.config import DEFAULT_CONFIG_PATH, NodeConfig, load_config  # noqa: E402
from node.errors import ConfigError, DatabaseError, SendError  # noqa: E402
from node.logs import configure_logging  # noqa: E402


def _config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return Path(args.config)
    env = os.environ.get("PACSNODE_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def _load(args: argparse.Namespace) -> NodeConfig:
    return load_config(_config_path(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from node.states import ProcessModel, Role

    faulthandler.enable(2)  # on descriptor 2, stderr; a fatal signal (systemd's watchdog abort: SIGABRT): every thread's stack
    if args.supervisor_pid is not None:  # a role child: its supervisor's running config, not the file as it reads now
        from node.config.snapshot import child_config

        config = child_config(_config_path(args))
    else:
        config = _load(args)
    configure_logging(args.log_level)
    role = Role(args.role)
    from node.service import check_can_start

    # a port is checked by the process that owns the listeners; a role child shares its supervisor's sockets
    check_can_start(config, ports=role is Role.ALL and args.supervisor_pid is None)
    if role is Role.ALL and config.node.process_model is ProcessModel.PROCESSES and args.supervisor_pid is None:
        return _serve_processes(args, config)
    if role is not Role.ALL:
        return _serve_role(args, config, role)
    from node.service import Service, leave

    service = Service(config)

    def announce() -> None:
        host, port = service.dimse.address
        tls = service.dimse.tls_address
        dimse = f"DIMSE {config.node.ae_title}@{host}:{port}" if config.tls.plaintext_dimse else "DIMSE"
        dimse += f" (DICOM TLS on {tls[1]})" if tls else ""
        scheme = "https" if config.tls.https else "http"
        print(
            f"pacsnode listening: {dimse}, "
            f"HTTP {scheme}://{config.node.http_host}:{service.http.port} (/dicomweb, /healthz, /readyz, /metrics); "
            f"data in {config.node.data_dir}; Ctrl-C to stop",
            flush=True,
        )

    return leave(service, service.run_forever(on_started=announce))  # 70 when a supervised loop kept dying


def _serve_processes(args: argparse.Namespace, config: NodeConfig) -> int:
    """Role all under ``process_model = "processes"``: the supervisor of role children (node.processes)."""
    from node.processes import ProcessSupervisor

    supervisor = ProcessSupervisor(config, _config_path(args), log_level=args.log_level)

    def announce() -> None:
        print(f"pacsnode supervising {', '.join(c.name for c in supervisor.children)}: DIMSE "
              f"{config.node.ae_title}@{config.node.host}:{config.node.port}, HTTP {config.node.http_host}:"
              f"{config.node.http_port}; data in {config.node.data_dir}; Ctrl-C to stop", flush=True)

    code = supervisor.run_forever(on_started=announce)
    from node.service import exit_now

    exit_now(code)  # the children have ended and the stop is audited; skip the interpreter's finalisation too


def _serve_role(args: argparse.Namespace, config: NodeConfig, role: Any) -> int:
    """``--role listener|worker|dispatcher``: that role's stages alone (a child of the supervisor, or on its own)."""
    from node.forking import die_with_parent
    from node.processes import read_table, write_report
    from node.roles import Identity
    from node.service import Service, leave

    supervised = args.supervisor_pid is not None
    if supervised:
        die_with_parent()
    service = Service(config, role=role, identity=Identity.of(config, role, args.child_index),
                      processes=(lambda: read_table(config.node.data_dir)) if supervised else None)
    service.parent_pid = args.supervisor_pid
    if supervised:  # its health in the supervisor's process table, for /readyz and `pacsnode status`
        name = f"{role.value}-{args.child_index}"
        service.on_tick = lambda: write_report(config.node.data_dir, name, service.problems())

    def announce() -> None:
        print(f"pacsnode {service.identity.node_id} running (pid {os.getpid()})", flush=True)

    return leave(service, service.run_forever(on_started=announce))


def cmd_config_check(args: argparse.Namespace) -> int:
    """Print the effective config; warn on stderr about an open, plaintext setup (exit 1 with ``--strict``)."""
    from node.auth import open_setup_warnings
    from node.tls import check_config

    config = _load(args)
    check_config(config)  # certificates and keys load (ConfigError naming the key otherwise)
    print(json.dumps(config.redacted(), indent=2))
    warnings = open_setup_warnings(config)
    for warning in warnings:
        print(f"pacsnode: warning: {warning}", file=sys.stderr)
    print(f"config OK: {config.source}" + (f" ({len(warnings)} warnings)" if warnings else ""), file=sys.stderr)
    return 1 if warnings and args.strict else 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the audit records since ``--since`` (one line each, or the records as JSON lines), after recording
    the reading itself (110101 Audit Log Used, `node.auditrecords`)."""
    from node.audit import AuditTrail, parse_since, read_records, summary_line
    from node.auditrecords import audit_log_used

    config = _load(args)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError:
        print(f"pacsnode: --since {args.since!r}: expected 90s, 15m, 1h, 2d or an ISO date/time", file=sys.stderr)
        return 2
    path = AuditTrail.file_for(config.audit, config.node.data_dir)
    trail = AuditTrail(config.audit, config.node.data_dir, ae_title=config.node.ae_title)
    try:  # who read the trail (the OS user), before it is read: a reader stopped half-way is recorded too
        audit_log_used(trail, query={"since": args.since, "events": args.event})
    finally:
        trail.close()
    n = 0
    for record in read_records(path, since):
        if args.event and record.get("event") not in args.event:
            continue
        # ASCII JSON: JSON escapes C0 controls only; C1 controls and bidi overrides a peer put in a record would
        # reach the terminal raw (found by review)
        print(json.dumps(record, ensure_ascii=True) if args.json else summary_line(record))
        n += 1
    if not args.json:
        print(f"{n} records from {path}", file=sys.stderr)
    return 0


def cmd_config_reload(args: argparse.Namespace) -> int:
    """Validate the file the running node will re-read, with the node's own environment overrides (refuse with the
    reason), then SIGHUP the node named by its pid file. Refuses a ``--config`` other than the node's own file (the
    node would reload its file, not that one) and a pid that is not a ``pacsnode serve`` (a stale pid file)."""
    from node.config.running import NotANodeError, nodes_serving, running_node, same_file

    path = _config_path(args)
    config = _load(args)
    pid_file = config.node.data_dir / "pacsnode.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):  # the node may run with another data_dir: found by its config file then
        serving = nodes_serving(path, DEFAULT_CONFIG_PATH, _serve_config_arg)
        if len(serving) != 1:
            print(f"pacsnode: no running node found ({pid_file} missing, unreadable or naming no process; "
                  f"{len(serving)} pacsnode serve processes run on {path})", file=sys.stderr)
            return 1
        pid = serving[0].pid
    try:
        node = running_node(pid, DEFAULT_CONFIG_PATH, _serve_config_arg)
    except NotANodeError as exc:
        print(f"pacsnode: pid {pid} from {pid_file} is not a pacsnode serve (it runs {exc}); the pid file is stale, "
              "nothing signalled", file=sys.stderr)
        return 1
    if node is None:
        print(f"pacsnode: warning: cannot read /proc/{pid}: checked {path} with this shell's environment; the node "
              "reloads the file it was started with", file=sys.stderr)
    else:
        named = args.config is not None or bool(os.environ.get("PACSNODE_CONFIG"))  # else: "the node's own file"
        if named and not same_file(path, node.config_path):
            print(f"pacsnode: the node (pid {pid}) runs on {node.config_path} and a reload re-reads that file, not "
                  f"{path}: edit {node.config_path}, or restart the node with --config {path}", file=sys.stderr)
            return 2
        load_config(node.config_path, environ=node.environ)  # its own PACSNODE_ overrides; ConfigError → exit 2
    os.kill(pid, signal.SIGHUP)
    print(f"config OK; reload signalled to pid {pid} (see its log for config_reloaded)")
    return 0


def _serve_config_arg(argv: Sequence[str]) -> str | None:
    """The ``--config`` a ``pacsnode`` command line (after the program) names, read by this CLI's own parser."""
    try:
        known, _ = build_parser(plugins=False).parse_known_args(list(argv))
    except SystemExit:  # argparse's way of refusing; a node that runs parsed its arguments, so it is not one
        return None
    return getattr(known, "config", None)


def _tls_args(args: argparse.Namespace, host: str) -> Any:
    """pynetdicom's (context, server hostname) for ``--tls`` (the peer's certificate checked against ``--ca-file``,
    the system's CAs without one, and ``host``), None without it."""
    if not args.tls:
        if args.ca_file or args.certificate or args.private_key:
            raise ConfigError("--ca-file, --certificate and --private-key apply only with --tls")
        return None
    from node.tls import client_context

    if (args.certificate is None) != (args.private_key is None):
        raise ConfigError("--certificate and --private-key go together")
    return client_context(args.ca_file, args.certificate, args.private_key, key="--tls"), host


def cmd_echo(args: argparse.Namespace) -> int:
    from node.scu import Peer, echo

    status = echo(Peer(args.host, args.port, called_ae=args.aec, calling_ae=args.aet,
                       tls_args=_tls_args(args, args.host)))
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def _open_db(args: argparse.Namespace) -> tuple[NodeConfig, Any]:
    from node.statusreport import open_stages

    config = _load(args)
    return config, open_stages(config)


def cmd_status(args: argparse.Namespace) -> int:
    from node.statusreport import build_report, print_report

    config, stages = _open_db(args)
    report = build_report(config, stages, args.errors)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(config, report)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from node.retention import Retention

    configure_logging("WARNING")  # the report goes to stdout; log lines stay off it
    config, (index, _, _) = _open_db(args)
    report = Retention(config, index.engine).purge(dry_run=args.dry_run)
    data = report.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb}: {data['instance_files']} received instances of {data['series']} series, "
          f"{data['result_files']} result files, {data['bytes_freed'] / 1e6:.1f} MB; disk "
          f"{data['disk_percent_before']} % → {data['disk_percent_after']} %")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from node.audit import AuditTrail

    config, (_, queue, dispatcher) = _open_db(args)
    n = dispatcher.retry(args.delivery, destination=args.destination)
    print(f"{n} deliveries queued again")
    jobs = queue.retry() if args.jobs else 0
    if args.jobs:
        print(f"{jobs} dead jobs queued again")
    audit = AuditTrail(config.audit, config.node.data_dir, ae_title=config.node.ae_title)
    try:  # who replayed what: the OS user running this command
        audit.dead_letters_replayed(via="pacsnode retry", deliveries=n, jobs=jobs, context={
            "delivery_ids": args.delivery, "destination": args.destination, "all_jobs": bool(args.jobs)})
    finally:
        audit.close()
    return 0


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def cmd_send(args: argparse.Namespace) -> int:
    from node.scu import Peer, read_files, send_datasets

    host, port = args.to
    datasets = read_files([Path(p) for p in args.paths])
    results = send_datasets(Peer(host, port, called_ae=args.aec, calling_ae=args.aet,
                                 tls_args=_tls_args(args, host)), datasets)
    failed = [r for r in results if not r.ok]
    for r in failed:
        status = "no response" if r.status is None else f"0x{r.status:04X}"
        print(f"failed {r.sop_uid}: {status}", file=sys.stderr)
    print(f"sent {len(results) - len(failed)}/{len(datasets)} instances to {args.aec}@{host}:{port}")
    return 0 if not failed and len(results) == len(datasets) else 1


def cmd_db(args: argparse.Namespace) -> int:
    """``db upgrade``: migrate the database to this release's schema (`node.migrate.upgrade`); ``db downgrade REV``:
    take it back to an older release's revision (`node.migrate.downgrade`); ``db current``: print its revision."""
    from node import migrate
    from node.db import create_engine_for

    engine = create_engine_for(_load(args).database_url)
    if args.db_command == "current":
        print(migrate.inspect(engine).describe())
        return 0
    before = migrate.downgrade(engine, args.revision) if args.db_command == "downgrade" else migrate.upgrade(engine)
    after = migrate.inspect(engine)
    print(f"schema {before.revision or before.state.value} -> {after.revision}" if before.revision != after.revision
          else f"schema already at {after.revision} (head)")
    return 0


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``plugins=False`` leaves out the ``pacsnode.commands`` subcommands (see `main`)."""
    parser = argparse.ArgumentParser(prog="pacsnode", description="pacs-ai-node: DICOM AI listener node")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help=f"config file (default: $PACSNODE_CONFIG or {DEFAULT_CONFIG_PATH})")
        return p

    def with_tls(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--tls", action="store_true", help="DICOM TLS (the peer's certificate must name the host)")
        p.add_argument("--ca-file", type=Path, help="PEM CAs the peer's certificate must chain to (default: the system's)")
        p.add_argument("--certificate", type=Path, help="PEM client certificate, for peers that require one")
        p.add_argument("--private-key", type=Path, help="its unencrypted PEM key")
        return p

    serve = with_config(sub.add_parser("serve", help="run the node"))
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--role", default="all", choices=["all", "listener", "worker", "dispatcher"],
                       help="run one role's stages (default all; see README 'Roles')")
    serve.add_argument("--child-index", type=int, default=0, help=argparse.SUPPRESS)  # nth process of its role
    serve.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)  # node.processes
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="inspect the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = with_config(config_sub.add_parser("check", help="validate and print the effective config"))
    check.add_argument("--strict", action="store_true", help="exit 1 when there are warnings (open or plaintext)")
    check.set_defaults(func=cmd_config_check)
    reload = with_config(config_sub.add_parser("reload", help="validate, then make the running node reload"))
    reload.set_defaults(func=cmd_config_reload)

    audit = with_config(sub.add_parser("audit", help="print the audit trail (who sent, queried, exported what)"))
    audit.add_argument("--since", help="90s, 15m, 1h, 2d, or an ISO date/time such as 2026-12-03T10:00 (UTC)")
    audit.add_argument("--event", action="append", help="only these events (instances_received, query, exported, ...)")
    audit.add_argument("--json", action="store_true", help="the records themselves, one JSON object per line")
    audit.set_defaults(func=cmd_audit)

    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("--aec", default="ANY-SCP", help="called AE title")
    echo.add_argument("--aet", default="PACSNODE-SCU", help="calling AE title")
    with_tls(echo).set_defaults(func=cmd_echo)

    send = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    send.add_argument("paths", nargs="+")
    send.add_argument("--to", required=True, type=_host_port, metavar="HOST:PORT")
    send.add_argument("--aec", default="PACSNODE", help="called AE title")
    send.add_argument("--aet", default="PACSNODE-SCU", help="calling AE title")
    with_tls(send).set_defaults(func=cmd_send)

    status = with_config(sub.add_parser("status", help="series, jobs and deliveries by state; last errors"))
    status.add_argument("--json", action="store_true")
    status.add_argument("--errors", type=int, default=10, help="how many recent errors to show")
    status.set_defaults(func=cmd_status)

    purge = with_config(sub.add_parser("purge", help="delete settled data as [retention] allows"))
    purge.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    purge.add_argument("--json", action="store_true")
    purge.set_defaults(func=cmd_purge)

    retry = with_config(sub.add_parser("retry", help="replay dead-lettered deliveries (and jobs with --jobs)"))
    # nargs "+": `--delivery $IDS` with $IDS empty is an error, never "every dead delivery" (that is no --delivery)
    retry.add_argument("--delivery", type=int, nargs="+", help="delivery ids (default: all dead)")
    retry.add_argument("--destination", help="only deliveries to this destination")
    retry.add_argument("--jobs", action="store_true", help="also re-queue dead jobs (one that sent a \"processing failed\" SR runs as the series' next version)")
    retry.set_defaults(func=cmd_retry)

    (db := sub.add_parser("db", help="the database schema: migrate it, show its revision")).set_defaults(func=cmd_db)
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    with_config(db_sub.add_parser("upgrade", help="migrate up to this release's schema"))
    with_config(db_sub.add_parser("current", help="print the schema revision and its state"))
    with_config(db_sub.add_parser("downgrade", help="back to REVISION, an older release's newest")).add_argument("revision")

    left_out = _register_plugins(sub) if plugins else []
    if left_out:
        parser.epilog = (f"Not installed here: {', '.join(left_out)} (pip install 'pacs-ai-node[training]' from a "
                         "clone of the repository adds the training and demo commands).")
    return parser


PLUGIN_GROUP = "pacsnode.commands"  # entry points: callables taking the subparsers object (demo, training)
_OWN_PACKAGES = ("node", "models", "training", "demo")
_PLUGIN_ORDER = ("demo", "training", "crossval")  # the order `pacsnode --help` lists them in


def _register_plugins(sub: Any) -> list[str]:
    """Add the subcommands that live outside the node — ``demo`` (`demo.cli`) and the training side's (`training.cli`,
    `training.crossval`) — through the ``pacsnode.commands`` entry points, so ``node/`` never imports them. A plugin
    whose package or extra (``[training]`` in the entry point) is not installed — the node-only image, ``pip
    install .`` — is left out and named in the list returned; an import error inside our own code is raised."""
    from importlib.metadata import entry_points

    def order(name: str) -> tuple[int, str]:
        return (_PLUGIN_ORDER.index(name) if name in _PLUGIN_ORDER else len(_PLUGIN_ORDER), name)

    left_out = []
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: order(e.name)):
        if not _extras_installed(entry.dist.name if entry.dist else None, entry.extras):
            left_out.append(entry.name)
            continue
        try:
            register = entry.load()
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if missing in _OWN_PACKAGES and exc.name != entry.module.split(".")[0] and exc.name != entry.module:
                raise
            left_out.append(entry.name)
            continue
        register(sub)
    return left_out


def _extras_installed(dist_name: str | None, extras: Sequence[str]) -> bool:
    """Whether every requirement of ``dist_name``'s ``extras`` is installed (no extras: True)."""
    if not extras or dist_name is None:
        return True
    from importlib.metadata import PackageNotFoundError, distribution, version

    from packaging.requirements import Requirement

    for line in distribution(dist_name).requires or ():
        req = Requirement(line)
        if req.marker is None or not any(req.marker.evaluate({"extra": extra}) for extra in extras):
            continue
        if req.name == dist_name:  # an extra naming other extras of this distribution
            if not _extras_installed(dist_name, sorted(req.extras)):
                return False
            continue
        try:
            version(req.name)
        except PackageNotFoundError:
            return False
    return True


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    """The subcommand names ``parser`` knows."""
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def main(argv: Sequence[str] | None = None) -> int:
    # The plugins' modules (training, demo) are imported only for their own subcommands and the top-level help:
    # loading them took ~1.3 s of CPU in every `pacsnode serve` process (the supervisor and each role child).
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(plugins=False)
    if not argv or argv[0] not in _subcommands(parser):  # a plugin's subcommand, --help, or a mistake
        parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pacsnode: config error: {exc}", file=sys.stderr)
        return 2
    except (SendError, DatabaseError) as exc:  # a schema refusal names the revision and the command to run
        print(f"pacsnode: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
