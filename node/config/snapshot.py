"""A validated `NodeConfig` as JSON and back, secrets included: how a process hands the config it runs to another.

`dump_snapshot(config)` is the config exactly as it runs — the file it was loaded from, its ``PACSNODE_*`` overrides
and relative paths already applied and resolved, secrets in clear (unlike `NodeConfig.redacted`) — and its
``source``; `load_snapshot(text)` validates it again and returns an equal object, without reading the file or the
environment. The text holds secrets: keep it out of argv, logs and world-readable files.

The supervisor of role processes (node.processes) puts its running config — the file as it last accepted it, its
restart-only settings — in each child's environment (`ENV`, `for_child`; /proc/PID/environ is its owner's alone),
and the child starts on it (`child_config`), never on the file as it reads now: a file the supervisor refused at a
reload (a typo saved, then SIGHUP) took down every child restarted after it, and a changed database or data_dir
split a restarted child off from the rest of the node. At a reload the supervisor validates the file, writes what
it accepted to `RELOAD_FILE` under the data folder (`write_reload_snapshot`: owner-only, atomic) and only then
forwards SIGHUP; each child reloads from there (`reload_snapshot`), not from the file: a file saved again between
the supervisor's reading and a child's (a second edit, a typo) had that child stay on the old config — refusing a
scanner the reload had just allowed — while the supervisor and the audit trail said the new one was applied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from node.config import NodeConfig, load_config
from node.errors import ConfigError

ENV = "PACS_AI_NODE_RUNNING_CONFIG"  # a supervisor's running config, for the role children it starts
RELOAD_FILE = Path("processes") / "running-config.json"  # under data_dir: what the supervisor's last reload accepted
# An exec'd child's environment takes one variable of at most 128 KiB (Linux MAX_ARG_STRLEN); a forked one any size.
MAX_EXEC_BYTES = 120 << 10


def _revealed(value: Any, dumped: Any) -> Any:
    """``dumped`` (a JSON-mode dump, where a secret reads ``**********``) with each secret of ``value`` (the same
    data dumped in Python mode, secrets as `SecretStr`) in clear."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {key: _revealed(v, d) for (_, v), (key, d) in zip(value.items(), dumped.items(), strict=True)}
    if isinstance(value, list | tuple):
        return [_revealed(v, d) for v, d in zip(value, dumped, strict=True)]
    return dumped


def dump_snapshot(config: NodeConfig) -> str:
    """``config`` as JSON that `load_snapshot` turns back into an equal `NodeConfig` (secrets in clear)."""
    data = _revealed(config.model_dump(), config.model_dump(mode="json"))
    return json.dumps({**data, "source": config.source}, separators=(",", ":"))


def load_snapshot(text: str) -> NodeConfig:
    """The `NodeConfig` `dump_snapshot` wrote. Raises `ConfigError` (without the text: it holds secrets)."""
    try:
        return NodeConfig.model_validate(json.loads(text))
    except (ValueError, TypeError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"not a config snapshot ({type(exc).__name__})") from exc


def for_child(config: NodeConfig, *, exec_child: bool) -> str:
    """`dump_snapshot(config)` for a child's `ENV`; `ConfigError` when too big for an exec'd child (``exec_child``)."""
    snapshot = dump_snapshot(config)
    size = len(snapshot.encode())
    if exec_child and size > MAX_EXEC_BYTES:
        raise ConfigError(f"the config is {size >> 10} KiB as JSON, more than an exec'd child's environment takes "
                          f"({MAX_EXEC_BYTES >> 10} KiB): set [node] child_start = \"fork\"")
    return snapshot


def child_config(path: Path, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """The config a role child starts on: its supervisor's running config from ``environ`` (`ENV`), or, without
    one (a role started by hand), the file at ``path``. Raises `ConfigError`."""
    raw = (os.environ if environ is None else environ).get(ENV)
    if not raw:
        return load_config(path, environ)
    try:
        return load_snapshot(raw)
    except ConfigError as exc:
        raise ConfigError(f"{ENV} does not hold the supervisor's config: {exc}") from exc


__all__ = ["ENV", "MAX_EXEC_BYTES", "child_config", "dump_snapshot", "for_child", "load_snapshot"]


def write_reload_snapshot(data_dir: Path, snapshot: str) -> None:
    """Put ``snapshot`` (`for_child`) at ``data_dir / RELOAD_FILE``, readable by its owner alone, atomically.
    Raises OSError."""
    path = data_dir / RELOAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(snapshot)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def reload_snapshot(data_dir: Path) -> NodeConfig:
    """The config a supervised child reloads to: what its supervisor's last reload accepted. Raises `ConfigError`."""
    path = data_dir / RELOAD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"the supervisor's accepted config {path} cannot be read: {exc.strerror}") from exc
    return load_snapshot(text)
