"""The command line as a new user meets it: overrides anywhere and validated together, one-line
errors that name the command (bad overrides, a corrupt checkpoint, non-UTF-8 training text), an
empty prompt, control tokens hidden from generated text, the demo's help, exported folders that
follow the umask, and the CPU thread count."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dsv4.cli import cpu_threads, main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:       # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def printed_config(out: str) -> dict:
    return json.loads(out[:out.index("\n# parameters")])


@pytest.mark.parametrize("argv", [
    ["train", "--print", "model.num_hidden_layers=2", "model.compress_ratios=[0,4,0]"],
    ["train", "--print", "model.compress_ratios=[0,4,0]", "model.num_hidden_layers=2"],
    ["train", "model.compress_ratios=[0,4,0]", "--print", "model.num_hidden_layers=2", "--steps", "7", "lr=0.002"],
    ["train", "model.num_hidden_layers=2", "--recipe", "tiny", "model.compress_ratios=[0,4,0]", "--print"],
])
def test_overrides_anywhere_and_validated_together(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    model = printed_config(out)["model"]
    assert model["num_hidden_layers"] == 2 and model["compress_ratios"][:3] == [0, 4, 0]
    if "lr=0.002" in argv:
        assert printed_config(out)["lr"] == 0.002 and printed_config(out)["steps"] == 7


@pytest.mark.parametrize("argv,message", [
    (["train", "--print", "nope=1", "model.hidden=3"],
     "dsv4 train: error: nope=1: unknown training field 'nope'"),
    (["train", "--print", "model.num_hidden_layers=2"], "dsv4 train: error: compress_ratios"),
    (["train", "--print", "--bogus"], "dsv4 train: error: unrecognized arguments: --bogus"),
    (["info", "tiny", "x=1"], "dsv4 info: error: unrecognized arguments: x=1"),
    (["demo", "--steps", "0", "--out", "/nonexistent/never"], "dsv4 demo: error: steps must be >= 1"),
    (["generate", "--model", "tiny", "--prompt-ids", "1,x"], "dsv4 generate: error: --prompt-ids"),
    (["generate", "--model", "tiny", "--prompt-ids", "1,2", "--kv-cache", "fp8"],
     "dsv4 generate: error: FP8 KV storage needs head_dim - rope dims (64 - 16 = 48) to be a positive multiple"),
])
def test_errors_are_one_line_naming_the_command(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    if "unknown training field" in message:
        assert "unknown model field 'hidden'" in err            # every bad override in one message


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A byte-level tokenizer and a small prepared token folder, for training runs that start fast."""
    from dsv4 import data as D
    from dsv4.tokenizer import DEFAULT_TRAIN_SPECIAL_TOKENS, train_bpe

    root = tmp_path_factory.mktemp("corpus")
    tok = train_bpe([], vocab_size=len(DEFAULT_TRAIN_SPECIAL_TOKENS) + 256)
    tok.save(root / "tok")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    D.prepare([root / "docs.jsonl"], root / "data", lambda t: tok.encode(t, add_bos=True), eos_id=tok.eos_id,
              vocab_size=512, val_docs=2, progress=False)
    return root


TRAIN = ["model=tiny", "seq_len=32", "micro_batch=2", "tensorboard=false", "device=cpu", "--no-progress"]


def test_a_corrupt_checkpoint_on_resume_is_one_line(capsys, tmp_path, corpus):
    from dsv4.runlog import write_checkpoint

    run = tmp_path / "run"
    path = write_checkpoint(run / "checkpoints", 5, {"w": torch.ones(3)}, {"trainer.pt": {}})
    raw = bytearray((path / "trainer.pt").read_bytes())
    raw[-1] ^= 0xFF
    (path / "trainer.pt").write_bytes(bytes(raw))
    code, out, err = run_cli(capsys, "train", "--recipe", "tiny", "--out", str(run), "--resume",
                             f"data={corpus / 'data'}", f"tokenizer={corpus / 'tok'}", *TRAIN)
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("dsv4 train: error: ") and "trainer.pt does not match its sha256" in line
    (path / "manifest.json").write_text("{not json")
    code, out, err = run_cli(capsys, "train", "--recipe", "tiny", "--out", str(run), "--resume",
                             f"data={corpus / 'data'}", f"tokenizer={corpus / 'tok'}", *TRAIN)
    assert code == 2 and "manifest.json is not a valid checkpoint manifest" in err and "Traceback" not in err


def test_training_text_that_is_not_utf8_names_the_file_and_offset(capsys, tmp_path, corpus):
    bad = tmp_path / "notes.txt"
    bad.write_bytes("fine text\nthen caf".encode() + b"\xe9 au lait\n")
    code, out, err = run_cli(capsys, "train", "--recipe", "tiny", "--out", str(tmp_path / "run"),
                             f"data={bad}", f"tokenizer={corpus / 'tok'}", *TRAIN)
    assert code == 2 and "Traceback" not in err
    assert f"dsv4 train: error: {bad} is not UTF-8 text: byte 0xe9 at offset 18" in err


def test_empty_prompt_and_control_tokens(capsys):
    from dsv4.engine import tokenizer_for

    tok, _ = tokenizer_for(512)
    base = ["generate", "--model", "tiny", "--device", "cpu", "--max-new-tokens", "24", "--ignore-eos",
            "--temperature", "1", "--seed", "2"]
    code, ids, err = run_cli(capsys, *base, "--prompt", "", "--print-ids")
    assert code == 0 and "the prompt is empty: generating from the begin-of-sentence token alone" in err
    ids = [int(x) for x in ids.split()]
    assert len(ids) == 24
    code, out, err = run_cli(capsys, *base, "--prompt", "")
    hidden = [i for i in ids if i not in tok.control_ids]
    assert out == tok.decode(hidden) + "\n"
    code, kept, err = run_cli(capsys, *base, "--prompt", "", "--keep-special-tokens")
    assert kept == tok.decode(ids) + "\n"
    assert len(hidden) < len(ids) and kept != out      # this seed does produce control tokens


def test_demo_help_says_the_steps_it_runs(capsys):
    from dsv4.commands.demo import TINY_STEPS
    from dsv4.recipes import tiny

    assert TINY_STEPS == tiny().steps
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"the tiny recipe's {tiny().steps}" in capsys.readouterr().out


def test_exported_folders_follow_the_umask(tmp_path):
    from dsv4.checkpoint import save_pretrained
    from conftest import random_model

    old = os.umask(0o022)
    try:
        out = save_pretrained(random_model("tiny"), tmp_path / "export")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert all((f.stat().st_mode & 0o777) == 0o644 for f in out.iterdir())


def test_cpu_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == (3, "3 CPU threads (OMP_NUM_THREADS)")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for load, want in ((0.4, 8), (2.7, 6), (30.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        n, why = cpu_threads()
        assert n == want and f"8 cores, load average {load:.1f}" in why
