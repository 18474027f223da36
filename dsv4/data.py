"""Training data: corpus ingestion into token shards, and a resumable loader of packed sequences.

Two steps, so tokenization happens once and training reads raw integers:

1. `prepare(sources, out_dir, encode, eos_id=...)` reads documents (plain `.txt` files, `.jsonl`,
   `.parquet`, a directory written by `datasets.Dataset.save_to_disk`, or the bundled Shakespeare corpus),
   encodes each with any `str -> list[int]` callable, appends `eos_id`, and writes per split (`train`,
   `val`) a stream of uint32 tokens (uint32 because the DeepSeek-V4 vocabulary has 129,280 ids) cut into
   shard files, a document-boundary index and one `meta.json`.

2. `PackedLoader(data_dir, "train", batch_size, seq_len, seed=...)` cuts that stream into rows of S+1
   tokens and yields batches that carry document boundaries, so attention, compression windows and RoPE
   positions never cross from one document into the next (the model takes `doc_ids` as `segment_ids`).

Layout of `out_dir`::

    meta.json                 what was written, from what, by which tokenizer; sha256 of each split
    train-00000.bin ...       uint32 tokens, documents back to back, each ending in eos_id
    train.docs.npy            int64 [documents + 1]: start offset of each document, then the total
    val-00000.bin, val.docs.npy

`pyarrow` is imported only when a parquet or arrow source is read; `datasets` is never required.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

BUNDLED = "bundled:shakespeare"
SPLITS = ("train", "val")
IGNORE_INDEX = -100                 # label of a position whose next token belongs to another document
_BUNDLED_FILE = Path(__file__).with_name("data") / "shakespeare.jsonl.gz"
_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet", ".arrow")
_MAX_ID = 2**32 - 1


def load_bundled_corpus() -> list[dict]:
    """The complete works of Shakespeare shipped with the package (see `dsv4/data/README.md`):
    42 documents `{"title", "source", "text"}`, public domain, usable with no network."""
    with gzip.open(_BUNDLED_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------- sources

def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in _SUFFIXES if name.endswith(s)), path.suffix.lower())


def _is_hf_dir(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_info.json").exists()


def _expand(source) -> list[tuple[str, Path | None]]:
    """One source argument -> [(kind, path)]; a plain directory stands for the supported files in it."""
    if source == BUNDLED:
        return [("bundled", None)]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise ValueError(f"{path} holds a DatasetDict; pass one of its splits, e.g. "
                             + ", ".join(str(path / s) for s in splits))
        if _is_hf_dir(path):
            return [("arrow-dir", path)]
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in _SUFFIXES)
        if not files:
            raise ValueError(f"no supported files ({', '.join(_SUFFIXES)}) under directory {path}")
        return [(_suffix(p).removesuffix(".gz").lstrip("."), p) for p in files]
    kind = _suffix(path)
    if kind not in _SUFFIXES:
        raise ValueError(f"unsupported data file {path} (extension {kind or 'none'!r}); supported: "
                         f"{', '.join(_SUFFIXES)}, a `save_to_disk` directory, or {BUNDLED!r}")
    return [(kind.removesuffix(".gz").lstrip("."), path)]


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") \
        else open(path, encoding="utf-8")


def _not_utf8(path: Path) -> ValueError:
    """The error for a text source that is not UTF-8: the file and the offset of its first bad byte
    (in the decompressed stream for .gz), found by decoding it again in binary."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])   # bytes of a character begun in the previous block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                return ValueError(f"{path} is not UTF-8 text: byte {e.object[e.start]:#04x} at offset {bad} "
                                  f"cannot be decoded; convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
            offset += len(block)
    return ValueError(f"{path} is not UTF-8 text (it ends inside a multi-byte character); convert it to UTF-8")


def _arrow_files(path: Path) -> list[Path]:
    """The arrow files of a `save_to_disk` directory, in the order its state.json lists them."""
    state = path / "state.json"
    if state.exists():
        names = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        if names:
            return [path / n for n in names]
    files = sorted(path.glob("*.arrow"))
    if not files:
        raise ValueError(f"{path} looks like a `save_to_disk` directory but holds no .arrow files")
    return files


def _arrow_batches(path: Path):
    """Record batches of one arrow file: `save_to_disk` writes the IPC stream format; accept files too."""
    import pyarrow as pa
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from reader


def _table_batches(kind: str, path: Path, text_key: str):
    """The text column of a parquet/arrow source, batch by batch (other columns are never read)."""
    if kind == "parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_key not in names:
            raise KeyError(f"{path}: no column {text_key!r}; available columns: {names}")
        for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
            yield batch.column(0)
        return
    files = _arrow_files(path) if kind == "arrow-dir" else [path]
    for f in files:
        for batch in _arrow_batches(f):
            if text_key not in batch.schema.names:
                raise KeyError(f"{f}: no column {text_key!r}; available columns: {batch.schema.names}")
            yield batch.column(text_key)


def _count(kind: str, path: Path | None, text_key: str) -> int:
    """Documents in a source, without encoding, so the validation split can be drawn before writing."""
    if kind == "bundled":
        return len(load_bundled_corpus())
    if kind == "txt":
        return 1
    if kind == "jsonl":
        with _open_text(path) as f:
            return sum(1 for line in f if line.strip())
    return sum(len(col) for col in _table_batches(kind, path, text_key))


def _texts(kind: str, path: Path | None, text_key: str) -> Iterator[str]:
    """The documents of one source. A `.txt` file is one document: splitting on blank lines would cut
    plays and articles into fragments, so a corpus of many documents belongs in jsonl/parquet/arrow."""
    if kind == "bundled":
        yield from (d["text"] for d in load_bundled_corpus())
    elif kind == "txt":
        with _open_text(path) as f:
            yield f.read()
    elif kind == "jsonl":
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or text_key not in row:
                    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise KeyError(f"{path}:{n}: no field {text_key!r}; available fields: {fields}")
                yield _checked_text(row[text_key], f"{path}:{n}")
    else:
        for col in _table_batches(kind, path, text_key):
            for value in col.to_pylist():
                yield _checked_text(value, str(path))


def _checked_text(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{where}: text field holds {type(value).__name__}, expected str")
    return value


# --------------------------------------------------------------------------------------------- prepare

class _SplitWriter:
    """Appends documents to one split's shard files and records document starts and a running sha256."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.starts: list[int] = []
        self.shards: list[dict] = []
        self.total = 0
        self.sha = hashlib.sha256()
        self.file = None

    def add(self, ids: np.ndarray):
        self.starts.append(self.total)
        self.sha.update(ids.tobytes())
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            take = min(len(ids), self.shard_tokens - self.shards[-1]["tokens"])
            self.file.write(ids[:take].tobytes())
            self.shards[-1]["tokens"] += take
            self.total += take
            ids = ids[take:]

    def _next_shard(self):
        if self.file is not None:
            self.file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict:
        if self.file is not None:
            self.file.close()
        np.save(self.out_dir / f"{self.split}.docs.npy", np.array(self.starts + [self.total], dtype=np.int64))
        return {"tokens": self.total, "documents": len(self.starts), "shards": self.shards,
                "docs": f"{self.split}.docs.npy", "sha256": self.sha.hexdigest()}


def prepare(sources: Iterable | str | Path, out_dir: str | Path, encode: Callable[[str], list[int]], *,
            eos_id: int, val_fraction: float = 0.01, val_docs: int | None = None,
            shard_tokens: int = 2**28, seed: int = 0, text_key: str = "text",
            tokenizer: str | dict = "", vocab_size: int | None = None, progress: bool = True) -> dict:
    """Tokenize `sources` into `out_dir` (layout in the module docstring) and return the meta dict.

    Args:
        sources: paths (`.txt`/`.txt.gz` = one document per file, `.jsonl[.gz]`, `.parquet`, `.arrow`,
            a `save_to_disk` directory, or a directory of such files) and/or `BUNDLED`.
        encode: `str -> list[int]`, e.g. `dsv4.tokenizer.load_tokenizer().encode`; `eos_id` is appended
            to every document so the model learns where documents end.
        val_fraction / val_docs: held-out documents (whole documents, never a part of one), drawn by a
            permutation seeded with `seed`; `val_docs` overrides the fraction.
        shard_tokens: tokens per shard file (2**28 uint32 = 1 GiB); a document may span two shards.
        tokenizer: a description recorded in meta.json so a run can check it trains on matching ids.
        vocab_size: if given, every id must be below it.

    Documents are written in source order (the loader shuffles rows); empty documents are skipped.
    """
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    out = Path(out_dir)
    limit = _MAX_ID + 1 if vocab_size is None else vocab_size
    if not 0 <= eos_id < limit:
        raise ValueError(f"eos_id {eos_id} is outside [0, {limit})")
    parts = [p for s in sources for p in _expand(s)]
    counts = []
    for kind, path in parts:
        try:
            counts.append(_count(kind, path, text_key))
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    n_docs = sum(counts)
    if n_docs == 0:
        raise ValueError(f"empty corpus: no documents in {[str(s) for s in sources]}")
    n_val = val_docs if val_docs is not None else \
        min(max(1, round(val_fraction * n_docs)) if val_fraction > 0 else 0, n_docs - 1)
    if not 0 <= n_val < n_docs:
        raise ValueError(f"{n_val} validation documents leave none of the {n_docs} for training")
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True

    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)   # a directory without meta.json is an unfinished one
    writers = {s: _SplitWriter(out, s, shard_tokens) for s in SPLITS}
    from tqdm.auto import tqdm
    bar = tqdm(total=n_docs, desc=f"tokenizing into {out}", unit="doc", disable=not progress)
    i, skipped, max_id = 0, 0, eos_id
    for kind, path in parts:
        try:
            for text in _texts(kind, path, text_key):
                if text:
                    ids = _checked_ids(encode(text), eos_id, limit, f"document {i} (from {path or BUNDLED})")
                    max_id = max(max_id, int(ids.max()))
                    writers["val" if is_val[i] else "train"].add(ids)
                else:
                    skipped += 1
                i += 1
                bar.update()
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    bar.close()
    if i != n_docs:
        raise RuntimeError(f"sources changed while being read: counted {n_docs} documents, read {i}")
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise ValueError(f"empty corpus: all {n_docs} training documents are empty")
    meta = {"format": "dsv4-tokens", "version": 1, "dtype": "uint32", "eos_id": eos_id,
            "vocab_size": vocab_size, "max_id": max_id, "tokenizer": tokenizer, "text_key": text_key,
            "seed": seed, "val_fraction": val_fraction, "val_docs": val_docs, "skipped_empty": skipped,
            "sources": [{"kind": k, "path": str(p) if p else BUNDLED, "documents": c}
                        for (k, p), c in zip(parts, counts)],
            "splits": splits,
            "checksum": hashlib.sha256("".join(splits[s]["sha256"] for s in SPLITS).encode()).hexdigest()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _checked_ids(ids, eos_id: int, limit: int, where: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype == object and all(isinstance(t, int) for t in arr):
        raise ValueError(f"{where}: a token id is outside [0, {limit}) (does not even fit in 64 bits)")
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"{where}: encode must return a flat list of ints, got {arr.dtype} shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= limit):
        bad = int(arr.max()) if int(arr.max()) >= limit else int(arr.min())
        what = "the vocab_size" if limit <= _MAX_ID else "2**32 (uint32 storage)"
        raise ValueError(f"{where}: token id {bad} is outside [0, {limit}) set by {what}")
    return np.append(arr.astype(np.uint32), np.uint32(eos_id))


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run dsv4.data.prepare first (or it did not finish)")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------- loading

class TokenSplit:
    """One split as a flat token array over its memory-mapped shards, plus its document starts."""

    def __init__(self, data_dir: str | Path, split: str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        root = Path(data_dir)
        self.meta = load_meta(root)
        info = self.meta["splits"][split]
        self.shards = [np.memmap(root / s["file"], dtype=np.uint32, mode="r") if s["tokens"] else
                       np.zeros(0, np.uint32) for s in info["shards"]]
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])        # [n_shards + 1]
        self.doc_starts = np.load(root / info["docs"])                            # [documents + 1]
        self.n_tokens, self.sha256 = int(info["tokens"]), info["sha256"]
        if self.shard_starts[-1] != self.n_tokens or self.doc_starts[-1] != self.n_tokens:
            raise ValueError(f"{root}: {split} shards do not match meta.json; prepare the data again")

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64, joining shards where the range crosses one."""
        out, pos = [], start
        k = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while pos < start + n:
            lo = pos - self.shard_starts[k]
            take = min(start + n - pos, len(self.shards[k]) - lo)
            out.append(self.shards[k][lo:lo + take])
            pos, k = pos + take, k + 1
        return np.concatenate(out).astype(np.int64)

    def row(self, start: int, seq_len: int) -> dict[str, np.ndarray]:
        """A packed row from S+1 tokens at `start`: inputs are the first S, labels the last S.

        Every document boundary inside the row opens a new segment; the row's first segment starts at
        position 0 even when it continues a document (its earlier context is not in the row, and the
        model's compressor pools windows from each segment's start).
        """
        S = seq_len
        tokens = self.read(start, S + 1)                                          # [S+1]
        first = int(np.searchsorted(self.doc_starts, start, side="right"))
        last = int(np.searchsorted(self.doc_starts, start + S, side="right"))
        is_start = np.zeros(S + 1, dtype=bool)
        is_start[self.doc_starts[first:last] - start] = True                      # documents opening in the row
        is_start[0] = True
        idx = np.arange(S)
        seg_start = np.maximum.accumulate(np.where(is_start[:S], idx, 0))         # [S]
        return {"input_ids": tokens[:S],
                "labels": np.where(is_start[1:], IGNORE_INDEX, tokens[1:]),
                "doc_ids": (np.cumsum(is_start[:S]) - 1).astype(np.int32),
                "positions": idx - seg_start}


def _collate(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


class PackedLoader:
    """Batches of packed rows, deterministic for a seed and resumable mid-epoch.

    Packing: the split's token stream (documents back to back, each ending in EOS) is cut into rows of
    S+1 tokens at stride S, so each row's labels are its inputs shifted by one and every token is a
    label in exactly one row. Each batch is a dict of CPU tensors:

        input_ids [B, S] int64   tokens
        labels    [B, S] int64   next token; IGNORE_INDEX (-100) where the next token starts another
                                 document (so a document's EOS never predicts the next document)
        doc_ids   [B, S] int32   segment within the row: 0, 1, 2, ... (pass as the model's segment_ids;
                                 attention and compression never cross a change of doc_id)
        positions [B, S] int64   position within the segment, 0 at every segment start (RoPE positions)

    Epoch e cuts rows from a random offset in [0, S) and visits them in a random order, both drawn from
    (seed, e), so epochs differ but any epoch can be rebuilt; `shuffle=False` reads rows in order from
    offset 0. The last rows that do not fill a global batch are dropped for that epoch. With
    `infinite=True` iteration rolls into the next epoch; with `infinite=False` a `for` loop ends at the
    end of an epoch and the next `for` loop continues with the following epoch.

    With several processes, each passes its `rank` and `world_size`: one global batch is
    `batch_size * world_size` rows, of which rank r takes the r-th block. `state_dict()` counts global
    batches, so a run may resume with another world size as long as the global batch is the same.
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, *, seed: int = 0,
                 shuffle: bool = True, infinite: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size, seq_len >= 1 and 0 <= rank < world_size; got "
                             f"{batch_size}, {seq_len}, rank {rank}, world_size {world_size}")
        self.data = TokenSplit(data_dir, split)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.shuffle, self.infinite, self.rank, self.world_size = shuffle, infinite, rank, world_size
        self.global_batch = batch_size * world_size
        worst_offset = seq_len - 1 if shuffle else 0
        if (self.data.n_tokens - 1 - worst_offset) // seq_len < self.global_batch:
            raise ValueError(f"{split} split has {self.data.n_tokens} tokens: too few for one batch of "
                             f"{self.global_batch} rows of {seq_len} + 1 tokens")
        self.epoch, self.step = 0, 0
        self._order: tuple[int, int, np.ndarray] | None = None

    def _plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, row order) of an epoch, a pure function of (seed, epoch)."""
        S = self.seq_len
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(S)) if self.shuffle else 0
        n_rows = max(0, (self.data.n_tokens - 1 - offset) // S)
        return offset, (rng.permutation(n_rows) if self.shuffle else np.arange(n_rows))

    def __len__(self) -> int:
        """Batches in the current epoch (epochs can differ by one because their offsets differ)."""
        return len(self._current()[1]) // self.global_batch

    def _current(self) -> tuple[int, np.ndarray]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, *self._plan(self.epoch))
        return self._order[1], self._order[2]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        offset, order = self._current()
        if self.step >= len(order) // self.global_batch:
            self.epoch, self.step = self.epoch + 1, 0
            if not self.infinite:
                raise StopIteration
            offset, order = self._current()
        lo = self.step * self.global_batch + self.rank * self.batch_size
        rows = order[lo:lo + self.batch_size]
        self.step += 1
        return _collate([self.data.row(offset + int(r) * self.seq_len, self.seq_len) for r in rows])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "split": self.split,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "shuffle": self.shuffle,
                "sha256": self.data.sha256}

    def load_state_dict(self, state: dict):
        """Continue exactly where the saved loader stopped; refuse a state from other data or settings."""
        mine = self.state_dict()
        diff = [k for k in ("seed", "split", "seq_len", "global_batch", "shuffle", "sha256") if state.get(k) != mine[k]]
        if diff:
            raise ValueError("loader state does not match this loader: "
                             + ", ".join(f"{k} {state.get(k)!r} != {mine[k]!r}" for k in diff))
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def iterate_val(data_dir: str | Path, batch_size: int, seq_len: int, max_batches: int | None = None,
                split: str = "val") -> Iterator[dict[str, torch.Tensor]]:
    """Fixed-order batches over a split (same dict as `PackedLoader`) for comparable evaluations:
    rows from offset 0, in order, the last batch possibly smaller; stops after `max_batches`."""
    data = TokenSplit(data_dir, split)
    n_rows = max(0, (data.n_tokens - 1) // seq_len)
    if n_rows == 0:
        raise ValueError(f"{split} split has {data.n_tokens} tokens: too few for one row of {seq_len} + 1")
    n_batches = math.ceil(n_rows / batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        rows = range(b * batch_size, min(n_rows, (b + 1) * batch_size))
        yield _collate([data.row(r * seq_len, seq_len) for r in rows])
