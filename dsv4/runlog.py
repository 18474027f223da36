"""The run directory: what a training run writes besides the model, and how it survives a crash.

* `run.json`: the resolved config, git commit, library versions, device and ops backend
  (`describe_environment`); a resumed run appends to its `resumes` list.
* `metrics.jsonl`: one JSON object per optimizer step (`MetricsLog`), mirrored as TensorBoard scalars
  under `tb/`. On resume, lines past the checkpoint's step are dropped so the file reads as one run.
* `checkpoints/step_XXXXXX/`: written atomically (`write_checkpoint`): every file goes into a hidden
  temporary folder, then `manifest.json` (sha256 and size of each file) is written last and the folder
  is renamed into place. A crash mid-write leaves only the temporary folder, which is ignored and
  removed by the next run; `open_checkpoint` verifies every checksum before anything is loaded.
  Tensors (model and optimizer state) are a `torch.distributed.checkpoint` folder `state/`: each process
  writes its own shards, and any other layout (another world size, with or without expert parallelism,
  one process) reads it back (`load_checkpoint_state`). Small objects (`trainer.pt`) are `torch.save`d
  by rank 0. With several processes the run directory must be on a filesystem all of them see.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsv4.parallel.reduce import barrier, distributed, rank

MANIFEST = "manifest.json"
STATE_DIR = "state"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or fails its checksums; the message says which file."""


# ----------------------------------------------------------------------------- run.json
def git_commit(repo: Path | None = None) -> dict[str, Any]:
    """The commit the code runs from and whether the working tree had uncommitted changes."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(dirty)}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and backend, as recorded in run.json and printed at the start of a run."""
    from dsv4 import __version__, ops

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = {"type": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    else:
        dev = {"type": device.type, "name": _cpu_name(),
               "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    return {"git": git_commit(), "python": sys.version.split()[0], "platform": platform.platform(),
            "versions": {p: _version(p) for p in ("torch", "numpy", "tokenizers", "safetensors",
                                                  "transformers", "triton")} | {"dsv4": __version__},
            "device": dev, "ops_backends": ops.backend_choices(device.type)}


def write_run_json(run_dir: Path, config: dict, environment: dict, resumed_from: int | None) -> None:
    """Create run.json, or on resume keep the first record and append this start to `resumes`."""
    path = run_dir / "run.json"
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if resumed_from is not None and path.exists():
        record = json.loads(path.read_text())
        record.setdefault("resumes", []).append({"step": resumed_from, "time": now, "config": config,
                                                 **environment})
    else:
        record = {"started": now, "config": config, **environment, "resumes": []}
    _atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- metrics
class MetricsLog:
    """Appends one JSON object per step to metrics.jsonl and mirrors numeric fields to TensorBoard.

    Nested dicts of numbers (e.g. `max_load`) become TensorBoard tags `name/key`; lists (per-expert
    loads) stay in the JSON only. `start_step` (a resumed run) drops the lines with a larger step.
    """

    def __init__(self, run_dir: Path, start_step: int = 0, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            _atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{key}/{sub}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: is it a dsv4 training run directory?")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- checkpoints
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, step: int, state: dict[str, Any], objects: dict[str, Any]) -> Path:
    """Write checkpoints/step_XXXXXX atomically; a collective call when several processes run.

    `state`: nested dict of tensors (DTensors for sharded ones) saved with `torch.distributed.checkpoint`
    into `state/`; `objects`: {file name: object} that rank 0 `torch.save`s next to it."""
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    main = rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    import torch.distributed.checkpoint as dcp
    with _one_process_ok():
        dcp.save(state, checkpoint_id=tmp / STATE_DIR, no_dist=not distributed())
    if main:
        _seal(root, tmp, final, step, objects)
    barrier()
    return final


def _seal(root: Path, tmp: Path, final: Path, step: int, objects: dict[str, Any]) -> None:
    """Rank 0, after every process has written its shards: objects, manifest, rename into place."""
    for name, obj in objects.items():
        torch.save(obj, tmp / name)
    files = {}
    for f in sorted(q for q in tmp.rglob("*") if q.is_file()):
        _fsync(f)
        files[f.relative_to(tmp).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
                "objects": sorted(objects), "processes": dist.get_world_size() if distributed() else 1}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(tmp / MANIFEST)
    _fsync(tmp / STATE_DIR)
    _fsync(tmp)
    old = None
    if final.exists():  # the same step written again (e.g. a resumed run ending where it started)
        old = root / f".old-step_{step:06d}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(root)
    if old is not None:
        shutil.rmtree(old)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (a manifest is present), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest or raises CheckpointError."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"].items()
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{manifest_path} is not a valid checkpoint manifest (corrupted); delete {path} "
                              "to resume from the previous checkpoint") from None
    if not (path / STATE_DIR).is_dir():
        raise CheckpointError(f"{path} has no {STATE_DIR}/ folder: it was written by an older dsv4 "
                              "(model.pt/optimizer.pt); restart the run or export it with that version")
    for name, info in files:
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f} is listed in the manifest but missing; delete {path} to resume "
                                  "from the previous checkpoint")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 in {manifest_path} (corrupted); delete "
                                  f"{path} to resume from the previous checkpoint")
    return manifest


def open_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the checkpoint (rank 0, which tells the others) and load its objects: {file name: object}."""
    error = None
    if rank() == 0:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            error = str(exc)
    if distributed():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)
    manifest = json.loads((path / MANIFEST).read_text())
    try:
        return {name: torch.load(path / name, map_location=map_location, weights_only=True)
                for name in manifest["objects"]}
    except Exception as exc:   # matches its checksum but torch cannot read it (written by another version?)
        raise CheckpointError(f"{path} could not be loaded ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); "
                              f"delete {path} to resume from the previous checkpoint") from None


def load_checkpoint_state(path: Path, state: dict[str, Any]) -> None:
    """Fill `state` (the same nested layout `write_checkpoint` got, in any sharding) in place; a
    collective call when several processes run."""
    import torch.distributed.checkpoint as dcp
    try:
        with _one_process_ok():
            dcp.load(state, checkpoint_id=path / STATE_DIR, no_dist=not distributed())
    except Exception as exc:  # DCP names the missing or mismatching entry; say which checkpoint it was
        raise CheckpointError(f"cannot load {path / STATE_DIR} into this run: {exc}") from exc


@contextlib.contextmanager
def _one_process_ok():
    """torch.distributed.checkpoint warns on every one-process save/load; that is the intended use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all) and stale temporary folders."""
    for p in root.glob(".tmp-step_*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for _, p in list_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
