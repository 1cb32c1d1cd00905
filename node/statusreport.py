"""`pacsnode status`: the report read from the database and the node's data folder (no running node needed).

`open_stages` opens the index, queue and dispatcher over the configured database; `build_report` gathers counts,
recent errors, destinations (reachability, backlog, commitment), admission and the role processes; `print_report`
writes it for a person (the CLI prints the dict as JSON with ``--json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from node.commitment import commit_problems
from node.config import NodeConfig
from node.db import create_engine_for
from node.dispatch import Dispatcher
from node.errors import ConfigError
from node.index import Index
from node.migrate import prepare
from node.processes import read_table
from node.queue import JobQueue
from node.reachability import destination_report


def open_stages(config: NodeConfig) -> tuple[Any, Any, Any]:
    """(Index, JobQueue, Dispatcher without senders) over ``config``'s database, its schema checked. A SQLite file
    that does not exist is refused (`ConfigError`), not created: the admin's shell read another database than the
    node's (a data_dir the node's own PACSNODE_ overrides change), and an empty report of a new file looked like a
    node that had received nothing."""
    url = make_url(config.database_url)
    if (url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
            and not Path(str(url.database)).is_file()):
        raise ConfigError(f"no database at {url.database}: the node has not run with this config, or it runs "
                              "with another data_dir or [database] url (its own PACSNODE_ overrides?)")
    engine = create_engine_for(config.database_url)
    # Never upgraded here, SQLite included: an older release's node may still serve on it (the new package installed,
    # the service not yet restarted), and its next process restart would refuse the schema - taken down by a query.
    prepare(engine, upgrade_older=False)
    return Index(engine), JobQueue(engine, config.queue), Dispatcher(config, engine, {})


def build_report(config: NodeConfig, stages: tuple[Any, Any, Any], errors: int) -> dict[str, Any]:
    """The report ``pacsnode status --json`` prints: counts, recent errors, destinations, admission, processes."""
    index, queue, dispatcher = stages
    deliveries: dict[str, dict[str, int]] = {}
    for (destination, state), n in sorted(dispatcher.counts().items()):
        deliveries.setdefault(destination, {})[state] = n
    report = {
        "series": index.series_counts(),
        "routes": index.route_counts(),
        "jobs": queue.counts(),
        "deliveries": deliveries,
        "job_errors": [dict(r._mapping) for r in queue.last_errors(errors)],
        "delivery_errors": [dict(r._mapping) for r in dispatcher.last_errors(errors)],
        "alerts": [dict(r._mapping) for r in queue.unreported(errors)],
        "destinations": destination_report(config, index.engine),
        "commitment_problems": commit_problems(index.engine, errors),
        "admission": _admission_report(config, queue),
        "processes": read_table(config.node.data_dir),
    }
    return report


def print_report(config: NodeConfig, report: dict[str, Any]) -> None:
    """The human-readable form of `build_report`'s report."""
    deliveries = report["deliveries"]
    print(f"node {config.node.ae_title}  database {config.redacted()['database']['effective_url']}")
    print("series:     " + (", ".join(f"{k} {v}" for k, v in sorted(report["series"].items())) or "none"))
    print("routes:     " + (", ".join(f"{k} {v}" for k, v in sorted(report["routes"].items())) or "none"))
    print("jobs:       " + (", ".join(f"{k} {v}" for k, v in sorted(report["jobs"].items())) or "none"))
    if not deliveries:
        print("deliveries: none")
    for destination, states in deliveries.items():
        print(f"deliveries to {destination}: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    print("admission:  " + _admission_line(report["admission"]))
    for line in _process_lines(report["processes"]):
        print(line)
    for line in _destination_lines(report["destinations"], config.dispatch.give_up_after_seconds):
        print(line)
    for row in report["alerts"]:
        print(f"ALERT job {row['id']} dead, series {row['series_uid']} v{row['version']}: no result and no "
              f"'processing failed' report reached the PACS queue ({row['last_error']})")
    for row in report["job_errors"]:
        print(f"job {row['id']} {row['state']} series {row['series_uid']} v{row['version']}: "
              f"{row['skip_reason'] or ''} {row['last_error']}")
    for row in report["delivery_errors"]:
        print(f"delivery {row['id']} {row['state']} to {row['destination']} series {row['series_uid']}: "
              f"{row['last_error']}")
    for row in report["commitment_problems"]:
        print(f"delivery {row['delivery_id']} to {row['destination']} series {row['series_uid']} "
              f"NOT COMMITTED ({row['state']}): {row['last_error']}")


def _process_lines(table: dict[str, Any]) -> list[str]:
    """One line per role process of a supervisor (``process_model = "processes"``); none in the threads model."""
    gone = " (supervisor not running)" if table.get("supervisor_gone") else ""
    return [f"process {p['name']}: pid {p['pid']} {'alive' if p['alive'] else 'NOT RUNNING'}, restarts "
            f"{p['restarts']}" + (f", last exit {p['last_exit']}" if p["last_exit"] is not None else "") + gone
            + "".join(f"; {problem}" for problem in p.get("problems", []))
            for p in table.get("processes", [])]


def _destination_lines(rows: list[dict[str, Any]], give_up_seconds: float) -> list[str]:
    """One line per destination: reachability (last check, last success, why not), backlog, dead, commitment; one
    with rows left but no longer in the config (a reload removed or renamed it) says so, and what becomes of them,
    instead of "not checked yet" or its last check from before."""
    import time

    def ago(ts: float | None) -> str:
        return "never" if ts is None else f"{max(0.0, time.time() - ts):.0f} s ago"

    lines = []
    for d in rows:
        if not d.get("configured", True):
            lines.append(f"destination {d['destination']}: NOT IN THE CONFIG (removed or renamed); backlog "
                         f"{d['backlog']} kept, not sent, dead-lettered {give_up_seconds:g} s after queueing unless "
                         f"the destination comes back; dead {d['dead']}, delivered {d['delivered']}")
            continue
        if d["reachable"] is None:
            reach = "not checked yet"
        elif d["reachable"]:
            reach = f"reachable (checked {ago(d['checked_at'])})"
        else:
            reach = f"UNREACHABLE: {d['reason']} (checked {ago(d['checked_at'])}, last success {ago(d['last_success_at'])})"
        commit = (f", committed {d['committed']}, uncommitted {d['uncommitted']}"
                  + "".join(f" ({s} {n})" for s, n in sorted(d["commit_states"].items()) if s != "committed")
                  if d["commitment"] else "")
        lines.append(f"destination {d['destination']} ({d['kind']}): {reach}; backlog {d['backlog']}, "
                     f"dead {d['dead']}, delivered {d['delivered']}{commit}")
    return lines


def _admission_report(config: NodeConfig, queue: Any) -> dict[str, Any]:
    """What admission control decides now, from the free space and queue depth the node reads."""
    from node.admission import evaluate
    from node.disks import node_folders

    try:
        return evaluate(config.admission, config.node.data_dir, queue.depth, paths=node_folders(config)).as_dict()
    except OSError as exc:
        return {"enabled": config.admission.enabled, "error": f"data directory unreadable: {exc.strerror or exc}"}


def _admission_line(a: dict[str, Any]) -> str:
    def gb(n: int | None) -> str:
        return "?" if n is None else f"{n / 1e9:.1f} GB"

    if a.get("error"):
        return str(a["error"])
    if not a["enabled"]:
        head = "off"
    elif a["paused"]:
        head = f"PAUSED ({', '.join(a['paused'])}): accepting {a['accepting']}"
    else:
        head = "accepting all"
    ceiling = a["max_queue_depth"] or "no ceiling"
    on = f" on {a['path']}" if a.get("path") else ""
    return (f"{head}; free {gb(a['free_bytes'])} of {gb(a['total_bytes'])}{on} (floor {gb(a['floor_bytes'])}, "
            f"reserve {gb(a['reserve_bytes'])}); queue {a['queue_depth']} (ceiling {ceiling})")
