"""What a running node re-reads on SIGHUP, told by the kernel (``/proc``), for `pacsnode config reload`.

The node reloads the file it was started with (``--config``, else ``$PACSNODE_CONFIG``, else the default), with its
own environment's ``PACSNODE_…`` overrides: not the file or the environment of whoever runs the reload command.
`running_node` reads both from ``/proc/<pid>`` and says whether that pid is a ``pacsnode serve`` at all: a pid file
left by a node killed with -9 can name a pid the kernel has since given to another program, which SIGHUP would
terminate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.config import ENV_PREFIX

PROGRAM_NAMES = frozenset({"pacsnode", "node.cli"})  # the console script, ``python -m node.cli``


@dataclass(frozen=True)
class RunningNode:
    """A ``pacsnode serve`` process: the config file it reloads (absolute) and its ``PACSNODE_…`` environment."""

    pid: int
    config_path: Path
    environ: dict[str, str]


class NotANodeError(Exception):
    """The pid is alive but is not ``pacsnode serve``; the message is its program's name only (another program's
    arguments can be anything, file names with patient names included)."""


def running_node(pid: int, default_config: Path,
                 parse_args: Callable[[Sequence[str]], str | None]) -> RunningNode | None:
    """The node at ``pid`` as ``/proc`` describes it; None where ``/proc`` does not say (not Linux, another user's
    process, the pid gone). ``parse_args(argv after the program)`` returns its ``--config`` value or None (the CLI's
    own parser, so abbreviations and ``--config=PATH`` read as the node read them). Raises `NotANodeError`."""
    proc = Path("/proc") / str(pid)
    try:
        argv = [os.fsdecode(a) for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        cwd = Path(os.readlink(proc / "cwd"))
        environ = _environ((proc / "environ").read_bytes())
    except OSError:
        return None
    start = next((i + 1 for i, arg in enumerate(argv) if Path(arg).name in PROGRAM_NAMES), None)
    if start is None or "serve" not in argv[start:]:
        raise NotANodeError(Path(argv[0]).name if argv else f"pid {pid}")
    named = parse_args(argv[start:])
    path = Path(named or environ.get("PACSNODE_CONFIG") or default_config)
    return RunningNode(pid, path if path.is_absolute() else cwd / path,
                       {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)})


def nodes_serving(path: Path, default_config: Path,
                  parse_args: Callable[[Sequence[str]], str | None]) -> list[RunningNode]:
    """Every ``pacsnode serve`` whose config file is ``path`` (as `running_node` reads it), less the role children of
    another (a forked child keeps its supervisor's command line): how `pacsnode config reload` finds a node where
    the pid file is not where the file says — the file's ``data_dir`` changed since the node started (restart-only,
    still reloadable), or the node's environment overrides it."""
    found: dict[int, RunningNode] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            node = running_node(int(entry.name), default_config, parse_args)
        except NotANodeError:
            continue
        if node is not None and same_file(node.config_path, path):
            found[node.pid] = node
    return [node for pid, node in found.items() if _parent(pid) not in found]


def _parent(pid: int) -> int | None:
    try:  # /proc/PID/stat: "pid (comm) state ppid ...", comm may hold spaces and parentheses
        return int((Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (by path where either cannot be read)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _environ(raw: bytes) -> dict[str, str]:
    pairs = (os.fsdecode(entry).partition("=") for entry in raw.split(b"\0") if b"=" in entry)
    return {name: value for name, _, value in pairs}
