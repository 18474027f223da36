"""Named training recipes: each a function returning a `TrainConfig`.

* `tiny`:  CPU demo. The `mini` model (10.8M parameters with MTP) on the bundled Shakespeare works with
           a 4096-id BPE trained on them; 250 steps of 4×256 tokens, all three CSA phases; about
           five minutes on two CPU cores (docs/training.md has the measured time).
* `small`: one GPU. The `small` model (259M total, 105M active, 275M with MTP) with the released
           DeepSeek-V4 tokenizer; point `data=` at a real corpus (the bundled one is tiny for it).
* `flash`, `pro`: the report's hyperparameters (§4.2.2) for reference; constructible and printable,
           not runnable here. Token budgets are converted to steps at the full batch size.
"""
from __future__ import annotations

from dsv4.config import preset
from dsv4.train import TrainConfig


def tiny() -> TrainConfig:
    """CPU demo: 250 steps × 1024 tokens; dense 0–124, indexer warm-up 125–139, sparse 140–249.

    Router bias speed 0.01 instead of the report's 0.001: in 250 steps a bias moving 0.001 per step
    cannot undo the imbalance of a fresh router (measured: max expert load 2.5–3.7× the mean at the end
    with 0.001, 1.1–1.3× with 0.01, same validation loss)."""
    return TrainConfig(
        name="tiny", model=preset("mini"), data="bundled", tokenizer="bpe",
        seq_len=256, micro_batch=4, steps=250, seed=0,
        lr=3e-3, warmup_steps=25, decay_start=0.7, final_lr_ratio=0.1, weight_decay=0.1,
        bias_update_speed=0.01, dense_fraction=0.5, indexer_warmup_fraction=0.06,
        eval_every=50, eval_batches=4, ckpt_every=100, keep_checkpoints=2, device="cpu")


def small() -> TrainConfig:
    """One GPU (H200-class): 16K tokens per micro-batch, batch ramp 64K → 256K tokens over 0.5B tokens."""
    return TrainConfig(
        name="small", model=preset("small"), data="bundled", tokenizer="deepseek-v4",
        seq_len=4096, micro_batch=4, batch_tokens=256 * 1024, batch_ramp_tokens=500_000_000,
        steps=20_000, lr=1e-3, warmup_steps=500, decay_start=0.8, final_lr_ratio=0.1,
        dense_fraction=0.1, indexer_warmup_fraction=0.01,
        eval_every=500, eval_batches=16, ckpt_every=1_000, keep_checkpoints=3, device="auto",
        gradient_checkpointing=False)


def _report(name: str, model: str, lr: float, batch_tokens: int, total_tokens: float, dense_tokens: float):
    """Report §4.2.2: warm-up 2000 steps, constant peak, cosine to 10% near the end (assumed: the last
    20% of steps), batch ramp (assumed as V3: over the first 469B tokens), 4K context (first stage),
    indexer warm-up of about V3.2's 2.1B tokens."""
    seq_len = 4096
    steps = round(total_tokens / batch_tokens)
    return TrainConfig(
        name=name, model=preset(model), data="bundled", tokenizer="deepseek-v4",
        seq_len=seq_len, micro_batch=1, batch_tokens=batch_tokens, batch_ramp_tokens=469_000_000_000,
        steps=steps, lr=lr, warmup_steps=2000, decay_start=0.8, final_lr_ratio=0.1,
        weight_decay=0.1, adam_betas=(0.9, 0.95), adam_eps=1e-20, muon_momentum=0.95,
        mtp_weight=0.3, mtp_weight_decay=0.1, balance_weight=1e-4, bias_update_speed=1e-3,
        dense_fraction=dense_tokens / total_tokens, indexer_warmup_fraction=2.1e9 / total_tokens,
        eval_every=1000, eval_batches=64, ckpt_every=1000, device="auto", gradient_checkpointing=True)


def flash() -> TrainConfig:
    """DeepSeek-V4-Flash: peak lr 2.7e-4, batch 75.5M tokens, 32T tokens, dense for the first 1T."""
    return _report("flash", "deepseek-v4-flash", 2.7e-4, 18_432 * 4096, 32e12, 1e12)


def pro() -> TrainConfig:
    """DeepSeek-V4-Pro: peak lr 2.0e-4, batch 94.4M tokens, 33T tokens, dense longer than Flash
    (the report gives no number; assumed 1.5T)."""
    return _report("pro", "deepseek-v4-pro", 2.0e-4, 23_040 * 4096, 33e12, 1.5e12)


RECIPES = {"tiny": tiny, "small": small, "flash": flash, "pro": pro}


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()
