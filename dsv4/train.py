"""Training loop with the DeepSeek-V4 recipe (ARCHITECTURE.md §15; report §2.1, §4.2).

One optimizer step:
  1. read the step's micro-batches (their number follows the batch-size ramp) from `PackedLoader`;
  2. per micro-batch, forward with document masking (`segment_ids`, per-document positions) and
     backward the objective
        warm-up phase:  Σ_CSA KL(main attention ‖ indexer)          (everything but the indexers frozen)
        otherwise:      CE_next + λ_mtp · CE_mtp + α · L_bal  [+ w_idx · Σ_CSA KL in the sparse phase]
     where the cross-entropies are token means over the whole step (micro-batching does not change them);
  3. clip the global gradient norm, skip the step if the loss or the norm is not finite (NaN guard),
     else step Muon+AdamW and move each router bias by the sign rule from the step's expert loads;
  4. log one metrics line (loss, lr, tokens/s, aux losses, grad norm, expert loads per MoE layer).
Periodically: validation loss, atomic checkpoints (model, optimizer, step, loader position, RNG
states). At the end: `save_pretrained` export plus tokenizer files.

Choices the report leaves open are listed in docs/training.md; the ones that shape the code:
* Balance loss (V3 eq. 17–20) per packed row, summed over the non-hash MoE layers (MTP's included),
  averaged over rows. Hash layers route by token id: neither balance loss nor bias (they have none).
* CSA phases by step ranges: dense → indexer warm-up (main model frozen, loss = KL only) → sparse
  (indexer top-k; KL on the selected entries added to the objective; the model detaches the
  indexer's inputs so the KL trains the indexer only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from dsv4 import runlog, schedule
from dsv4.flops import train_flops_per_token
from dsv4.config import ModelConfig, preset
from dsv4.data import PackedLoader, iterate_val
from dsv4.model import MoE, Transformer
from dsv4.optim import MuonAdamW
from dsv4.param_groups import build_param_groups, describe_param_groups

IGNORE = -100
PHASES = ("dense", "warmup", "sparse")


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides its output directory. Recipes (`dsv4.recipes`) return these;
    `with_overrides(["lr=1e-3", "model.hidden_size=256"])` changes fields from the command line."""
    name: str = "custom"
    model: ModelConfig = field(default_factory=lambda: preset("mini"))
    # data: "bundled" (the Shakespeare works in the package), a folder written by `dsv4.data.prepare`
    # (has meta.json), or sources for `prepare` (files/folders, comma separated), tokenized into RUN/data
    data: str = "bundled"
    # "bpe": train a byte-level BPE of model.vocab_size ids on the corpus; "deepseek-v4": the released
    # tokenizer; or a path to a tokenizer.json / a folder holding one
    tokenizer: str = "bpe"
    seq_len: int = 256
    micro_batch: int = 4                  # rows per forward/backward
    batch_tokens: int = 0                 # tokens per optimizer step at the end of the ramp (0: one micro-batch)
    batch_ramp_tokens: int = 0            # tokens over which the batch grows linearly from one micro-batch
    steps: int = 300
    seed: int = 0
    # optimizer and schedule (report §4.2.2)
    lr: float = 2.7e-4                    # peak
    warmup_steps: int = 2000              # linear warm-up (capped at the decay start)
    decay_start: float = 0.8              # the cosine decay starts at this fraction of `steps`
    final_lr_ratio: float = 0.1           # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-20
    muon_momentum: float = 0.95
    muon_ns_dtype: str = "bf16"           # Newton–Schulz in bf16 (the report) or fp32 (bit-stable traces)
    optimizer: str = "muon"               # "muon": Muon for matrices (the report); "adamw": AdamW for all (ablation)
    grad_clip: float = 1.0                # global norm; 0 disables clipping (the norm is still logged)
    # DeepSeek-V4 losses and balancing
    mtp_weight: float = 0.3
    mtp_weight_decay: float = 0.1         # from decay_start on
    balance_weight: float = 1e-4          # sequence-wise balance loss α
    bias_update_speed: float = 1e-3       # aux-loss-free router bias step γ
    index_loss_weight: float = 1.0        # KL weight in the sparse phase
    # CSA phases as fractions of `steps` (so `--steps` rescales a recipe): dense attention over all
    # visible compressed entries first, then the indexer warm-up, then sparse top-k to the end
    dense_fraction: float = 0.0
    indexer_warmup_fraction: float = 0.0
    # loop
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    autocast: str = "bf16"                # CUDA only: bf16 autocast, or "none" for fp32; CPU runs fp32
    gradient_checkpointing: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 5                # consecutive non-finite steps before giving up
    export_dtype: str = "fp32"            # fp32 | bf16 for the final `save_pretrained`
    tensorboard: bool = True
    threads: int = 0                      # torch CPU threads (0: torch's default)
    peak_tflops: float = 0.0              # the device's bf16 dense peak (e.g. 790 on an H200): logs `mfu`

    def __post_init__(self):
        if self.autocast not in ("bf16", "none"):
            raise ValueError(f"autocast must be 'bf16' or 'none', got {self.autocast!r}")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.muon_ns_dtype not in ("fp32", "bf16"):
            raise ValueError(f"muon_ns_dtype must be 'bf16' or 'fp32', got {self.muon_ns_dtype!r}")
        if self.export_dtype not in ("fp32", "bf16"):
            raise ValueError(f"export_dtype must be 'fp32' or 'bf16', got {self.export_dtype!r}")
        for name in ("seq_len", "micro_batch", "steps", "eval_batches", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("decay_start", "dense_fraction", "indexer_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a fraction of the steps and must be in [0, 1], got {getattr(self, name)}")
        if self.dense_fraction + self.indexer_warmup_fraction > 1:
            raise ValueError("dense_fraction + indexer_warmup_fraction must not exceed 1")

    @property
    def decay_start_step(self) -> int:
        return round(self.decay_start * self.steps)

    @property
    def dense_steps(self) -> int:
        return round(self.dense_fraction * self.steps)

    @property
    def indexer_warmup_steps(self) -> int:
        return round((self.dense_fraction + self.indexer_warmup_fraction) * self.steps) - self.dense_steps

    def phase_at(self, step: int) -> str:
        """CSA training phase of the step with 0-based index `step`."""
        if step < self.dense_steps:
            return "dense"
        return "warmup" if step < self.dense_steps + self.indexer_warmup_steps else "sparse"

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model.to_hf_config()
        d["adam_betas"] = list(self.adam_betas)
        return d

    def with_overrides(self, items: list[str]) -> "TrainConfig":
        """Apply `key=value` strings; `model.KEY=value` changes the model, `model=PRESET` swaps it."""
        changes: dict[str, Any] = {}
        model = self.model
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must look like key=value")
            key = key.strip()
            if key == "model":
                model = preset(raw)
            elif key.startswith("model."):
                name = key[len("model."):]
                if name not in {f.name for f in dataclasses.fields(ModelConfig)}:
                    raise ValueError(f"unknown model field {name!r} in override {item!r}")
                model = model.with_(**{name: _coerce(raw, getattr(model, name))})
            else:
                fields = {f.name: f for f in dataclasses.fields(self)}
                if key not in fields:
                    raise ValueError(f"unknown training field {key!r}; known: {', '.join(sorted(fields))}")
                changes[key] = _coerce(raw, getattr(self, key))
        return dataclasses.replace(self, model=model, **changes)


def _coerce(raw: str, current: Any) -> Any:
    """Parse an override value to the type of the field's current value."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if str(raw).lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return str(raw).lower() in ("true", "yes", "on", "1")
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(current, int) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if float(value) != int(value):
            raise ValueError(f"expected an integer, got {raw!r}")
        return int(value)
    if isinstance(current, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, str):
        return raw
    if current is None or isinstance(value, type(current)):
        return value
    raise ValueError(f"cannot use {raw!r} for a field of type {type(current).__name__}")


# ----------------------------------------------------------------------------- V4 losses and balancing
def mtp_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets of the MTP block [B, S−1]: position t predicts token t+2 = labels[t+1].

    labels[t] is token t+1 or IGNORE where t+1 starts another document, so a target is kept only
    when both t→t+1 and t+1→t+2 stay inside one document.
    """
    return torch.where(labels[:, :-1] != IGNORE, labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE))


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: indices [T, K] -> [E] (a token counts once per selected expert)."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts)


def sequence_balance_loss(indices: torch.Tensor, affinity: torch.Tensor, rows: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (V3 eqs. 17–20), averaged over the `rows` sequences.

    indices [T, K] selected experts, affinity [T, E] un-normalised scores s (fp32, with grad); the
    T = rows·S tokens are row-major. Per sequence: f_i = E/(K·S) · #{t: i ∈ top-K(t)},
    P_i = (1/S) Σ_t s_it / Σ_j s_jt, L = Σ_i f_i · P_i (1 when perfectly balanced). Unweighted (α outside).
    """
    T, K = indices.shape
    E = affinity.shape[-1]
    S = T // rows
    counts = torch.zeros(rows, E, device=indices.device, dtype=torch.float32)
    counts.scatter_add_(1, indices.reshape(rows, S * K), torch.ones(rows, S * K, device=indices.device))
    f = counts * (E / (K * S))                                                          # [rows, E]
    p = (affinity / affinity.sum(-1, keepdim=True)).reshape(rows, S, E).mean(dim=1)     # [rows, E]
    return (f * p).sum(-1).mean()


@torch.no_grad()
def update_router_bias(bias: torch.Tensor, counts: torch.Tensor, speed: float) -> None:
    """Aux-loss-free balancing (V3 §2.1.2): b_i += γ · sign(mean load − load_i), in place."""
    load = counts.to(bias.dtype)
    bias.add_(speed * torch.sign(load.mean() - load))


def moe_layers(model: Transformer) -> list[tuple[str, MoE]]:
    """(name, MoE block) of every main layer and MTP block, in checkpoint naming."""
    return ([(f"layers.{i}", layer.ffn) for i, layer in enumerate(model.layers)]
            + [(f"mtp.{k}", block.ffn) for k, block in enumerate(model.mtp)])


def csa_attentions(model: Transformer) -> list:
    return [layer.attn for layer in model.layers if layer.attn.indexer is not None]


def set_phase(model: Transformer, phase: str) -> None:
    """Switch the CSA layers and the trainable set to a training phase (see the module docstring)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    for attn in csa_attentions(model):
        attn.index_mode = "sparse" if phase == "sparse" else "dense"
        attn.index_loss = phase != "dense"
    for name, p in model.named_parameters():
        p.requires_grad_(phase != "warmup" or ".indexer." in name)


# ----------------------------------------------------------------------------- schedule
def lr_at(cfg: TrainConfig, step: int) -> float:
    return schedule.lr_at(step, warmup=min(cfg.warmup_steps, cfg.decay_start_step), total=cfg.steps, decay_start=cfg.decay_start_step,
                          peak=cfg.lr, final_ratio=cfg.final_lr_ratio)


def mtp_weight_at(cfg: TrainConfig, step: int) -> float:
    return schedule.mtp_weight_at(step, cfg.decay_start_step, cfg.mtp_weight, cfg.mtp_weight_decay)


def micro_batches_at(cfg: TrainConfig, tokens_seen: int) -> int:
    """Gradient-accumulation steps: the ramped batch size over the fixed micro-batch shape."""
    per_micro = cfg.micro_batch * cfg.seq_len
    if cfg.batch_tokens <= per_micro:
        return 1
    tokens = schedule.batch_tokens_at(tokens_seen, cfg.batch_ramp_tokens, per_micro, cfg.batch_tokens)
    return max(1, int(tokens) // per_micro)


# ----------------------------------------------------------------------------- setup helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use device=cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states in types `torch.load(weights_only=True)` reads."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_inputs(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None] = print):
    """The run's tokenizer (saved to RUN/tokenizer) and token data folder (prepared into RUN/data
    unless `cfg.data` already is one). Returns (tokenizer, data_dir)."""
    from dsv4 import data as D
    from dsv4.tokenizer import load_tokenizer, train_bpe

    tok_dir, data_dir = run_dir / "tokenizer", run_dir / "data"
    given = Path(cfg.data) if cfg.data != "bundled" else None
    if (tok_dir / "tokenizer.json").exists():
        tok = load_tokenizer(tok_dir)
    elif cfg.tokenizer == "bpe":
        if given is not None:
            raise ValueError("tokenizer=bpe trains on the bundled corpus only; pass tokenizer=PATH (or "
                             "deepseek-v4) for other data")
        t0 = time.perf_counter()
        tok = train_bpe([d["text"] for d in D.load_bundled_corpus()], cfg.model.vocab_size)
        log(f"trained a byte-level BPE of {tok.vocab_size} ids on the bundled corpus "
            f"({time.perf_counter() - t0:.1f}s)")
        tok.save(tok_dir)
    else:
        tok = load_tokenizer(None if cfg.tokenizer == "deepseek-v4" else cfg.tokenizer)
        tok.save(tok_dir)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{cfg.model.vocab_size}; set model.vocab_size={tok.vocab_size}")
    if given is not None and (given / "meta.json").exists():
        return tok, given
    if not (data_dir / "meta.json").exists():
        sources = [D.BUNDLED] if given is None else [s for s in cfg.data.split(",") if s]
        t0 = time.perf_counter()
        # documents are BOS + text + EOS, as the engine prepends BOS to prompts
        D.prepare(sources, data_dir, lambda text: tok.encode(text, add_bos=True), eos_id=tok.eos_id,
                  tokenizer=f"{cfg.tokenizer} ({tok.vocab_size} ids)", vocab_size=cfg.model.vocab_size,
                  seed=cfg.seed, progress=False)
        log(f"tokenized the corpus into {data_dir} ({time.perf_counter() - t0:.1f}s)")
    return tok, data_dir


def build_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    model = Transformer(cfg.model)
    model.init_weights(seed=cfg.seed)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    for _, moe in moe_layers(model):
        moe.record = True
    return model.to(device).train()


def build_optimizer(model: Transformer, cfg: TrainConfig):
    groups = build_param_groups(model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":  # same groups and decay, every update AdamW
        groups = [dict(g, kind="adamw") for g in groups]
    return MuonAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                     betas=cfg.adam_betas, eps=cfg.adam_eps,
                     ns_dtype=torch.float32 if cfg.muon_ns_dtype == "fp32" else torch.bfloat16)


def batch_losses(model: Transformer, batch: dict[str, torch.Tensor], cfg: TrainConfig, phase: str,
                 mtp_weight: float, n_lm: int, n_mtp: int, n_micro: int = 1,
                 counts: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of one micro-batch (see the module docstring) and its terms.

    `n_lm`/`n_mtp`: target tokens of the whole optimizer step, so the cross-entropies of the micro-batches
    add up to the step's token means; the balance and index terms are averaged over `n_micro`.
    `counts` ({MoE name: [E] long}) accumulates the tokens routed to each expert.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    seg, pos = batch["doc_ids"].long(), batch["positions"]
    use_mtp = phase != "warmup" and mtp_weight > 0 and len(model.mtp) > 0
    logits, h = model(ids, segment_ids=seg, positions=pos, return_hidden=True)
    terms = {"lm": F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                   reduction="sum") / n_lm}
    del logits
    if use_mtp:
        mtp_logits = model.mtp_logits(h[:, :-1], ids[:, 1:], segment_ids=seg[:, :-1], positions=pos[:, :-1])
        terms["mtp"] = F.cross_entropy(mtp_logits.flatten(0, 1).float(), mtp_targets(labels).flatten(),
                                       ignore_index=IGNORE, reduction="sum") / n_mtp
    balance = []
    for name, moe in moe_layers(model):
        if moe.last_routing is None:
            continue
        idx, aff = moe.last_routing
        if counts is not None:
            counts[name] += expert_counts(idx, moe.gate.n_experts)
        if not moe.gate.hashed:
            balance.append(sequence_balance_loss(idx, aff, ids.shape[0]))
        moe.last_routing = None
    if balance and phase != "warmup":
        terms["balance"] = torch.stack(balance).sum() / n_micro
    attns = csa_attentions(model)
    if phase != "dense" and attns:
        terms["index"] = torch.stack([a.last_index_loss for a in attns]).sum() / n_micro
        for a in attns:
            a.last_index_loss = None
    if phase == "warmup":
        return terms["index"], terms
    objective = terms["lm"] + cfg.balance_weight * terms.get("balance", 0.0)
    if "mtp" in terms:
        objective = objective + mtp_weight * terms["mtp"]
    if phase == "sparse" and "index" in terms:
        objective = objective + cfg.index_loss_weight * terms["index"]
    return objective, terms


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Owns the model, optimizer, loader and run directory of one training run.

    `fit()` runs to `cfg.steps` (`until=` stops earlier without a final checkpoint, as a crash would);
    `train_step()` and `evaluate()` are the pieces. `resume=True` continues from the newest complete
    checkpoint in `run_dir/checkpoints` exactly (bitwise on CPU).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.cfg, self.run_dir, self.progress, self.print = cfg, Path(run_dir), progress, log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.tokenizer, self.data_dir = prepare_inputs(cfg, self.run_dir, log)
        seed_everything(cfg.seed)
        self.model = build_model(cfg, self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.loader = PackedLoader(self.data_dir, "train", cfg.micro_batch, cfg.seq_len, seed=cfg.seed)
        self.step = self.tokens = self.bad_steps = 0
        self.last_eval: dict[str, float] = {}
        resumed_from = None
        if not resume and runlog.latest_checkpoint(self.ckpt_dir) is not None:
            raise ValueError(f"{self.run_dir} already holds checkpoints of a run; resume it (--resume) or "
                             "choose another output directory")
        if resume:
            ckpt = runlog.latest_checkpoint(self.ckpt_dir)
            if ckpt is None:
                log(f"no checkpoint in {self.ckpt_dir}; starting from scratch")
            else:
                self.load_checkpoint(ckpt)
                resumed_from = self.step
                log(f"resumed from {ckpt} (step {self.step})")
        runlog.prune_checkpoints(self.ckpt_dir, 0)  # stale temporary folders of a crashed write
        env = runlog.describe_environment(self.device)
        runlog.write_run_json(self.run_dir, cfg.to_dict(), env, resumed_from)
        self.metrics = runlog.MetricsLog(self.run_dir, start_step=self.step, tensorboard=cfg.tensorboard)
        log(describe_param_groups(self.optimizer.param_groups))
        d, w = cfg.dense_steps, cfg.indexer_warmup_steps

        def span(a: int, b: int) -> str:
            return f"{a}–{b - 1}" if b > a else "none"
        log(f"{cfg.steps} steps: dense attention {span(0, d)}, indexer warm-up {span(d, d + w)}, sparse "
            f"{span(d + w, cfg.steps)}; lr {cfg.lr:g}, warm-up {min(cfg.warmup_steps, cfg.decay_start_step)} "
            f"steps, cosine decay (and MTP weight {cfg.mtp_weight_decay:g}) from step {cfg.decay_start_step}")
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.seq_len, mtp=cfg.mtp_weight > 0)["total"]
        counts = cfg.model.param_counts()
        log(f"model: {counts['total_with_mtp'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active "
            f"per token), device {env['device']['name']} ({self.device}), ops backend {env['ops_backend']}, "
            f"commit {(env['git']['commit'] or 'unknown')[:10]}")

    # -------------------------------------------------------------- one step
    def autocast(self):
        if self.device.type == "cuda" and self.cfg.autocast == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (possibly skipped by the NaN guard); returns its metrics record."""
        cfg, model, step = self.cfg, self.model, self.step
        phase = cfg.phase_at(step)
        set_phase(model, phase)
        lr, mtp_w = lr_at(cfg, step), mtp_weight_at(cfg, step)
        self.optimizer.set_lr(lr)
        batches = [next(self.loader) for _ in range(micro_batches_at(cfg, self.tokens))]
        n_lm = max(1, sum(int((b["labels"] != IGNORE).sum()) for b in batches))
        n_mtp = max(1, sum(int((mtp_targets(b["labels"]) != IGNORE).sum()) for b in batches))
        moes = [(n, m) for n, m in moe_layers(model)]
        counts = {n: torch.zeros(m.gate.n_experts, dtype=torch.long, device=self.device) for n, m in moes}
        sums: dict[str, float] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        for b in batches:
            parts = self._micro_step(b, phase, mtp_w, n_lm, n_mtp, len(batches), counts)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) \
                if params else 0.0
        ok = math.isfinite(sums["objective"]) and math.isfinite(grad_norm)
        if ok:
            self.optimizer.step()
            if phase != "warmup":
                for name, moe in moes:
                    if not moe.gate.hashed:
                        update_router_bias(moe.gate.bias, counts[name], cfg.bias_update_speed)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        for _, moe in moes:
            moe.last_routing = None
        for attn in csa_attentions(model):
            attn.last_index_loss = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        n_tokens = len(batches) * cfg.micro_batch * cfg.seq_len
        self.step += 1
        self.tokens += n_tokens
        record = {"step": self.step, "loss": sums["lm"], "lr": lr, "tokens_per_s": n_tokens / seconds,
                  "phase": phase, "objective": sums["objective"], "mtp_loss": sums.get("mtp"),
                  "mtp_weight": mtp_w, "balance_loss": sums.get("balance"), "index_loss": sums.get("index"),
                  "grad_norm": grad_norm, "tokens": self.tokens, "micro_batches": len(batches),
                  "step_seconds": seconds, "model_tflops": n_tokens * self.flops_per_token / seconds / 1e12}
        if cfg.peak_tflops > 0:
            record["mfu"] = record["model_tflops"] / cfg.peak_tflops
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        loads = {n: (c.float() / c.sum()).tolist() for n, c in counts.items() if int(c.sum()) > 0}
        record["max_load"] = {n: max(v) * len(v) for n, v in loads.items()}
        record["expert_load"] = {n: [round(x, 5) for x in v] for n, v in loads.items()}
        if not ok:
            record.update(skipped=True, bad_steps=self.bad_steps)
            self.print(f"step {self.step}: non-finite loss {sums['objective']} or gradient norm {grad_norm}; "
                       f"step skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= cfg.max_bad_steps:
                self.metrics.write(record)
                raise TrainingDiverged(f"{self.bad_steps} consecutive steps with a non-finite loss or "
                                       f"gradient (last at step {self.step}); lower lr or check the data")
        return record

    def _micro_step(self, batch: dict[str, torch.Tensor], phase: str, mtp_w: float, n_lm: int, n_mtp: int,
                    n_micro: int, counts: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward + backward of one micro-batch; returns its share of each loss term."""
        dev = self.device
        batch = {k: v.to(dev) for k, v in batch.items()}
        with self.autocast():
            objective, terms = batch_losses(self.model, batch, self.cfg, phase, mtp_w, n_lm, n_mtp, n_micro, counts)
        if objective.requires_grad:
            objective.backward()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["objective"] = float(objective.detach())
        return out

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over the first `eval_batches` validation batches (same batches each time)."""
        cfg, model = self.cfg, self.model
        model.eval()
        for attn in csa_attentions(model):
            attn.index_loss = False
        total, count = 0.0, 0
        for b in iterate_val(self.data_dir, cfg.micro_batch, cfg.seq_len, max_batches=cfg.eval_batches):
            labels = b["labels"].to(self.device)
            with self.autocast():
                logits = model(b["input_ids"].to(self.device), segment_ids=b["doc_ids"].to(self.device).long(),
                               positions=b["positions"].to(self.device))
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                           reduction="sum"))
            count += int((labels != IGNORE).sum())
        for _, moe in moe_layers(model):
            moe.last_routing = None
        model.train()
        set_phase(model, cfg.phase_at(max(self.step - 1, 0)))
        loss = total / max(count, 1)
        self.last_eval = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        return self.last_eval

    # -------------------------------------------------------------- the loop
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to `cfg.steps` (or stop after step `until`); returns the last metrics record."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        end = cfg.steps if until is None else min(until, cfg.steps)
        record: dict[str, Any] = {}
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.name}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < end:
                record = self.train_step()
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    record.update(self.evaluate())
                self.metrics.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", phase=record["phase"],
                                **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
                                **({"val": f"{self.last_eval['val_loss']:.3f}"} if self.last_eval else {}))
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.step >= cfg.steps and until is None:
            self.export(self.run_dir / "model")
        return record

    # -------------------------------------------------------------- checkpoints and export
    def save_checkpoint(self) -> Path:
        trainer_state = {"step": self.step, "tokens": self.tokens, "bad_steps": self.bad_steps,
                         "loader": self.loader.state_dict(), "rng": rng_state(),
                         "config": json.dumps(self.cfg.to_dict(), default=str)}
        path = runlog.write_checkpoint(self.ckpt_dir, self.step, {
            "model.pt": self.model.state_dict(), "optimizer.pt": self.optimizer.state_dict(),
            "trainer.pt": trainer_state})
        runlog.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = runlog.read_checkpoint(path)
        trainer = state["trainer.pt"]
        saved = json.loads(trainer["config"])["model"]
        if saved != json.loads(json.dumps(self.cfg.model.to_hf_config(), default=str)):
            raise runlog.CheckpointError(f"{path} was written for another model config; resume with the "
                                         "recipe and overrides the run started with")
        self.model.load_state_dict(state["model.pt"])
        self.optimizer.load_state_dict(state["optimizer.pt"])
        self.loader.load_state_dict(trainer["loader"])
        self.step, self.tokens, self.bad_steps = trainer["step"], trainer["tokens"], trainer["bad_steps"]
        set_rng_state(trainer["rng"])

    def export(self, path: Path) -> Path:
        """The final model as a `save_pretrained` folder (+ tokenizer), readable by `load_pretrained`
        and by transformers' DeepseekV4ForCausalLM."""
        from dsv4.checkpoint import save_pretrained

        self.tokenizer.save(self.run_dir / "tokenizer")
        dtype = torch.float32 if self.cfg.export_dtype == "fp32" else torch.bfloat16
        out = save_pretrained(self.model, path, dtype=dtype, tokenizer_dir=self.run_dir / "tokenizer",
                              overwrite=True)
        self.print(f"exported the model to {out}")
        return out

    def close(self) -> None:
        self.metrics.close()


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> Trainer:
    """Run a recipe to the end in `run_dir`; returns the finished Trainer (model, last eval)."""
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress, log=log)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer
