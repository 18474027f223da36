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

Under torchrun the same loop runs in every process on its rows of each global batch (`micro_batch`
counts the rows of all processes together), the model sharded by `dsv4.parallel` (FSDP2, expert
parallelism). Token counts, the loss terms, the gradient norm and the NaN-guard decision, and the
expert loads behind the router-bias update are all-reduced, so the step is the one-process step on the
same global batch (tests/test_parallel.py checks the losses to 1e-5).

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
import logging
import math
import random
import time
import warnings
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
from dsv4.parallel import reduce
from dsv4.parallel.mesh import ParallelDims
from dsv4.train_graphs import MicroStepGraphs, OptimizerGraph
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
    micro_batch: int = 4                  # rows per forward/backward, over all processes together
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
    peak_tflops: float = 0.0              # one device's bf16 dense peak (e.g. 790 on an H200): logs `mfu`
    # several processes (torchrun; dsv4.parallel): world = dp_replicate × dp_shard for the dense layers,
    # ep ranks share the routed experts of each MoE block (must divide the world and n_routed_experts)
    dp_replicate: int = 1                 # HSDP replicas (1: FSDP over all processes)
    ep: int = 1                           # expert-parallel degree
    fsdp_param_dtype: str = "fp32"        # dtype FSDP gathers parameters in: fp32 (autocast casts) or bf16
    # replay each micro-batch's forward + backward from a CUDA graph (`dsv4.train_graphs`): "auto" where
    # it applies (one CUDA process, no gradient checkpointing), "on" (an error where it cannot), "off"
    cuda_graphs: str = "auto"

    def __post_init__(self):
        if self.autocast not in ("bf16", "none"):
            raise ValueError(f"autocast must be 'bf16' or 'none', got {self.autocast!r}")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.muon_ns_dtype not in ("fp32", "bf16"):
            raise ValueError(f"muon_ns_dtype must be 'bf16' or 'fp32', got {self.muon_ns_dtype!r}")
        if self.export_dtype not in ("fp32", "bf16"):
            raise ValueError(f"export_dtype must be 'fp32' or 'bf16', got {self.export_dtype!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be 'auto', 'on' or 'off', got {self.cuda_graphs!r}")
        if self.fsdp_param_dtype not in ("fp32", "bf16"):
            raise ValueError(f"fsdp_param_dtype must be 'fp32' or 'bf16', got {self.fsdp_param_dtype!r}")
        for name in ("seq_len", "micro_batch", "steps", "eval_batches", "eval_every", "ckpt_every", "dp_replicate",
                     "ep"):
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
        """Apply `key=value` strings; `model.KEY=value` changes the model, `model=PRESET` swaps it.

        All of them are applied at once, in any order: the preset first, then every model field
        together (so `model.num_hidden_layers=2 model.compress_ratios=[0,4,0]` is one consistent
        change), then the training fields; every unknown key or bad value is reported in one error."""
        changes: dict[str, Any] = {}
        model_changes: dict[str, Any] = {}
        model, errors = self.model, []
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            try:
                if not sep:
                    raise ValueError(f"override {item!r} must look like key=value")
                if key == "model":
                    model = preset(raw)
                elif key.startswith("model."):
                    name = key[len("model."):]
                    if name not in model_fields:
                        raise ValueError(f"unknown model field {name!r} in override {item!r}")
                    model_changes[name] = raw
                elif key not in fields:
                    raise ValueError(f"unknown training field {key!r}; known: {', '.join(sorted(fields))}")
                else:
                    changes[key] = _coerce(raw, getattr(self, key))
            except ValueError as exc:
                errors.append(f"{item}: {exc}" if str(exc).find(item) < 0 else str(exc))
        for name, raw in model_changes.items():
            try:
                model_changes[name] = _coerce(raw, getattr(model, name))
            except ValueError as exc:
                errors.append(f"model.{name}={raw}: {exc}")
        if errors:
            raise ValueError("; ".join(errors))
        if model_changes:
            model = model.with_(**model_changes)
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
    """Tokens routed to each expert: indices [T, K] -> [E] (a token counts once per selected expert).
    A scatter-add of ones: unlike `bincount` on CUDA it needs no host read of the largest id."""
    flat = indices.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


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
            raise ValueError("tokenizer=bpe trains on the bundled corpus only; with data= give a tokenizer too: "
                             "tokenizer=runs/demo/tokenizer (the demo's byte-level BPE, which reads any text), "
                             "a folder or tokenizer.json of your own, or tokenizer=deepseek-v4 "
                             "model.vocab_size=129280")
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
    return model.to(device).train()


def build_optimizer(model: Transformer, cfg: TrainConfig):
    """MuonAdamW over the model's parameters (built after `parallelize`: it then holds the shards), with
    every state created up front so that checkpoints always hold the same entries."""
    groups = build_param_groups(model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":  # same groups and decay, every update AdamW
        groups = [dict(g, kind="adamw") for g in groups]
    opt = MuonAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                    betas=cfg.adam_betas, eps=cfg.adam_eps,
                    ns_dtype=torch.float32 if cfg.muon_ns_dtype == "fp32" else torch.bfloat16)
    opt.init_state()
    return opt


def batch_losses(model: Transformer, batch: dict[str, torch.Tensor], cfg: TrainConfig, phase: str,
                 mtp_weight: float | torch.Tensor, n_lm: int | torch.Tensor, n_mtp: int | torch.Tensor,
                 n_micro: int | torch.Tensor = 1, counts: dict[str, torch.Tensor] | None = None,
                 share: float = 1.0, use_mtp: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of one micro-batch (see the module docstring) and its terms.

    `n_lm`/`n_mtp`: target tokens of the whole optimizer step (over all processes), so the cross-entropies
    of the micro-batches add up to the step's token means; the balance and index terms are averaged over
    `n_micro`. `counts` ({MoE name: [E] long}) accumulates the tokens routed to each expert.
    With several processes `batch` is this process's `share` of the micro-batch's rows and the terms are
    its part of the whole micro-batch's terms (their sum over processes): the balance loss is a mean over
    rows, so it is scaled by `share`; the index KL divides by the query count of the whole micro-batch
    (all-reduced here, a collective call).

    The step's numbers may be device tensors (0-d) instead of host numbers: then nothing here reads the
    device, which is what a CUDA-graph recording of the micro-step needs (`dsv4.train_graphs`); `use_mtp`
    must then be given (by default it is read from `mtp_weight`).
    """
    ids, labels = batch["input_ids"], batch["labels"]
    seg, pos = batch["doc_ids"].long(), batch["positions"]
    if use_mtp is None:
        use_mtp = mtp_weight > 0
    use_mtp = phase != "warmup" and bool(use_mtp) and len(model.mtp) > 0
    logits, h, aux = model(ids, segment_ids=seg, positions=pos, return_hidden=True, return_aux=True)
    terms = {"lm": F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                   reduction="sum") / n_lm}
    del logits
    if use_mtp:
        mtp_logits, mtp_aux = model.mtp_logits(h[:, :-1], ids[:, 1:], segment_ids=seg[:, :-1],
                                               positions=pos[:, :-1], return_aux=True)
        terms["mtp"] = F.cross_entropy(mtp_logits.flatten(0, 1).float(), mtp_targets(labels).flatten(),
                                       ignore_index=IGNORE, reduction="sum") / n_mtp
        aux = aux + mtp_aux
    balance = []
    for (name, moe), a in zip(moe_layers(model), aux):      # main blocks, then the MTP blocks that ran
        if counts is not None:
            counts[name] += expert_counts(a.indices, moe.gate.n_experts)
        if not moe.gate.hashed:
            balance.append(sequence_balance_loss(a.indices, a.affinities, ids.shape[0]))
    if balance and phase != "warmup":
        terms["balance"] = share * torch.stack(balance).sum() / n_micro
    kls = [a.index_kl for a in aux if a.index_kl is not None]
    if phase != "dense" and kls:
        queries = reduce.sum_over_ranks(torch.stack([n for _, n in kls]).float())   # per layer, all processes
        terms["index"] = (torch.stack([kl for kl, _ in kls]) / queries.clamp(min=1.0)).sum() / n_micro
    if phase == "warmup":
        return terms["index"], terms
    objective = terms["lm"] + cfg.balance_weight * terms.get("balance", 0.0)
    if "mtp" in terms:
        objective = objective + mtp_weight * terms["mtp"]
    if phase == "sparse" and "index" in terms:
        objective = objective + cfg.index_loss_weight * terms["index"]
    return objective, terms


def _quiet(*_) -> None:
    pass


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Owns the model, optimizer, loader and run directory of one training run.

    `fit()` runs to `cfg.steps` (`until=` stops earlier without a final checkpoint, as a crash would);
    `train_step()` and `evaluate()` are the pieces. `resume=True` continues from the newest complete
    checkpoint in `run_dir/checkpoints` exactly (bitwise on CPU with the same number of processes).

    With an initialised process group (torchrun; `dsv4.parallel.launch`) every process builds a Trainer
    with the same arguments: the model is sharded with `dsv4.parallel.parallelize` over the layout
    `cfg.dp_replicate` / `cfg.ep`, each process reads its rows of every global batch, and rank 0 alone
    logs and writes the run directory's files (checkpoints are written by all).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.rank, self.world = reduce.rank(), reduce.world_size()
        self.is_main = self.rank == 0
        log = log if self.is_main else _quiet
        self.cfg, self.run_dir, self.progress, self.print = cfg, Path(run_dir), progress and self.is_main, log
        self.dims = ParallelDims(self.world, cfg.dp_replicate, cfg.ep)
        self.dims.check_model(cfg.model.n_routed_experts)
        self.dims.check_batch(cfg.micro_batch)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.is_main:                       # tokenizer training and tokenization happen once
            self.tokenizer, self.data_dir = prepare_inputs(cfg, self.run_dir, log)
        reduce.barrier()
        if not self.is_main:
            self.tokenizer, self.data_dir = prepare_inputs(cfg, self.run_dir, _quiet)
        seed_everything(cfg.seed)
        self.model = build_model(cfg, self.device)
        if reduce.distributed():
            from dsv4.parallel import build_mesh, parallelize
            param_dtype = torch.bfloat16 if cfg.fsdp_param_dtype == "bf16" else None
            parallelize(self.model, build_mesh(self.dims, self.device.type), param_dtype=param_dtype)
        self.optimizer = build_optimizer(self.model, cfg)
        self.graphs = self._step_graphs() if cfg.cuda_graphs != "off" else None
        self.optimizer_graph = None if self.graphs is None else OptimizerGraph(self.optimizer, self.device, self.print)
        self.loader = PackedLoader(self.data_dir, "train", cfg.micro_batch // self.world, cfg.seq_len,
                                   seed=cfg.seed, rank=self.rank, world_size=self.world)
        self.step = self.tokens = self.bad_steps = 0
        self.last_eval: dict[str, float] = {}
        resumed_from = None
        latest = runlog.latest_checkpoint(self.ckpt_dir)
        if not resume and latest is not None:
            raise ValueError(f"{self.run_dir} already holds checkpoints of a run; resume it (--resume) or "
                             "choose another output directory")
        if resume:
            if latest is None:
                log(f"no checkpoint in {self.ckpt_dir}; starting from scratch")
            else:
                self.load_checkpoint(latest)
                resumed_from = self.step
                log(f"resumed from {latest} (step {self.step})")
        if self.is_main:
            runlog.prune_checkpoints(self.ckpt_dir, 0)  # stale temporary folders of a crashed write
        reduce.barrier()
        env = runlog.describe_environment(self.device)
        env["parallel"] = {"world": self.world, "dp_replicate": cfg.dp_replicate, "ep": cfg.ep}
        self.metrics = None
        if self.is_main:
            runlog.write_run_json(self.run_dir, cfg.to_dict(), env, resumed_from)
            self.metrics = runlog.MetricsLog(self.run_dir, start_step=self.step, tensorboard=cfg.tensorboard)
        self._log_start(env)

    def _log_start(self, env: dict[str, Any]) -> None:
        cfg, log = self.cfg, self.print
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
            f"per token), device {env['device']['name']} ({self.device}), ops {', '.join(f'{k}={v}' for k, v in env['ops_backends'].items())}, "
            f"commit {(env['git']['commit'] or 'unknown')[:10]}")
        if reduce.distributed():
            log(f"{self.dims.describe()}; {cfg.micro_batch // self.world} of the {cfg.micro_batch} rows of each "
                f"micro-batch per process")
        if self.graphs is not None:
            log("micro-steps and optimizer steps replayed from CUDA graphs (cuda_graphs=off for eager steps)")

    # -------------------------------------------------------------- one step
    def autocast(self, cache: bool = True):
        if self.device.type == "cuda" and self.cfg.autocast == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()

    def _step_graphs(self, record: bool = True) -> MicroStepGraphs | None:
        """The CUDA-graph runner of the micro-steps (`record=False`: its static form, run eagerly), or None
        where graphs do not apply (`cuda_graphs="on"` makes that an error)."""
        cfg = self.cfg
        why = ("the device is not CUDA" if self.device.type != "cuda" and record else
               "several processes train together" if self.world > 1 else
               "gradient checkpointing is on" if cfg.gradient_checkpointing else None)
        if why:
            if cfg.cuda_graphs == "on":
                raise ValueError(f"cuda_graphs='on' cannot apply: {why}; use cuda_graphs=auto or off")
            return None

        def losses(batch, phase, mtp_w, n_lm, n_mtp, n_micro, counts, use_mtp):
            return batch_losses(self.model, batch, cfg, phase, mtp_w, n_lm, n_mtp, n_micro, counts, use_mtp=use_mtp)
        sizes = {name: moe.gate.n_experts for name, moe in moe_layers(self.model)}
        return MicroStepGraphs(self.model, losses, lambda: self.autocast(cache=False), sizes, self.device,
                               record=record, log=self.print)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (possibly skipped by the NaN guard); returns its metrics record. Every
        number in the record is global (summed or gathered over processes), so all processes agree."""
        cfg, model, step = self.cfg, self.model, self.step
        phase = cfg.phase_at(step)
        set_phase(model, phase)
        lr, mtp_w = lr_at(cfg, step), mtp_weight_at(cfg, step)
        self.optimizer.set_lr(lr)
        batches = [next(self.loader) for _ in range(micro_batches_at(cfg, self.tokens))]
        n_lm, n_mtp = reduce.sum_values([sum(int((b["labels"] != IGNORE).sum()) for b in batches),
                                         sum(int((mtp_targets(b["labels"]) != IGNORE).sum()) for b in batches)],
                                        self.device)
        n_lm, n_mtp = max(1, int(n_lm)), max(1, int(n_mtp))
        moes = moe_layers(model)
        counts = {n: torch.zeros(m.gate.n_experts, dtype=torch.long, device=self.device) for n, m in moes}
        sums = dict.fromkeys(("lm", "mtp", "balance", "index", "objective"), 0.0)
        seen: set[str] = set()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            parts = self._micro_step(b, phase, mtp_w, n_lm, n_mtp, len(batches), counts, first=i == 0)
            for k, v in parts.items():
                sums[k] += v
                seen.add(k)
        sums = dict(zip(sums, reduce.sum_values(list(sums.values()), self.device)))
        params = [p for p in model.parameters() if p.grad is not None]
        norm = reduce.grad_norm(params)
        if cfg.grad_clip > 0:
            reduce.clip_grads_(params, cfg.grad_clip, norm)
        grad_norm = float(norm)
        ok = math.isfinite(sums["objective"]) and math.isfinite(grad_norm)   # global: the same on every rank
        flat = reduce.sum_over_ranks(torch.cat(list(counts.values())))       # global expert loads
        counts = dict(zip(counts, flat.split([c.numel() for c in counts.values()])))
        if ok:
            (self.optimizer_graph or self.optimizer).step()
            if phase != "warmup":
                for name, moe in moes:
                    if not moe.gate.hashed:
                        update_router_bias(moe.gate.bias, counts[name], cfg.bias_update_speed)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        n_tokens = len(batches) * cfg.micro_batch * cfg.seq_len
        self.step += 1
        self.tokens += n_tokens
        terms = {k: (v if k in seen else None) for k, v in sums.items()}
        record = {"step": self.step, "loss": terms["lm"], "lr": lr, "tokens_per_s": n_tokens / seconds,
                  "phase": phase, "objective": terms["objective"], "mtp_loss": terms["mtp"],
                  "mtp_weight": mtp_w, "balance_loss": terms["balance"], "index_loss": terms["index"],
                  "grad_norm": grad_norm, "tokens": self.tokens, "micro_batches": len(batches),
                  "step_seconds": seconds, "model_tflops": n_tokens * self.flops_per_token / seconds / 1e12}
        if cfg.peak_tflops > 0:
            record["mfu"] = record["model_tflops"] / (cfg.peak_tflops * self.world)
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
                self._write_metrics(record)
                raise TrainingDiverged(f"{self.bad_steps} consecutive steps with a non-finite loss or "
                                       f"gradient (last at step {self.step}); lower lr or check the data")
        return record

    def _micro_step(self, batch: dict[str, torch.Tensor], phase: str, mtp_w: float, n_lm: int, n_mtp: int,
                    n_micro: int, counts: dict[str, torch.Tensor], first: bool = True) -> dict[str, float]:
        """Forward + backward of this process's rows of one micro-batch; returns its share of each term.
        Replayed from a CUDA graph where `self.graphs` can (`first`: the step's first micro-batch)."""
        def eager() -> dict[str, float]:
            return self._eager_micro_step(batch, phase, mtp_w, n_lm, n_mtp, n_micro, counts)
        if self.graphs is None:
            return eager()
        return self.graphs.run(batch, phase, mtp_w, n_lm, n_mtp, n_micro, first, counts, eager)

    def _eager_micro_step(self, batch: dict[str, torch.Tensor], phase: str, mtp_w: float, n_lm: int, n_mtp: int,
                          n_micro: int, counts: dict[str, torch.Tensor]) -> dict[str, float]:
        dev = self.device
        batch = {k: v.to(dev) for k, v in batch.items()}
        with self.autocast():
            objective, terms = batch_losses(self.model, batch, self.cfg, phase, mtp_w, n_lm, n_mtp, n_micro,
                                            counts, share=1.0 / self.world)
        if objective.requires_grad:
            objective.backward()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["objective"] = float(objective.detach())
        return out

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over the first `eval_batches` validation batches (same batches each time);
        each process scores its slice of every batch's rows and the sums are all-reduced."""
        cfg, model = self.cfg, self.model
        model.eval()
        for attn in csa_attentions(model):
            attn.index_loss = False
        total, count = 0.0, 0
        for b in iterate_val(self.data_dir, cfg.micro_batch, cfg.seq_len, max_batches=cfg.eval_batches):
            rows = torch.arange(b["input_ids"].shape[0]).tensor_split(self.world)[self.rank]
            # a process without rows in a short last batch still runs the (sharded) forward, on row 0
            part = {k: v[rows] if len(rows) else v[:1] for k, v in b.items()}
            labels = part["labels"].to(self.device)
            with self.autocast():
                logits = model(part["input_ids"].to(self.device), positions=part["positions"].to(self.device),
                               segment_ids=part["doc_ids"].to(self.device).long())
            if len(rows):
                total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=IGNORE, reduction="sum"))
                count += int((labels != IGNORE).sum())
        total, count = reduce.sum_values([total, count], self.device)
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
                self._write_metrics(record)
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
    def checkpoint_state(self) -> dict[str, Any]:
        """The tensors of a checkpoint, by name: model parameters and buffers, optimizer state (sharded
        DTensors when the model is parallelized, so another layout can read them back)."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.named_state()}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_XXXXXX (every process writes its shards; a collective call)."""
        trainer_state = {"step": self.step, "tokens": self.tokens, "bad_steps": self.bad_steps,
                         "loader": self.loader.state_dict(), "rng": rng_state(),
                         "config": json.dumps(self.cfg.to_dict(), default=str),
                         "parallel": {"world": self.world, "dp_replicate": self.cfg.dp_replicate, "ep": self.cfg.ep}}
        path = runlog.write_checkpoint(self.ckpt_dir, self.step, self.checkpoint_state(),
                                       {"trainer.pt": trainer_state})
        if self.is_main:
            runlog.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        reduce.barrier()
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Resume from `path`, whatever layout (number of processes, expert parallelism) wrote it."""
        trainer = runlog.open_checkpoint(path)["trainer.pt"]
        saved_cfg = json.loads(trainer["config"])
        if saved_cfg["model"] != json.loads(json.dumps(self.cfg.model.to_hf_config(), default=str)):
            raise runlog.CheckpointError(f"{path} was written for another model config; resume with the "
                                         "recipe and overrides the run started with")
        if saved_cfg["micro_batch"] != self.cfg.micro_batch or saved_cfg["seq_len"] != self.cfg.seq_len:
            raise runlog.CheckpointError(
                f"{path} was written with micro_batch={saved_cfg['micro_batch']}, seq_len={saved_cfg['seq_len']} "
                f"(rows and length of a micro-batch over all processes); this run has micro_batch="
                f"{self.cfg.micro_batch}, seq_len={self.cfg.seq_len}. Resume with the saved values (on any "
                "number of processes dividing micro_batch) so the data order continues")
        state = self.checkpoint_state()
        runlog.load_checkpoint_state(path, state)
        self.optimizer.load_named_state(state["optim"])
        self.loader.load_state_dict(trainer["loader"])
        self.step, self.tokens, self.bad_steps = trainer["step"], trainer["tokens"], trainer["bad_steps"]
        set_rng_state(trainer["rng"])
        saved = trainer.get("parallel", {"world": 1, "dp_replicate": 1, "ep": 1})
        now = {"world": self.world, "dp_replicate": self.cfg.dp_replicate, "ep": self.cfg.ep}
        if saved != now:
            self.print(f"resharded {path.name}: written by {saved['world']} process(es) (dp_replicate "
                       f"{saved['dp_replicate']}, ep {saved['ep']}), read by {now['world']} (dp_replicate "
                       f"{now['dp_replicate']}, ep {now['ep']})")

    def full_model(self) -> Transformer | None:
        """The trained model as one single-device `Transformer` on the CPU: this model itself in a
        one-process run; gathered from the shards on rank 0 (None on the others; a collective call)."""
        if not reduce.distributed():
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # gathering expert-parallel shards takes two all-gathers, which torch reports on every rank
        # (through `logging`, in some versions through `warnings`): expected here, so kept quiet
        log = logging.getLogger("torch.distributed.tensor._redistribute")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*sequential all_gather operations.*")
                full = get_model_state_dict(self.model,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        finally:
            log.setLevel(level)
        if not self.is_main:
            return None
        with torch.device("meta"):
            model = Transformer(self.cfg.model)
        model.load_state_dict(full, assign=True)
        return model.eval()

    def export(self, path: Path) -> Path:
        """The final model as a `save_pretrained` folder (+ tokenizer), readable by `load_pretrained`
        and by transformers' DeepseekV4ForCausalLM. Rank 0 writes it; a collective call."""
        from dsv4.checkpoint import save_pretrained

        model = self.full_model()
        out = Path(path)
        if self.is_main:
            self.tokenizer.save(self.run_dir / "tokenizer")
            dtype = torch.float32 if self.cfg.export_dtype == "fp32" else torch.bfloat16
            out = save_pretrained(model, path, dtype=dtype, tokenizer_dir=self.run_dir / "tokenizer", overwrite=True,
                                  progress=None if self.progress else False)
            self.print(f"exported the model to {out}")
        reduce.barrier()
        return out

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32,
                      tokenizer_dir: str | Path | None = None, layout: str = "official") -> Path:
    """Export a training checkpoint (whatever process layout wrote it) as a `save_pretrained` folder in
    one process, without the optimizer state: `export_checkpoint("RUN/checkpoints/step_001000",
    "RUN/model_1000")`; `layout="transformers"` for transformers' own tensor names."""
    from dsv4.checkpoint import save_pretrained

    path = Path(checkpoint)
    trainer = runlog.open_checkpoint(path)["trainer.pt"]
    cfg = ModelConfig.from_hf_config(json.loads(trainer["config"])["model"])
    model = Transformer(cfg)
    state = {"model": model.state_dict()}
    runlog.load_checkpoint_state(path, state)
    return save_pretrained(model.eval(), out, dtype=dtype, tokenizer_dir=tokenizer_dir, overwrite=True, layout=layout)


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> Trainer:
    """Run a recipe to the end in `run_dir`; returns the finished Trainer (model, last eval)."""
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress, log=log)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer
