"""Metric logging for one run: ``RUN_DIR/metrics.jsonl`` and TensorBoard event files.

The run directory *is* the TensorBoard run (see shared/design/ARCHITECTURE.md): its event files
hold the run-level summaries (the HParams session, the config text, ``perf/...``). A ``route``
may send a tag to a sub-run instead, under another tag: the trainer sends every per-model metric
to ``RUN_DIR/tb/<model>/`` under a model-free tag (``distill.rundir.tensorboard_route``), so
TensorBoard draws one chart per metric with one line per model, within a run and across a sweep's
runs, and the HParams dashboard reads a model's final metrics from its sub-run (the metric's
``group``).

    from distill.run_logger import RunLogger
    with RunLogger(run_dir, hparams={"loss.temperature": 2.0, "student": "small"}) as logger:
        logger.log_text(0, "config", yaml_text, preformatted=True)
        for step in ...:
            logger.log(step, {"teacher/ce": ce, "student/distilled/kd": kd})
            logger.log_histogram(step, "teacher/expert_load/layer_0", load)
        logger.finish({"eval/student/distilled/bpb": bpb})

File formats
------------
``metrics.jsonl``: one JSON object per ``log`` call, ``{"step": step, **metrics}``, in call order.
Integers stay integers, everything else is a float.  Non-finite floats are written as the JSON
*strings* ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the file is always strict JSON);
:func:`read_metrics_jsonl` turns them back into floats.  Histograms, text and the final HParams
summary are TensorBoard-only.

TensorBoard: one scalar per tag (classic ``simple_value``, i.e. float32), histograms, text
(plugin ``text``, the tag is kept exactly) and the HParams plugin's three summaries:
``_hparams_/session_start_info`` (written when the logger opens, so a live or crashed run shows
its hyper-parameters), and ``_hparams_/experiment`` + ``_hparams_/session_end_info`` (written by
:meth:`RunLogger.finish`).

Restarts
--------
``resume_step=S``: the run restarts from a checkpoint at step ``S``.  Everything logged with a step
``> S`` is removed from the run directory *physically*: ``metrics.jsonl`` is rewritten atomically
(tmp file + ``os.replace``), and the existing event files are rewritten the same way without the
events whose step is ``> S``.  On top of that the new writer is opened with
``SummaryWriter(purge_step=S + 1)``, the TensorBoard convention (a ``SessionLog.START`` event at
``S + 1``).  The marker alone is not enough (checked with TensorBoard 2.21): the default loader,
the Rust data server, ignores it and only drops a tag's old points when that tag is logged
again (an eval tag logged at a purged step stays); the server's Python loader
(``--load_fast=false``) showed steps ``S+1..`` twice; only the stand-alone ``EventAccumulator``
honours it, and even that never purges plugin metadata (e.g. an old HParams summary).  HParams
summaries from earlier sessions are always removed, so the latest session's are the ones shown.

``resume_step=None`` means a fresh start: metrics a previous attempt left in ``run_dir`` (for
example one that crashed before its first checkpoint) are discarded, with a warning.  To append to
a finished run without dropping anything, pass its last step.

``enabled=False`` (every process but process 0 in a multi-host job): every method is a no-op;
nothing is created, written or deleted, and neither torch nor tensorboard is imported.

This module never imports TensorFlow; it uses ``torch.utils.tensorboard.SummaryWriter`` and the
protobufs that ship with the ``tensorboard`` package.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "METRICS_FILE",
    "Route",
    "RunLogger",
    "load_event_accumulator",
    "read_metrics_jsonl",
    "read_scalars",
]

METRICS_FILE = "metrics.jsonl"

_log = logging.getLogger(__name__)

# JSON spelling of non-finite floats (the tokens Python's json module would emit if allowed).
_NONFINITE_TO_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_JSON_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

Route = Callable[[str], tuple[str, str]]
"""tag -> (sub-run: a path relative to the run directory, "" for the run directory itself; its tag there)."""

_HPARAMS_PLUGIN = "hparams"
_REWRITE_TMP_PREFIX = ".distill-rewrite-"  # must not contain "tfevents": TensorBoard would read it
_EVENTS_NAME_RE = re.compile(r"tfevents\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# value conversion
# --------------------------------------------------------------------------------------------


def _as_step(step: Any) -> int:
    """An integer step from int / numpy / jax integer scalars; rejects floats and negatives."""
    try:
        value = operator.index(step)
    except TypeError:
        arr = np.asarray(step)
        if arr.size != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"step must be an integer scalar, got {step!r}") from None
        value = int(arr.reshape(()))
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return int(value)


def _as_number(tag: str, value: Any) -> int | float:
    """A Python int or float from a Python / numpy / jax scalar (any shape with one element)."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float):
        return value
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {tag!r} must be a scalar, got shape {arr.shape}")
    arr = arr.reshape(())
    if arr.dtype.kind in "iub":
        return int(arr)
    if arr.dtype.kind == "c":
        raise TypeError(f"metric {tag!r} is complex: {value!r}")
    try:
        return float(arr)  # also covers bfloat16 & co. (numpy kind 'V')
    except (TypeError, ValueError) as err:
        raise TypeError(f"metric {tag!r} is not a number: {value!r}") from err


def _json_number(value: int | float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return _NONFINITE_TO_JSON[repr(value)]
    return value


def _from_json_value(value: Any) -> Any:
    if isinstance(value, str) and value in _JSON_TO_NONFINITE:
        return _JSON_TO_NONFINITE[value]
    return value


def _hparam_value(value: Any) -> bool | float | str:
    """numbers -> float, bools -> bool, strings -> str, anything else (None, lists...) -> str."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | float | np.integer | np.floating):
        number = float(value)
        # protobuf's Struct cannot serialise non-finite numbers to JSON (the HParams plugin does).
        return number if math.isfinite(number) else _NONFINITE_TO_JSON[repr(number)]
    if isinstance(value, str):
        return value
    if value is None:
        return "None"
    if isinstance(value, list | tuple):
        try:
            return json.dumps(list(value))
        except (TypeError, ValueError):
            pass
    return str(value)


# --------------------------------------------------------------------------------------------
# run-directory surgery (resume)
# --------------------------------------------------------------------------------------------


def _event_dirs(run_dir: Path) -> list[Path]:
    """The run directory and its sub-runs: every folder below it holding event files (checkpoints
    and hidden folders are not searched)."""
    found = []
    for folder, subfolders, files in os.walk(run_dir):
        subfolders[:] = sorted(d for d in subfolders if d != "checkpoints" and not d.startswith("."))
        if folder == str(run_dir) or any("tfevents" in name for name in files):
            found.append(Path(folder))
    return found


def _event_files(run_dir: Path) -> list[Path]:
    """Event files directly in run_dir, in the order TensorBoard reads them (by name)."""
    if not run_dir.is_dir():
        return []
    return sorted(
        p for p in run_dir.iterdir()
        if p.is_file() and "tfevents" in p.name and not p.name.startswith(_REWRITE_TMP_PREFIX)
    )


def _atomic_write_bytes(path: Path, chunks) -> None:
    tmp = path.parent / f"{_REWRITE_TMP_PREFIX}{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _truncate_jsonl(path: Path, last_step: int) -> tuple[list[dict], int]:
    """Keeps the lines of metrics.jsonl with step <= last_step; returns (kept records, dropped)."""
    if not path.exists():
        return [], 0
    kept_lines, kept, dropped = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1  # a torn line (crash mid-write) or garbage: not a logged step
                continue
            if step <= last_step:
                kept_lines.append(line if line.endswith("\n") else line + "\n")
                kept.append(record)
            else:
                dropped += 1
    if dropped:
        _atomic_write_bytes(path, (line.encode("utf-8") for line in kept_lines))
    return kept, dropped


def _truncate_event_files(run_dir: Path, last_step: int) -> int:
    """Rewrites run_dir's event files without events of step > last_step and without any HParams
    plugin summary; deletes files left with no summary.  Returns the number of events dropped."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped_total = 0
    for path in _event_files(run_dir):
        kept: list[bytes] = []
        changed = False
        has_summary = False
        for raw in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(raw)
            if event.step > last_step:
                changed = True
                dropped_total += event.HasField("summary")
                continue
            if event.HasField("summary"):
                values = [v for v in event.summary.value
                          if v.metadata.plugin_data.plugin_name != _HPARAMS_PLUGIN]
                if len(values) != len(event.summary.value):
                    changed = True
                    if not values:
                        continue
                    del event.summary.value[:]
                    event.summary.value.extend(values)
                    raw = event.SerializeToString()
                has_summary = True
            kept.append(raw)
        if not has_summary:
            path.unlink()  # nothing left but a file_version / session_log header
            continue
        if changed:
            buf = io.BytesIO()
            writer = RecordWriter(buf)
            for raw in kept:
                writer.write(raw)
            _atomic_write_bytes(path, [buf.getvalue()])
    for stale in run_dir.glob(f"{_REWRITE_TMP_PREFIX}*.tmp"):
        stale.unlink()
    return dropped_total


def _wait_for_later_timestamp(run_dir: Path, max_wait_s: float = 2.0) -> None:
    """TensorBoard reads a run's event files in name order, and names start with the creation
    second: make sure the new file sorts after every existing one."""
    latest = -1
    for path in _event_files(run_dir):
        match = _EVENTS_NAME_RE.search(path.name)
        if match:
            latest = max(latest, int(match.group(1)))
    if latest < 0:
        return
    wait = latest + 1 - time.time()
    if wait > max_wait_s:
        _log.warning("event files in %s are from the future (clock skew?); the new file may be "
                     "read before them", run_dir)
    elif wait > 0:
        time.sleep(wait + 0.01)


# --------------------------------------------------------------------------------------------
# the logger
# --------------------------------------------------------------------------------------------


class RunLogger:
    """Writes a run's metrics to ``run_dir/metrics.jsonl`` and to TensorBoard files in run_dir.

    Args:
      run_dir: the run directory (created if needed).
      route: where a tag goes in TensorBoard (`Route`); default: every tag, as it is, in run_dir.
      hparams: hyper-parameters shown in TensorBoard's HParams dashboard; values are numbers,
        strings or bools, anything else is converted to a string (None -> "None", lists -> JSON).
        Use the same keys in every run of a sweep: the dashboard takes its columns from one run.
      enabled: False makes every method a no-op (non-zero processes of a multi-host job).
      resume_step: the run resumes from a checkpoint at this step: logged data with a larger step
        is removed.  None = a fresh start: data from a previous attempt in run_dir is removed.
      flush_secs: the TensorBoard writer flushes at least this often (the jsonl file is flushed
        at every ``log``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        hparams: Mapping[str, Any] | None = None,
        route: Route | None = None,
        enabled: bool = True,
        resume_step: int | None = None,
        flush_secs: float = 10.0,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = bool(enabled)
        self.resume_step = None if resume_step is None else int(resume_step)
        self.hparams = {str(k): _hparam_value(v) for k, v in dict(hparams or {}).items()}
        self.route = route or (lambda tag: ("", tag))
        self._writers: dict[str, Any] = {}  # sub-run -> its SummaryWriter, opened on its first summary
        self._flush_secs = flush_secs
        self._jsonl = None
        self._finished = False
        self._closed = False
        self._last: dict[str, tuple[int, float]] = {}  # tag -> (last step, last value)
        self._max_step: int | None = None
        if not self.enabled:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        cut = -1 if self.resume_step is None else self.resume_step
        kept, dropped_lines = _truncate_jsonl(self.run_dir / METRICS_FILE, cut)
        dropped_events = sum(_truncate_event_files(folder, cut) for folder in _event_dirs(self.run_dir))
        if self.resume_step is None and (kept or dropped_lines or dropped_events):
            _log.warning("%s holds metrics of an earlier attempt; starting fresh, they were "
                         "removed (pass resume_step to keep them)", self.run_dir)
        for record in kept:
            step = int(record["step"])
            for tag, value in record.items():
                if tag != "step":
                    self._note(tag, step, _from_json_value(value))
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        # Session start now, so a running or crashed run shows its hyper-parameters.
        self._writer("").file_writer.add_summary(self._session_start_summary(), max(self.resume_step or 0, 0))
        self._writer("").flush()

    # ---- helpers ----------------------------------------------------------------------------

    def _note(self, tag: str, step: int, value: float) -> None:
        self._last[tag] = (step, value)
        self._max_step = step if self._max_step is None else max(self._max_step, step)

    def _check_open(self) -> bool:
        if not self.enabled:
            return False
        if self._closed:
            raise RuntimeError(f"RunLogger({self.run_dir}) is closed")
        return True

    def _writer(self, subrun: str):
        """The SummaryWriter of a sub-run ("" the run directory), opened with the run's purge step."""
        if subrun not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.run_dir / subrun
            folder.mkdir(parents=True, exist_ok=True)
            _wait_for_later_timestamp(folder)
            purge_step = None if self.resume_step is None else self.resume_step + 1
            self._writers[subrun] = SummaryWriter(log_dir=str(folder), purge_step=purge_step,
                                                  flush_secs=self._flush_secs, max_queue=100)
        return self._writers[subrun]

    def _add_summary(self, values: list, step: int) -> None:
        """Summary values (tags already routed) to their sub-runs' event files."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        by_subrun: dict[str, list] = {}
        for subrun, value in values:
            by_subrun.setdefault(subrun, []).append(value)
        for subrun, routed in by_subrun.items():
            self._writer(subrun).file_writer.add_summary(Summary(value=routed), step)

    def _hparams_summary(self, tag: str, **plugin_data):
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2

        content = plugin_data_pb2.HParamsPluginData(**plugin_data)
        smd = metadata.create_summary_metadata(content)
        return Summary(value=[Summary.Value(tag=tag, metadata=smd)])

    def _session_start_summary(self):
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2

        ssi = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for key, value in self.hparams.items():
            if isinstance(value, bool):
                ssi.hparams[key].bool_value = value
            elif isinstance(value, float):
                ssi.hparams[key].number_value = value
            else:
                ssi.hparams[key].string_value = value
        return self._hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=ssi)

    def _experiment_summary(self, metric_names: list[tuple[str, str]]):
        from tensorboard.plugins.hparams import api_pb2, metadata

        types = {bool: "DATA_TYPE_BOOL", float: "DATA_TYPE_FLOAT64", str: "DATA_TYPE_STRING"}
        experiment = api_pb2.Experiment(
            time_created_secs=time.time(),
            hparam_infos=[
                api_pb2.HParamInfo(name=k, type=api_pb2.DataType.Value(types[type(v)]))
                for k, v in self.hparams.items()
            ],
            metric_infos=[
                api_pb2.MetricInfo(name=api_pb2.MetricName(group=group, tag=tag)) for group, tag in metric_names
            ],
        )
        return self._hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment)

    def _session_end_summary(self, status: str):
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        sei = plugin_data_pb2.SessionEndInfo(
            status=api_pb2.Status.Value(f"STATUS_{status.upper()}"), end_time_secs=time.time()
        )
        return self._hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=sei)

    # ---- public API -------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One jsonl line ``{"step": step, **metrics}`` and one TensorBoard scalar per tag.

        Call it once per step with all that step's metrics where possible: each call is its own
        jsonl line.  Logging a tag at a step not larger than its previous step is allowed but
        warned about (TensorBoard readers disagree on what to show then).
        """
        if not self._check_open():
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        step = _as_step(step)
        record: dict[str, Any] = {"step": step}
        values = []
        for tag, value in metrics.items():
            tag = str(tag)
            if tag == "step":
                raise ValueError("'step' is reserved in metrics.jsonl; pass the step separately")
            number = _as_number(tag, value)
            previous = self._last.get(tag)
            if previous is not None and step <= previous[0]:
                _log.warning("metric %r logged at step %d after step %d", tag, step, previous[0])
            self._note(tag, step, float(number))
            record[tag] = _json_number(number)
            subrun, board_tag = self.route(tag)
            values.append((subrun, Summary.Value(tag=board_tag, simple_value=float(number))))
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if values:
            self._add_summary(values, step)

    def log_histogram(self, step: int, tag: str, values: Any) -> None:
        """A TensorBoard histogram (e.g. expert load of one layer); not written to the jsonl.
        Non-finite values are left out (with a warning); an empty histogram is skipped."""
        if not self._check_open():
            return
        step = _as_step(step)
        arr = np.asarray(values).astype(np.float64).reshape(-1)
        finite = np.isfinite(arr)
        if not finite.all():
            _log.warning("histogram %r at step %d: %d non-finite values left out",
                         tag, step, int((~finite).sum()))
            arr = arr[finite]
        if arr.size == 0:
            _log.warning("histogram %r at step %d is empty; skipped", tag, step)
            return
        subrun, board_tag = self.route(str(tag))
        self._writer(subrun).add_histogram(board_tag, arr, global_step=step, bins="tensorflow")

    def log_text(self, step: int, tag: str, text: str, *, preformatted: bool = False) -> None:
        """A TensorBoard text summary under exactly ``tag`` (rendered as Markdown;
        ``preformatted=True`` wraps it in a code block, e.g. for a YAML config)."""
        if not self._check_open():
            return
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.text import metadata

        step = _as_step(step)
        text = str(text)
        if preformatted:
            fence = "```"
            while fence in text:
                fence += "`"
            text = f"{fence}\n{text}\n{fence}"
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[]),
        )
        smd = metadata.create_summary_metadata(display_name=None, description=None)
        subrun, board_tag = self.route(str(tag))
        self._add_summary([(subrun, Summary.Value(tag=board_tag, metadata=smd, tensor=tensor))], step)

    def finish(
        self,
        final_metrics: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
        status: str = "success",
    ) -> None:
        """Writes the HParams summary and flushes.

        ``final_metrics`` (tag -> value) become the HParams dashboard's metric columns (a routed
        tag: its sub-run is the metric's group).  The
        dashboard shows a tag's *last* scalar, so a value is also written as a TensorBoard scalar
        at ``step`` (default: the largest step logged) unless the tag's last logged point already
        holds it; if the tag was logged at ``step`` with another value, the logged point stands
        (with a warning).  Final metrics are not written to metrics.jsonl (summary.json is the
        place for them).
        ``status``: "success", "failure", "running" or "unknown".  Calling it again is a no-op.
        """
        if not self._check_open():
            return
        if self._finished:
            _log.warning("RunLogger.finish called twice; ignored")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        final = {str(k): _as_number(str(k), v) for k, v in dict(final_metrics or {}).items()}
        if step is None:
            step = self._max_step if self._max_step is not None else max(self.resume_step or 0, 0)
        step = _as_step(step)
        values = []
        for tag, number in final.items():
            previous = self._last.get(tag)
            if previous is not None:
                a, b = float(previous[1]), float(number)
                same = (math.isnan(a) and math.isnan(b)) or math.isclose(
                    a, b, rel_tol=1e-6, abs_tol=1e-12)
                if same:
                    continue  # the tag's last point already is the final value
                if previous[0] >= step:
                    _log.warning("final metric %r = %r differs from the value %r logged at step "
                                 "%d; TensorBoard keeps the logged one", tag, b, a, previous[0])
                    continue
            self._note(tag, step, float(number))
            subrun, board_tag = self.route(tag)
            values.append((subrun, Summary.Value(tag=board_tag, simple_value=float(number))))
        if values:
            self._add_summary(values, step)
        root = self._writer("")
        root.file_writer.add_summary(self._experiment_summary([self.route(tag) for tag in final]), step)
        root.file_writer.add_summary(self._session_end_summary(status), step)
        self._flush_writers()
        self._finished = True

    def _flush_writers(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def flush(self) -> None:
        if not self.enabled or self._closed:
            return
        self._jsonl.flush()
        self._flush_writers()

    def close(self) -> None:
        """Flushes and closes the files (idempotent)."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        try:
            for writer in self._writers.values():
                writer.close()
        finally:
            self._jsonl.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and self.enabled and not self._closed and not self._finished:
                # Only the session end: an experiment summary without metrics could become the
                # one the HParams dashboard picks for a whole sweep.
                self._writer("").file_writer.add_summary(self._session_end_summary("failure"), self._max_step or 0)
        finally:
            self.close()


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------


def load_event_accumulator(run_dir: str | os.PathLike):
    """A loaded ``EventAccumulator`` over run_dir's event files, keeping every event
    (size_guidance 0).  It applies TensorBoard's purge rule for ``SessionLog.START``."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    guidance = {kind: 0 for kind in (*ea.DEFAULT_SIZE_GUIDANCE, *ea.STORE_EVERYTHING_SIZE_GUIDANCE)}
    acc = ea.EventAccumulator(str(run_dir), size_guidance=guidance)
    acc.Reload()
    return acc


def read_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] in file order, for classic scalars and for tensor scalars
    of the ``scalars`` plugin (as written by other writers)."""
    acc = load_event_accumulator(run_dir)
    tags = acc.Tags()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in tags.get("scalars", []):
        out[tag] = [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
    try:
        scalar_tensor_tags = set(acc.PluginTagToContent("scalars"))
    except KeyError:
        scalar_tensor_tags = set()
    if scalar_tensor_tags:
        from tensorboard.util import tensor_util

        for tag in sorted(scalar_tensor_tags & set(tags.get("tensors", []))):
            out.setdefault(tag, []).extend(
                (int(e.step), float(tensor_util.make_ndarray(e.tensor_proto).item()))
                for e in acc.Tensors(tag)
            )
    return out


def read_metrics_jsonl(run_dir: str | os.PathLike) -> list[dict]:
    """The records of run_dir/metrics.jsonl in file order, with "NaN"/"Infinity"/"-Infinity"
    turned back into floats.  A torn last line (a crash mid-write) is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        records.append({k: _from_json_value(v) for k, v in record.items()})
    return records
