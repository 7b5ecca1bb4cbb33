"""Sharded, resumable, per-example evaluation state with an exact merge.

Long evaluations (AutoAttack on 5000 ImageNet images takes GPU-days) must survive pre-emption and
spread over many processes without changing the numbers. This module gives any per-example
evaluation (RobustBench protocol, validate.py, attack studies) that property:

* The example list ``0 .. n_examples - 1`` is cut into fixed **chunks** of ``chunk_size``
  consecutive examples (:func:`plan_chunks`). Chunk boundaries depend only on ``n_examples`` and
  ``chunk_size``, never on the number of processes, so a chunk is the same work in every run.
* Chunks are dealt to shards round-robin (:func:`shard_chunks`: shard ``i`` of ``N`` takes
  chunks ``i, i + N, i + 2N, ...``), which balances easy and hard parts of the list.
* After each chunk, the shard atomically rewrites its own state file
  ``<state_dir>/shard-<i>-of-<N>.json`` (:class:`EvalState.record`): the chunk's per-example
  values (e.g. clean-correct / robust-correct booleans), keyed by the chunk's first example
  index, plus a **fingerprint** of the configuration. A kill at any instant loses at most the
  chunk in progress.
* On start, every state file in the folder is read: chunks already done by *any* shard (of any
  earlier shard count) are skipped, and a file whose fingerprint differs from this run's is
  refused with :class:`EvalStateError` naming the differing keys, instead of mixing results of
  two configurations.
* :meth:`EvalState.merge` unions the chunks of all files into per-example arrays in example
  order. Because the per-example values of a chunk do not depend on which process computed it
  (the caller seeds each chunk from its first index), the merged result of N shards, or of a
  resumed run, equals the result of one uninterrupted process.

Files are JSON (readable, diffable, small: two booleans per example) and go through
``src.storage``, so the state folder may be local, ``gs://`` or ``memory://``.

Test hook: when ``ROBUST_VITS_TEST_KILL_AFTER_CHUNKS=k`` is set, the process SIGKILLs itself right
after its k-th chunk has been committed to disk (simulated pre-emption). Unset outside tests.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import storage
from .errors import UsageError

_logger = logging.getLogger("robust_vits")

__all__ = [
    "EvalStateError",
    "Chunk",
    "ChunkResult",
    "MergedResults",
    "EvalState",
    "plan_chunks",
    "shard_chunks",
    "fingerprint_digest",
    "state_file_name",
    "STATE_FORMAT",
    "KILL_AFTER_CHUNKS_ENV",
]

STATE_FORMAT = "robust-vits-eval-state"
STATE_VERSION = 1
KILL_AFTER_CHUNKS_ENV = "ROBUST_VITS_TEST_KILL_AFTER_CHUNKS"
_STATE_NAME = re.compile(r"shard-(\d+)-of-(\d+)\.json")

Chunk = Tuple[int, int]  # [start, end) example indices


class EvalStateError(UsageError):
    """A state folder that cannot be used for this run (other configuration, damaged file)."""


# ----------------------------------------------------------------------------------------------
# chunks and shards


def plan_chunks(n_examples: int, chunk_size: int) -> List[Chunk]:
    """``[start, end)`` ranges covering ``0 .. n_examples - 1``; ``chunk_size <= 0`` means one chunk."""
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    if n_examples == 0:
        return []
    size = n_examples if chunk_size <= 0 else int(chunk_size)
    return [(s, min(s + size, n_examples)) for s in range(0, n_examples, size)]


def shard_chunks(chunks: Sequence[Chunk], num_shards: int, shard_id: int) -> List[Chunk]:
    """The chunks shard ``shard_id`` of ``num_shards`` evaluates: every ``num_shards``-th one."""
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} of {num_shards} does not exist")
    return list(chunks[shard_id::num_shards])


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of the fingerprint's canonical JSON (sorted keys)."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def state_file_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id}-of-{num_shards}.json"


def _canonical(value: Any) -> Any:
    """JSON round trip, so that tuples and lists (and int/float keys) compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if _canonical(a.get(k)) != _canonical(b.get(k))]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(_canonical(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class ChunkResult:
    """Per-example values of one chunk (each list has ``end - start`` entries) and its metadata."""
    start: int
    end: int
    values: Dict[str, List[Any]]
    info: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"end": self.end, "values": self.values, "info": self.info}

    @classmethod
    def from_json(cls, start: int, entry: Mapping[str, Any]) -> "ChunkResult":
        return cls(start=int(start), end=int(entry["end"]), values={k: list(v) for k, v in entry["values"].items()},
                   info=dict(entry.get("info") or {}))


@dataclass
class MergedResults:
    """The union of all state files: per-example values in example order (None where missing)."""
    n_examples: int
    values: Dict[str, List[Any]]
    chunks: Dict[int, ChunkResult]
    missing: List[Chunk]
    files: List[str]
    conflicts: List[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def n_done(self) -> int:
        return sum(r.end - r.start for r in self.chunks.values())


# ----------------------------------------------------------------------------------------------
# the state of one evaluation


class EvalState:
    """The state folder of one evaluation, seen by one shard.

    ``fingerprint`` is a JSON-able dict of everything that determines the per-example values
    (model and weights hash, data and example ids, attack, eps, seed, chunk size, ...). Two runs
    with different fingerprints never share a folder. ``fields`` names the per-example values
    every chunk must carry.
    """

    def __init__(self, state_dir: str, fingerprint: Mapping[str, Any], n_examples: int, chunk_size: int,
                 fields: Sequence[str], shard_id: int = 0, num_shards: int = 1,
                 elsewhere: str = "use another --state-dir"):
        self.state_dir = str(state_dir)
        self.elsewhere = elsewhere  # how this tool's user puts the state somewhere else (its errors say it)
        self.fingerprint = _canonical(dict(fingerprint))
        self.digest = fingerprint_digest(self.fingerprint)
        self.n_examples = int(n_examples)
        self.chunk_size = int(chunk_size)
        self.fields = tuple(fields)
        self.shard_id = int(shard_id)
        self.num_shards = int(num_shards)
        self.chunks = plan_chunks(self.n_examples, self.chunk_size)
        self._chunk_ends = dict(self.chunks)
        self.path = storage.join(self.state_dir, state_file_name(self.shard_id, self.num_shards))
        self._own: Dict[int, ChunkResult] = {}
        self._runs: List[Dict[str, Any]] = []
        self._committed_this_process = 0

    # -- reading ------------------------------------------------------------------------------

    def state_files(self) -> List[str]:
        """Paths of the shard state files in the folder (any shard count)."""
        if not storage.isdir(self.state_dir):
            return []
        return [storage.join(self.state_dir, n) for n in storage.listdir(self.state_dir) if _STATE_NAME.fullmatch(n)]

    def _read(self, path: str) -> Dict[str, Any]:
        try:
            doc = json.loads(storage.read_text(path))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise EvalStateError(f"evaluation state {path} cannot be read ({type(e).__name__}); delete it to "
                                 f"redo its examples, or {self.elsewhere}") from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise EvalStateError(f"{path} is not a robust-vits evaluation state file; {self.elsewhere}")
        if doc.get("version") != STATE_VERSION:
            raise EvalStateError(f"evaluation state {path} has format version {doc.get('version')}, this "
                                 f"robust-vits writes version {STATE_VERSION}; {self.elsewhere}")
        theirs = doc.get("fingerprint") or {}
        if doc.get("fingerprint_sha256") != self.digest:
            diff = _differences(theirs, self.fingerprint)
            shown = "; ".join(f"{k}: {_short(theirs.get(k))} there vs {_short(self.fingerprint.get(k))} now"
                              for k in diff[:3])
            raise EvalStateError(f"evaluation state {path} belongs to another configuration ({shown or 'digest differs'}"
                                 f"); refusing to mix results: {self.elsewhere}, or delete that folder "
                                 f"to start over")
        return doc

    def _chunks_of(self, path: str, doc: Mapping[str, Any]) -> Dict[int, ChunkResult]:
        out: Dict[int, ChunkResult] = {}
        try:
            for start, entry in (doc.get("chunks") or {}).items():
                res = ChunkResult.from_json(int(start), entry)
                if self._chunk_ends.get(res.start) != res.end or \
                        any(len(res.values.get(f, ())) != res.end - res.start for f in self.fields):
                    raise ValueError(f"chunk {res.start}")
                out[res.start] = res
        except (KeyError, TypeError, ValueError) as e:
            raise EvalStateError(f"evaluation state {path} is damaged ({e}); delete it to redo its examples") from None
        return out

    def load(self) -> Dict[int, ChunkResult]:
        """Read every state file (refusing foreign ones); keep this shard's own chunks for rewriting.

        Returns all chunks done so far, by any shard, keyed by their first example index.
        """
        done: Dict[int, ChunkResult] = {}
        self._own = {}
        self._runs = []
        for path in self.state_files():
            doc = self._read(path)
            chunks = self._chunks_of(path, doc)
            if path == self.path:
                self._own = dict(chunks)
                self._runs = list(doc.get("runs") or [])
            for start, res in chunks.items():
                done.setdefault(start, res)
        return done

    def pending(self, done: Mapping[int, ChunkResult]) -> List[Chunk]:
        """This shard's chunks that no state file holds yet."""
        return [c for c in shard_chunks(self.chunks, self.num_shards, self.shard_id) if c[0] not in done]

    # -- writing ------------------------------------------------------------------------------

    def begin_run(self, info: Optional[Mapping[str, Any]] = None) -> None:
        """Note a (re)start in this shard's file: when, where, how many chunks were already done."""
        entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                 "pid": os.getpid(), "chunks_already_done": len(self._own)}
        entry.update(dict(info or {}))
        self._runs.append(_canonical(entry))
        storage.makedirs(self.state_dir)
        # temporary files a kill left behind: only this shard's own (other shards may be writing theirs)
        own = storage.basename(self.path)
        storage.remove_many(storage.join(self.state_dir, n) for n in storage.listdir(self.state_dir)
                            if storage.is_temp_name(n) and n.startswith(f".{own}.tmp-"))
        self._write()

    def record(self, start: int, end: int, values: Mapping[str, Sequence[Any]],
               info: Optional[Mapping[str, Any]] = None) -> None:
        """Commit one finished chunk to this shard's state file (atomic rewrite)."""
        if self._chunk_ends.get(start) != end:
            raise ValueError(f"[{start}, {end}) is not a chunk of this evaluation")
        missing = [f for f in self.fields if f not in values]
        if missing:
            raise ValueError(f"chunk [{start}, {end}) lacks values for {missing}")
        vals = {k: _canonical(list(v)) for k, v in values.items()}
        for k, v in vals.items():
            if len(v) != end - start:
                raise ValueError(f"chunk [{start}, {end}) has {len(v)} values for '{k}'")
        self._own[start] = ChunkResult(start, end, vals, _canonical(dict(info or {})))
        self._write()
        self._committed_this_process += 1
        _test_kill_point(self._committed_this_process)

    def _write(self) -> None:
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint_sha256": self.digest,
            "fingerprint": self.fingerprint,
            "n_examples": self.n_examples,
            "chunk_size": self.chunk_size,
            "shard_id": self.shard_id,
            "num_shards": self.num_shards,
            "fields": list(self.fields),
            "runs": self._runs,
            "chunks": {str(s): self._own[s].to_json() for s in sorted(self._own)},
        }
        storage.atomic_write_text(self.path, json.dumps(doc, separators=(",", ":")) + "\n")

    # -- merging ------------------------------------------------------------------------------

    def merge(self) -> MergedResults:
        """Union of all state files, in example order; ``missing`` lists chunks nobody has done.

        When two files hold the same chunk (shards of different shard counts overlapped), the
        copy from the first file in name order is used; differing copies are reported in
        ``conflicts`` (they can only differ through floating-point nondeterminism).
        """
        chosen: Dict[int, ChunkResult] = {}
        conflicts: List[int] = []
        files = self.state_files()
        for path in files:
            for start, res in self._chunks_of(path, self._read(path)).items():
                if start in chosen:
                    if chosen[start].values != res.values:
                        conflicts.append(start)
                    continue
                chosen[start] = res
        values: Dict[str, List[Any]] = {f: [None] * self.n_examples for f in self.fields}
        for start, res in chosen.items():
            for f in self.fields:
                values[f][start:res.end] = res.values[f]
        missing = [c for c in self.chunks if c[0] not in chosen]
        if conflicts:
            _logger.warning("%d chunk(s) were evaluated twice with different results (first at example %d); "
                            "the copy of the first state file was kept", len(conflicts), min(conflicts))
        return MergedResults(n_examples=self.n_examples, values=values, chunks=chosen, missing=missing,
                             files=files, conflicts=sorted(set(conflicts)))

    def runs(self) -> List[Dict[str, Any]]:
        return list(self._runs)

    def read_runs(self, path: str) -> List[Dict[str, Any]]:
        """The run entries (``begin_run``'s records) of one state file of this folder, any shard's."""
        runs = self._read(path).get("runs")
        return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _test_kill_point(committed: int) -> None:
    """Test-only simulated pre-emption (see the module docstring)."""
    target = os.environ.get(KILL_AFTER_CHUNKS_ENV)
    if target and committed >= int(target):
        os.kill(os.getpid(), signal.SIGKILL)
