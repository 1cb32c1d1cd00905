"""Admission control: decide whether the node may accept new data now, from the free space of every file system the
node writes to (node.disks: the spool root, results, incoming, ``data_dir``, the SQLite database's folder — each file
system once; a floor and a hard reserve, judged on the fullest) and the depth of the job queue (a ceiling).

Each file system's floor and reserve are the larger of the configured bytes and percent of its size (`thresholds`).
The bytes apply in full to the spool's file system, where instances accumulate (room for series in progress to
finish). On one that holds no spool — ``results``, ``incoming`` (a transfer's temporary file, gone once it is
spooled) or the database's folder on a small volume of their own — the bytes are capped at `OTHER_FLOOR_SHARE` /
`OTHER_RESERVE_SHARE` of its size, so a 1 GiB volume is judged on 205 / 51 MiB rather than on a 2 GiB floor it
can never meet (which paused intake for good); from 10 GiB up the bytes apply in full there too.

`Admission.check(series_uid)` is called by `Ingestor.accept` — the one boundary both front doors share — once an
instance's series is known and before anything is written. It returns, or raises `AdmissionRefusedError`
(C-STORE 0xA700 Out of Resources; a STOW-RS part's FailureReason 0xA700):

  free space below the hard reserve             everything is refused (``disk_reserve``)
  free space below the floor, or the queue       new series are refused (``disk_floor`` / ``queue_ceiling``); a
  holding ``max_queue_depth`` jobs               series still being received — in the index as receiving or
                                                 reopened, its last instance within ``active_series_seconds`` — may
                                                 go on, so a scanner mid-series can finish
  otherwise                                      accepted

STOW-RS asks `refuses_all()` before it reads a request body (503 with Retry-After).

Cost per instance: free space (one ``os.stat`` per folder, one ``os.statvfs`` per file system) and queue depth
(one SQL count) are read at most every ``check_interval_seconds``; in between, every stored instance's size is
subtracted from the free space the spool's file system had at the last read, and when that estimate crosses a
threshold the disks are read again at once, so a burst cannot run past the floor unnoticed. Only while the node
is paused does a check look its series up in the index (the answer kept for the same interval). Measured
(``benchmarks/admission.py``, 2 shared cores): ~1–6 µs per instance while accepting, one re-read of the disks
~50–150 µs (five folders, one or two file systems), ~5–14 µs amortized with the re-reads at 200 images/s — well
under 1 % of the ~5 ms an image costs.

Pausing and resuming need no restart or admin action: every check, every metrics scrape and the service's 0.5 s
tick re-evaluate. A band of `RESUME_BAND` above each disk threshold keeps a node at the edge from flapping
(paused below X, resumed at X × 1.05 or more); the queue resumes below its ceiling. Each transition logs
``admission_paused`` / ``admission_resumed`` with the reason and the numbers; refusals are logged as
``admission_refused`` at most once per `REFUSAL_LOG_SECONDS` per reason with the count since, never one line per
instance (the front doors count each one in Prometheus).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import disks
from node.config import AdmissionSection
from node.disks import SPOOL, Volume, statvfs_usage
from node.errors import AdmissionRefusedError
from node.index import Index
from node.logs import get_logger
from node.states import AdmissionReason, SeriesState

RESUME_BAND = 0.05  # resume only once free space is 5 % above the threshold that paused
REFUSAL_LOG_SECONDS = 10.0  # at most one admission_refused line per reason this often
OTHER_FLOOR_SHARE = 0.20  # on a file system without the spool the floor's bytes are at most this share of its size
OTHER_RESERVE_SHARE = 0.05  # ... and the reserve's this share (below the floor's: the reserve stays the lower)
_SEEN_MAX = 4096  # series answers kept while paused (then forgotten all at once)
_RECEIVING = frozenset({SeriesState.RECEIVING.value, SeriesState.REOPENED.value})

DiskUsage = Callable[[Path], tuple[int, int]]  # (free bytes an unprivileged writer may use, total bytes)
SeriesActivity = Callable[[str], float | None]  # last instance's epoch time of a series still receiving, else None


def below_reserve(path: Path, settings: AdmissionSection, spool_dir: Path) -> bool:
    """Whether the file system holding ``path`` has less free than its hard reserve as admission judges that file
    system (`thresholds`: the reserve's bytes in full where ``spool_dir`` is, capped at `OTHER_RESERVE_SHARE` of a
    file system without it): where a data set streamed to a temporary file (a spilling C-STORE, a STOW-RS body)
    stops and the worker stops writing results, so large transfers cannot fill the disk under the spool and the
    index before admission sees them — and a small ``data_dir`` volume beside a spool volume is not held to a
    reserve admission does not apply to it (which refused every STOW-RS request and paused the worker while
    admission accepted). Raises OSError."""
    free, total = statvfs_usage(path)
    spool = disks.locate(path)[0] == disks.locate(spool_dir)[0]
    return free < thresholds(settings, total, spool=spool)[1]


def _larger(nbytes: int, percent: float, total: int) -> int:
    """The larger of ``nbytes`` and ``percent`` of ``total`` bytes: how the floor and the reserve are set."""
    return max(nbytes, math.ceil(total * percent / 100))


class ReserveWatch:
    """`below_reserve` for one folder, read on each call, with the transitions logged once each (``paused`` /
    ``resumed`` events on ``log``); a free space that cannot be read counts as not down to the reserve."""

    def __init__(self, path: Path, spool_dir: Path, log: Any, paused: str, resumed: str) -> None:
        self.path, self.spool_dir, self.log, self.events = path, spool_dir, log, (paused, resumed)
        self.down = False

    def full(self, settings: AdmissionSection) -> bool:
        try:
            down = below_reserve(self.path, settings, self.spool_dir)
        except OSError:
            down = False
        if down != self.down:
            self.down = down
            if down:
                self.log.error(self.events[0], reason=AdmissionReason.DISK_RESERVE.value, folder=str(self.path))
            else:
                self.log.info(self.events[1], reason=AdmissionReason.DISK_RESERVE.value)
        return down


def index_activity(index: Index) -> SeriesActivity:
    """A `SeriesActivity` over the index: the series' last_received_at while it is receiving or reopened."""

    def activity(series_uid: str) -> float | None:
        row = index.get_series(series_uid)
        if row is None or str(row.state) not in _RECEIVING:
            return None
        return float(row.last_received_at)

    return activity


def thresholds(settings: AdmissionSection, total: int, *, spool: bool = True) -> tuple[int, int]:
    """(floor, reserve) in free bytes for a file system of ``total`` bytes: the larger of bytes and percent, the
    bytes capped at `OTHER_FLOOR_SHARE` / `OTHER_RESERVE_SHARE` of ``total`` unless it holds the ``spool``."""
    floor_bytes, reserve_bytes = settings.min_free_bytes, settings.reserve_free_bytes
    if not spool:
        floor_bytes = min(floor_bytes, math.floor(total * OTHER_FLOOR_SHARE))
        reserve_bytes = min(reserve_bytes, math.floor(total * OTHER_RESERVE_SHARE))
    return (_larger(floor_bytes, settings.min_free_percent, total),
            _larger(reserve_bytes, settings.reserve_free_percent, total))


def pressure(
    settings: AdmissionSection, free: int | None, total: int | None, depth: int | None,
    previous: frozenset[AdmissionReason] = frozenset(), *, spool: bool = True,
) -> frozenset[AdmissionReason]:
    """The reasons to refuse now (empty: accept everything). ``free``/``total``/``depth`` None: unknown, no
    pressure from it. ``previous`` is the set in force, for the resume band; ``spool``: whether the file system
    holds the spool (`thresholds`). Pure."""
    if not settings.enabled:
        return frozenset()
    out: set[AdmissionReason] = set()
    if free is not None and total is not None:
        floor, reserve = thresholds(settings, total, spool=spool)
        for reason, limit in ((AdmissionReason.DISK_RESERVE, reserve), (AdmissionReason.DISK_FLOOR, floor)):
            if reason in previous:
                limit = math.ceil(limit * (1 + RESUME_BAND))
            if free < limit:
                out.add(reason)
    if depth is not None and settings.max_queue_depth and depth >= settings.max_queue_depth:
        out.add(AdmissionReason.QUEUE_CEILING)
    return frozenset(out)


def disk_pressure(settings: AdmissionSection, volumes: tuple[Volume, ...],
                  previous: frozenset[AdmissionReason] = frozenset()) -> tuple[frozenset[AdmissionReason], Volume | None]:
    """The disk reasons to refuse now — each file system judged against thresholds of its own size (the spool's
    with the bytes in full, `thresholds`), their union — and the file system that decides: the one down to the hard reserve, else below the floor, else the nearest
    its floor (None: none could be read). ``previous`` as for `pressure`. Pure."""
    reasons: set[AdmissionReason] = set()
    worst: Volume | None = None
    worst_key = (0, 0.0)
    for v in volumes:
        if v.free is None or v.total is None:
            continue
        spool = v.holds(SPOOL)
        mine = pressure(settings, v.free, v.total, None, previous, spool=spool)
        reasons |= mine
        key = (2 if AdmissionReason.DISK_RESERVE in mine else 1 if mine else 0,
               -v.free / max(thresholds(settings, v.total, spool=spool)[0], 1))
        if worst is None or key > worst_key:
            worst, worst_key = v, key
    return frozenset(reasons), worst


def headroom(settings: AdmissionSection, volumes: tuple[Volume, ...], paused: frozenset[AdmissionReason]) -> float:
    """Bytes the spool may take before its file system crosses a disk threshold not in ``paused``: once the
    bytes stored since the last read (`Admission.written`) exceed it, the disks are read again at once."""
    room = math.inf
    if not settings.enabled:
        return room
    for v in [v for v in volumes if v.holds(SPOOL)] or volumes:
        if v.free is None or v.total is None:
            continue
        floor, reserve = thresholds(settings, v.total, spool=v.holds(SPOOL))
        for reason, limit in ((AdmissionReason.DISK_RESERVE, reserve), (AdmissionReason.DISK_FLOOR, floor)):
            if reason not in paused:
                room = min(room, v.free - limit)
    return room


@dataclass(frozen=True)
class AdmissionState:
    """One evaluation: what is refused now and the numbers it was decided on (None: could not be read)."""

    paused: frozenset[AdmissionReason]
    free_bytes: int | None
    total_bytes: int | None
    queue_depth: int | None
    settings: AdmissionSection
    read_at: float  # epoch seconds
    path: Path | None = None  # the file system the disk figures are of (`disk_pressure`'s deciding one)
    volumes: tuple[Volume, ...] = ()  # every file system the node writes to, as read
    headroom: float = math.inf  # `headroom` of the spool's file system at this read
    spool: bool = True  # whether the file system at ``path`` holds the spool (`thresholds`)

    @property
    def floor_bytes(self) -> int | None:
        return None if self.total_bytes is None else thresholds(self.settings, self.total_bytes, spool=self.spool)[0]

    @property
    def reserve_bytes(self) -> int | None:
        return None if self.total_bytes is None else thresholds(self.settings, self.total_bytes, spool=self.spool)[1]

    @property
    def refuses_all(self) -> bool:
        return AdmissionReason.DISK_RESERVE in self.paused

    def numbers(self) -> dict[str, Any]:
        """The figures a log line or a report carries."""
        return {
            "path": None if self.path is None else str(self.path),
            "free_bytes": self.free_bytes, "total_bytes": self.total_bytes, "floor_bytes": self.floor_bytes,
            "reserve_bytes": self.reserve_bytes, "queue_depth": self.queue_depth,
            "max_queue_depth": self.settings.max_queue_depth or None,
        }

    def as_dict(self) -> dict[str, Any]:
        """For /readyz, the status page and `pacsnode status`: ``accepting`` is "all", "series in progress" or
        "nothing"."""
        accepting = "nothing" if self.refuses_all else "series in progress" if self.paused else "all"
        return {
            "enabled": self.settings.enabled, "accepting": accepting, "paused": sorted(r.value for r in self.paused),
            **self.numbers(), "retry_after_seconds": self.settings.retry_after_seconds, "read_at": self.read_at,
            "file_systems": [v.as_dict() for v in self.volumes],
        }


def decide(settings: AdmissionSection, volumes: tuple[Volume, ...], depth: int | None,
           previous: frozenset[AdmissionReason], read_at: float) -> AdmissionState:
    """The state for what was read: the disk figures of the deciding file system, the pressure over all. Pure."""
    disk, worst = disk_pressure(settings, volumes, previous)
    paused = disk | pressure(settings, None, None, depth, previous)
    return AdmissionState(
        paused=paused, free_bytes=None if worst is None else worst.free,
        total_bytes=None if worst is None else worst.total, queue_depth=depth, settings=settings, read_at=read_at,
        path=None if worst is None else worst.path, volumes=volumes, headroom=headroom(settings, volumes, paused),
        spool=worst is None or worst.holds(SPOOL),
    )


def evaluate(settings: AdmissionSection, data_dir: Path, queue_depth: Callable[[], int],
             disk_usage: DiskUsage = statvfs_usage, *, paths: Mapping[str, Path] | None = None) -> AdmissionState:
    """A one-off evaluation, logging nothing (``pacsnode status``: the figures the node reads, decided afresh —
    within the resume band above a threshold the running node may still be paused) over ``paths``
    (`node.disks.node_folders`; default: `node.disks.folders` of ``data_dir``). Raises what the reads raise."""
    volumes = tuple(disks.measure(paths or disks.folders(data_dir), disk_usage, strict=True))
    depth = queue_depth() if settings.enabled and settings.max_queue_depth else None
    return decide(settings, volumes, depth, frozenset(), time.time())


class Admission:
    """Admission decisions over the file systems a node writes to and one job queue; thread-safe (every receiving
    thread calls `check`). ``paths`` are those folders by role (`node.disks.node_folders`; default:
    `node.disks.folders` of ``data_dir``); ``queue_depth`` is e.g. `JobQueue.depth`; ``series_activity`` tells
    whether a series is still being received (`index_activity`; None: no series counts as in progress);
    ``disk_usage``, ``locate`` (`node.disks.locate`), ``clock`` (monotonic) and ``wall_clock`` (epoch, as the
    index's times) are seams for tests."""

    def __init__(
        self,
        settings: AdmissionSection,
        data_dir: Path,
        *,
        queue_depth: Callable[[], int],
        series_activity: SeriesActivity | None = None,
        paths: Mapping[str, Path] | None = None,
        disk_usage: DiskUsage = statvfs_usage,
        locate: disks.Locate = disks.locate,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not callable(queue_depth):
            raise TypeError(f"queue_depth must be callable, not {type(queue_depth).__name__}")
        self._settings = settings
        self.data_dir = Path(data_dir)
        self.paths = dict(paths or disks.folders(self.data_dir))
        self._queue_depth = queue_depth
        self._activity = series_activity
        self._disk_usage = disk_usage
        self._locate = locate
        self._clock = clock
        self._wall = wall_clock
        self._log = get_logger(component="admission")
        self._lock = threading.Lock()  # guards the fields below; held only for quick updates
        self._refreshing = threading.Lock()  # one refresh at a time; receiving threads never wait on it
        self._state: AdmissionState | None = None
        self._disk_read_at = -math.inf
        self._depth_read_at = -math.inf
        self._written = 0  # bytes stored since the last disk read
        self._refused: dict[AdmissionReason, int] = {}  # per reason, during the current pause
        self._unlogged: dict[AdmissionReason, int] = {}
        self._logged_at: dict[AdmissionReason, float] = {}
        self._read_errors: set[str] = set()
        self._seen: dict[str, tuple[float, bool]] = {}  # series → (until, in progress), while paused

    @property
    def settings(self) -> AdmissionSection:
        return self._settings

    def apply_config(self, settings: AdmissionSection) -> None:
        """Swap in new settings (hot reload); they apply from the next check, which re-evaluates at once."""
        with self._lock:
            self._settings = settings
            self._disk_read_at = self._depth_read_at = -math.inf

    # -- decisions ----------------------------------------------------------------------------------------------
    def check(self, series_uid: str) -> None:
        """Return if an instance of ``series_uid`` may be stored now, else raise `AdmissionRefusedError` (0xA700)."""
        state = self.state()
        if not state.paused:
            return
        if state.refuses_all:
            raise self._refusal(AdmissionReason.DISK_RESERVE, series_uid, state)
        if self._in_progress(series_uid, state.settings):
            return
        reason = AdmissionReason.DISK_FLOOR if AdmissionReason.DISK_FLOOR in state.paused else AdmissionReason.QUEUE_CEILING
        raise self._refusal(reason, series_uid, state)

    def refuses_all(self) -> AdmissionRefusedError | None:
        """The refusal a whole request gets before its body is read (free space below the hard reserve), or
        None. Logged like an instance's refusal; the front door counts it."""
        state = self.state()
        return self._refusal(AdmissionReason.DISK_RESERVE, None, state) if state.refuses_all else None

    def written(self, nbytes: int) -> None:
        """``nbytes`` were just stored: the free-space estimate goes down by as much until the next disk read."""
        with self._lock:
            self._written += nbytes

    # -- state --------------------------------------------------------------------------------------------------
    def state(self) -> AdmissionState:
        """The decision in force, re-evaluated when ``check_interval_seconds`` passed or the bytes written since
        the last read would cross a threshold."""
        state = self._state
        if state is None:
            return self.refresh()
        interval = self._settings.check_interval_seconds
        now = self._clock()
        due = now - self._disk_read_at >= interval or now - self._depth_read_at >= interval or (
            self._written > state.headroom)  # the estimate crossed a threshold on the spool's file system
        # While another thread refreshes, decide on the state in force rather than wait.
        if due and self._refreshing.acquire(blocking=False):
            try:
                return self._refresh_locked()
            finally:
                self._refreshing.release()
        return self._state or state

    def refresh(self) -> AdmissionState:
        """Read the disk now (and the queue depth when it is due), log any transition; returns the new state.
        Never raises: a figure that cannot be read is unknown and pauses nothing."""
        with self._refreshing:
            return self._refresh_locked()

    def report(self) -> dict[str, Any]:
        """`AdmissionState.as_dict` of the current state."""
        return self.state().as_dict()

    def paused_by_reason(self) -> dict[str, bool]:
        """Every `AdmissionReason` → whether it pauses admission now (the metrics gauge)."""
        paused = self.state().paused
        return {r.value: r in paused for r in AdmissionReason}

    def _refresh_locked(self) -> AdmissionState:
        settings = self._settings
        now = self._clock()
        previous = self._state
        with self._lock:
            written_before = self._written
        volumes = self._read_disk()
        with self._lock:
            self._written -= written_before  # what was written during the read may or may not be in it: kept
            self._disk_read_at = now
        depth = previous.queue_depth if previous is not None else None
        if previous is None or now - self._depth_read_at >= settings.check_interval_seconds:
            depth = self._read_depth() if settings.enabled and settings.max_queue_depth else None
            self._depth_read_at = now
        before = previous.paused if previous is not None else frozenset()
        state = decide(settings, volumes, depth, before, self._wall())
        with self._lock:
            self._state = state
        self._log_transitions(before, state)
        return state

    def _read_disk(self) -> tuple[Volume, ...]:
        try:
            volumes = tuple(disks.measure(self.paths, self._disk_usage, self._locate))
        except Exception as exc:  # noqa: BLE001 - whatever a substitute raises (an OSError is the volume's error)
            self._read_failed("disk", exc)
            return ()
        self._read_errors.discard("disk")
        for v in volumes:  # one unreadable file system leaves the others judged
            key = f"disk {v.path}"
            if v.error is None:
                self._read_errors.discard(key)
            elif key not in self._read_errors:
                self._read_errors.add(key)
                self._log.warning("admission_unknown", figure="disk", path=str(v.path), detail=v.error[:200])
        return volumes

    def _read_depth(self) -> int | None:
        try:
            depth = int(self._queue_depth())
        except Exception as exc:  # noqa: BLE001 - the database may be down; the receive path reports that itself
            self._read_failed("queue_depth", exc)
            return None
        self._read_errors.discard("queue_depth")
        return depth

    def _read_failed(self, what: str, exc: Exception) -> None:
        if what not in self._read_errors:  # once per failing spell, not per check
            self._read_errors.add(what)
            self._log.warning("admission_unknown", figure=what, error=type(exc).__name__,
                              detail=getattr(exc, "strerror", None) or str(exc)[:200])

    # -- refusals and events ------------------------------------------------------------------------------------
    def _in_progress(self, series_uid: str, settings: AdmissionSection) -> bool:
        """Whether ``series_uid`` is still being received; the answer is kept ``check_interval_seconds``, so a
        paused node looks a series up about twice a second, not once per instance."""
        if self._activity is None:
            return False
        now = self._clock()
        cached = self._seen.get(series_uid)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            last = self._activity(series_uid)
        except Exception as exc:  # noqa: BLE001 - cannot tell: the series counts as new
            self._read_failed("series_activity", exc)
            return False
        answer = last is not None and self._wall() - last <= settings.active_series_seconds
        if len(self._seen) >= _SEEN_MAX:
            self._seen.clear()
        self._seen[series_uid] = (now + settings.check_interval_seconds, answer)
        return answer

    def _refusal(self, reason: AdmissionReason, series_uid: str | None, state: AdmissionState) -> AdmissionRefusedError:
        """Note one refusal (logged at most every `REFUSAL_LOG_SECONDS` per reason) and return its error."""
        now = self._clock()
        since = total = 0
        with self._lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            log_now = now - self._logged_at.get(reason, -math.inf) >= REFUSAL_LOG_SECONDS
            if log_now:
                self._logged_at[reason] = now
                since, self._unlogged[reason] = self._unlogged[reason], 0
                total = self._refused[reason]
        what = "everything" if reason is AdmissionReason.DISK_RESERVE else "new series"
        if log_now:
            self._log.warning("admission_refused", reason=reason.value, series_uid=series_uid, refused=since,
                              refused_in_pause=total, **state.numbers())
        return AdmissionRefusedError(
            f"admission paused ({reason.value}): the node refuses {what} until "
            f"{'free space recovers' if reason is not AdmissionReason.QUEUE_CEILING else 'the job queue drains'}",
            reason=reason.value, retry_after=state.settings.retry_after_seconds,
        )

    def _log_transitions(self, before: frozenset[AdmissionReason], state: AdmissionState) -> None:
        for reason in sorted(state.paused - before):
            with self._lock:
                self._refused[reason] = 0
                self._unlogged[reason] = 0
                self._logged_at.pop(reason, None)
            self._log.warning("admission_paused", reason=reason.value, **state.numbers())
        for reason in sorted(before - state.paused):
            with self._lock:
                refused = self._refused.pop(reason, 0)
                self._unlogged.pop(reason, None)
            self._log.info("admission_resumed", reason=reason.value, refused_in_pause=refused, **state.numbers())


__all__ = ["Admission", "AdmissionState", "ReserveWatch", "below_reserve", "decide", "disk_pressure", "evaluate",
           "headroom", "index_activity", "pressure", "statvfs_usage", "thresholds"]
