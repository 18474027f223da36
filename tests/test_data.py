"""Data pipeline: every source format round-trips, batches mark document boundaries exactly, loaders are
deterministic and resumable, the validation split holds whole documents, bad inputs fail clearly."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsv4 import data
from dsv4.model import positions_from_segments

EOS = 256                                   # outside the byte range, so it never occurs inside a document
VOCAB = 257


def encode(text: str) -> list[int]:
    return list(text.encode())


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode()


def random_docs(n: int, seed: int, max_len: int = 300) -> list[str]:
    """Distinct documents of random length (some one character) over ASCII and multi-byte characters."""
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCDEFG.,;\n") + ["é", "ß", "Ж", "語", "🙂"]
    docs = []
    for i in range(n):
        k = int(rng.integers(1, max_len))
        docs.append(f"{i}:" + "".join(rng.choice(alphabet, size=k)))
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, key: d}) + "\n" for i, d in enumerate(docs)))
    return path


def write_arrow_dir(path: Path, docs: list[str]) -> Path:
    """The layout of `datasets.Dataset.save_to_disk`: arrow IPC streams + state.json + dataset_info.json."""
    path.mkdir(parents=True)
    names = []
    for k, part in enumerate((docs[: len(docs) // 2], docs[len(docs) // 2:])):
        names.append(f"data-{k:05d}-of-00002.arrow")
        table = pa.table({"id": list(range(len(part))), "text": part})
        with pa.ipc.new_stream(str(path / names[-1]), table.schema) as w:
            for batch in table.to_batches(max_chunksize=7):
                w.write_batch(batch)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return path


def read_documents(out: Path, split: str) -> list[list[int]]:
    """Each document's tokens, read back through the shard files and the boundary index."""
    ts = data.TokenSplit(out, split)
    s = ts.doc_starts
    return [ts.read(int(a), int(b - a)).tolist() for a, b in zip(s[:-1], s[1:])]


@pytest.fixture(scope="module")
def docs():
    return random_docs(60, seed=1234)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, docs):
    """A corpus of many short documents, so short rows cross several boundaries."""
    out = tmp_path_factory.mktemp("prepared")
    src = write_jsonl(out.parent / "packed.jsonl", random_docs(400, seed=99, max_len=40))
    data.prepare([src], out, encode, eos_id=EOS, vocab_size=VOCAB, val_fraction=0.1, seed=3, progress=False)
    return out


# ------------------------------------------------------------------------------------------ prepare

@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "arrow-dir", "mixed"])
def test_round_trip_every_format(tmp_path, docs, fmt):
    if fmt == "txt":
        (tmp_path / "txt").mkdir()
        for i, d in enumerate(docs):
            (tmp_path / "txt" / f"doc_{i:03d}.txt").write_text(d, encoding="utf-8")
        sources = [tmp_path / "txt"]
    elif fmt == "jsonl":
        sources = [write_jsonl(tmp_path / "c.jsonl", docs)]
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "c.parquet",
                       row_group_size=11)
        sources = [tmp_path / "c.parquet"]
    elif fmt == "arrow-dir":
        sources = [write_arrow_dir(tmp_path / "ds", docs)]
    else:
        pq.write_table(pa.table({"text": docs[20:]}), tmp_path / "b.parquet")
        sources = [write_jsonl(tmp_path / "a.jsonl", docs[:20]), tmp_path / "b.parquet"]
    out = tmp_path / "out"
    meta = data.prepare(sources, out, encode, eos_id=EOS, val_fraction=0.0, tokenizer="bytes",
                        vocab_size=VOCAB, progress=False)
    got = read_documents(out, "train")
    assert [decode(d[:-1]) for d in got] == docs                       # order and content survive
    assert all(d[-1] == EOS and EOS not in d[:-1] for d in got)       # one EOS, at the end of each document
    train = meta["splits"]["train"]
    assert train["documents"] == len(docs) and meta["splits"]["val"]["documents"] == 0
    assert train["tokens"] == sum(len(encode(d)) + 1 for d in docs)
    raw = b"".join((out / s["file"]).read_bytes() for s in train["shards"])
    assert hashlib.sha256(raw).hexdigest() == train["sha256"]
    assert meta["tokenizer"] == "bytes" and meta["eos_id"] == EOS
    assert json.loads((out / "meta.json").read_text()) == meta


def test_shards_split_the_stream_without_changing_it(tmp_path, docs):
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    data.prepare([src], tmp_path / "one", encode, eos_id=EOS, val_fraction=0, progress=False)
    meta = data.prepare([src], tmp_path / "many", encode, eos_id=EOS, val_fraction=0, shard_tokens=97,
                        progress=False)
    assert len(meta["splits"]["train"]["shards"]) > 10
    assert read_documents(tmp_path / "many", "train") == read_documents(tmp_path / "one", "train")
    one = data.PackedLoader(tmp_path / "one", "train", 3, 50, seed=5)
    many = data.PackedLoader(tmp_path / "many", "train", 3, 50, seed=5)
    for _ in range(20):
        a, b = next(one), next(many)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_val_split_holds_whole_documents_disjoint_from_train(tmp_path, docs):
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    meta = data.prepare([src], tmp_path / "a", encode, eos_id=EOS, val_fraction=0.2, seed=7, progress=False)
    train = {decode(d[:-1]) for d in read_documents(tmp_path / "a", "train")}
    val = {decode(d[:-1]) for d in read_documents(tmp_path / "a", "val")}
    assert len(val) == meta["splits"]["val"]["documents"] == 12
    assert not train & val and train | val == set(docs)
    again = data.prepare([src], tmp_path / "b", encode, eos_id=EOS, val_fraction=0.2, seed=7, progress=False)
    assert again["checksum"] == meta["checksum"]                       # same seed, same split, same bytes
    other = data.prepare([src], tmp_path / "c", encode, eos_id=EOS, val_docs=12, seed=8, progress=False)
    assert other["splits"]["val"]["documents"] == 12
    assert {decode(d[:-1]) for d in read_documents(tmp_path / "c", "val")} != val   # another seed, other documents


def test_bundled_corpus():
    corpus = data.load_bundled_corpus()
    assert len(corpus) > 30
    titles = {d["title"] for d in corpus}
    assert "HAMLET, PRINCE OF DENMARK" in titles and "THE SONNETS" in titles
    hamlet = next(d["text"] for d in corpus if d["title"].startswith("HAMLET"))
    assert "To be, or not to be" in hamlet
    assert sum(len(d["text"]) for d in corpus) > 4_000_000
    assert not any("gutenberg" in d["text"].lower() for d in corpus)  # only the works, no licence boilerplate


def test_prepare_bundled_corpus(tmp_path):
    meta = data.prepare(data.BUNDLED, tmp_path, encode, eos_id=EOS, val_docs=2, progress=False)
    assert meta["splits"]["train"]["documents"] == len(data.load_bundled_corpus()) - 2
    assert meta["sources"] == [{"kind": "bundled", "path": data.BUNDLED, "documents": 42}]
    batch = next(iter(data.iterate_val(tmp_path, 2, 128)))
    assert decode(batch["input_ids"][0]).isascii()


# ------------------------------------------------------------------------------------------ batches

def reference_row(out: Path, split: str, start: int, S: int) -> dict[str, list[int]]:
    """The batch contract written out token by token from the stream and its document starts."""
    ts = data.TokenSplit(out, split)
    starts = set(ts.doc_starts.tolist())
    toks = ts.read(start, S + 1).tolist()
    row = {"input_ids": toks[:S], "labels": [], "doc_ids": [], "positions": []}
    seg, pos = 0, 0
    for i in range(S):
        if i > 0 and start + i in starts:
            seg, pos = seg + 1, 0
        row["doc_ids"].append(seg)
        row["positions"].append(pos)
        row["labels"].append(-100 if start + i + 1 in starts else toks[i + 1])
        pos += 1
    return row


def test_rows_follow_the_batch_contract(prepared):
    ts = data.TokenSplit(prepared, "train")
    S = 24
    for start in list(range(0, 300)) + [ts.n_tokens - S - 1]:
        row = ts.row(start, S)
        ref = reference_row(prepared, "train", start, S)
        assert all(row[k].tolist() == ref[k] for k in ref), start


def test_batches_mark_document_boundaries(prepared):
    loader = data.PackedLoader(prepared, "train", batch_size=8, seq_len=32, seed=0)
    n_boundaries = 0
    for _ in range(10):
        b = next(loader)
        x, y, seg, pos = b["input_ids"], b["labels"], b["doc_ids"], b["positions"]
        assert x.shape == y.shape == seg.shape == pos.shape == (8, 32)
        assert (x.dtype, y.dtype, seg.dtype, pos.dtype) == (torch.int64, torch.int64, torch.int32, torch.int64)
        new_doc = torch.zeros_like(x, dtype=torch.bool)
        new_doc[:, 1:] = seg[:, 1:] != seg[:, :-1]
        assert ((seg[:, 1:] - seg[:, :-1]) >= 0).all() and (seg[:, 0] == 0).all()
        assert torch.equal(pos == 0, new_doc | (torch.arange(32) == 0))     # positions restart exactly at starts
        assert torch.equal(pos, positions_from_segments(seg.long()))        # what the model derives itself
        ignored = y[:, :-1] == -100
        assert torch.equal(ignored, new_doc[:, 1:])                         # -100 exactly at boundaries
        assert (x[:, :-1][ignored] == EOS).all()                            # ... where a document's EOS stands
        assert torch.equal(y[:, :-1][~ignored], x[:, 1:][~ignored])         # otherwise the next input
        assert ((y == -100) | ((y >= 0) & (y < VOCAB))).all()
        n_boundaries += int(ignored.sum())
    assert n_boundaries > 50


def test_one_unshuffled_epoch_is_the_stream_at_stride_s(prepared):
    S, B = 16, 4
    loader = data.PackedLoader(prepared, "train", B, S, shuffle=False, infinite=False)
    batches = list(loader)
    ts = data.TokenSplit(prepared, "train")
    assert len(batches) == len(loader) == (ts.n_tokens - 1) // S // B
    x = torch.cat([b["input_ids"] for b in batches]).flatten()
    y = torch.cat([b["labels"] for b in batches]).flatten()
    stream = torch.from_numpy(ts.read(0, len(x) + 1))
    assert torch.equal(x, stream[:-1])
    assert torch.equal(y[y != -100], stream[1:][y != -100])
    assert loader.epoch == 1 and len(list(loader)) == len(batches)      # the next loop is the next epoch


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_loader_is_deterministic_and_epochs_reshuffle(prepared):
    a = take(data.PackedLoader(prepared, "train", 4, 32, seed=11), 12)
    b = take(data.PackedLoader(prepared, "train", 4, 32, seed=11), 12)
    c = take(data.PackedLoader(prepared, "train", 4, 32, seed=12), 12)
    assert same(a, b) and not same(a, c)
    loader = data.PackedLoader(prepared, "train", 4, 32, seed=11)
    first = take(loader, len(loader))
    second = take(loader, len(first))
    assert loader.epoch == 1 and not same(first, second)


def test_resume_mid_epoch_matches_uninterrupted(prepared):
    full = data.PackedLoader(prepared, "train", 4, 32, seed=21)
    n = len(full)
    expected = take(full, n + 7)                                          # runs into the second epoch
    cut = n - 3
    first = data.PackedLoader(prepared, "train", 4, 32, seed=21)
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))                     # survives a checkpoint as JSON
    resumed = data.PackedLoader(prepared, "train", 4, 32, seed=21)
    resumed.load_state_dict(state)
    assert same(take(resumed, 10), expected[cut:])
    with pytest.raises(ValueError, match="seed"):
        data.PackedLoader(prepared, "train", 4, 32, seed=22).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        data.PackedLoader(prepared, "train", 4, 16, seed=21).load_state_dict(state)


def test_ranks_split_the_global_batch(prepared):
    whole = take(data.PackedLoader(prepared, "train", 6, 20, seed=4), 5)
    ranks = [take(data.PackedLoader(prepared, "train", 2, 20, seed=4, rank=r, world_size=3), 5)
             for r in range(3)]
    for i, b in enumerate(whole):
        for k in b:
            assert torch.equal(b[k], torch.cat([ranks[r][i][k] for r in range(3)]))
    resumed = data.PackedLoader(prepared, "train", 3, 20, seed=4, rank=1, world_size=2)
    state = data.PackedLoader(prepared, "train", 6, 20, seed=4).state_dict()
    resumed.load_state_dict(state)                                        # same global batch, new world size
    assert torch.equal(next(resumed)["input_ids"], whole[0]["input_ids"][3:])


def test_validation_batches_in_fixed_order(prepared):
    a = list(data.iterate_val(prepared, 5, 16))
    assert same(a, list(data.iterate_val(prepared, 5, 16)))
    ts = data.TokenSplit(prepared, "val")
    rows = (ts.n_tokens - 1) // 16
    assert sum(len(b["input_ids"]) for b in a) == rows and len(a[-1]["input_ids"]) == rows - 5 * (len(a) - 1)
    assert torch.equal(a[0]["input_ids"][0], torch.from_numpy(ts.read(0, 16)))
    assert same(list(data.iterate_val(prepared, 5, 16, max_batches=2)), a[:2])


# ------------------------------------------------------------------------------------------ errors

def test_errors_name_the_problem(tmp_path, docs):
    def prep(src, **kw):
        return data.prepare(src, tmp_path / "out", kw.pop("enc", encode), eos_id=EOS, progress=False, **kw)

    with pytest.raises(FileNotFoundError, match="not found"):
        prep([tmp_path / "missing.jsonl"])
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported.*'\.csv'"):
        prep([tmp_path / "c.csv"])
    src = write_jsonl(tmp_path / "c.jsonl", docs[:5], key="content")
    with pytest.raises(KeyError, match=r"no field 'text'.*\['content', 'id'\]"):
        prep([src])
    assert prep([src], text_key="content")["splits"]["train"]["documents"] == 4
    pq.write_table(pa.table({"body": docs[:3]}), tmp_path / "c.parquet")
    with pytest.raises(KeyError, match=r"no column 'text'.*\['body'\]"):
        prep([tmp_path / "c.parquet"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty corpus"):
        prep([tmp_path / "empty.jsonl"])
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(ValueError, match="empty corpus"):
        prep([tmp_path / "blank.jsonl"])
    with pytest.raises(ValueError, match=r"token id 4294967296.*2\*\*32"):
        prep([src], text_key="content", enc=lambda s: [5, 2**32])
    with pytest.raises(ValueError, match="vocab_size"):
        prep([src], text_key="content", vocab_size=300, enc=lambda s: [5, 300])
    with pytest.raises(ValueError, match="none of the 5"):
        prep([src], text_key="content", val_docs=5)
    dd = tmp_path / "dd"
    write_arrow_dir(dd / "train", docs)
    (dd / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match="DatasetDict.*train"):
        prep([dd])
    with pytest.raises(FileNotFoundError, match="meta.json"):
        data.PackedLoader(tmp_path / "nothing", "train", 1, 8)
    out = tmp_path / "small"
    data.prepare([src], out, lambda s: [1, 2], eos_id=EOS, text_key="content", val_fraction=0, progress=False)
    with pytest.raises(ValueError, match="too few"):
        data.PackedLoader(out, "train", 2, 8)
    with pytest.raises(ValueError, match="val split has 0 tokens"):
        next(data.iterate_val(out, 2, 8))
