"""The explicit training loop: epochs of batches -> validation -> best checkpoint.

No training framework: :func:`fit` reads top to bottom and :func:`train_epoch` is one epoch of
it, public so that a benchmark or a notebook can drive the same steps. The run directory
around the loop (config, split, negatives, final results) is :mod:`retr.runs`'s; the loop
writes only its own checkpoints there (weights, metrics.jsonl, trainer_state.pt).

Resume is exact on CPU in deterministic mode because everything random is either restored
(model, optimizer, global RNG for dropout) or re-derived from (seed, epoch) (shuffling,
negatives, masks).
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from retr.config import RunConfig, TrainConfig
from retr.data.dataset import SequenceDataset
from retr.data.splits import RunData
from retr.errors import RetrError, RunDirError
from retr.evaluation.protocol import evaluate
from retr.models.base import SequentialRecommender, length_groups
from retr.training import distributed
from retr.training.checkpoint import (
    RUN_FORMAT_VERSION,
    load_trainer_state,
    load_weights,
    save_trainer_state,
    save_weights,
)
from retr.training.losses import compute_loss, popularity_proposal
from retr.utils import atomic_write_text, progress_bars


class TrainingDiverged(RetrError):
    """The loss became NaN or infinite."""


def setup_torch(cfg: RunConfig) -> None:
    """Seeds, threads and the deterministic switch."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)


def training_batch(model: SequentialRecommender, dataset: SequenceDataset, users: np.ndarray,
                   lengths: np.ndarray, gen: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) with targets 0 where there is nothing to predict.

    "next": inputs are the last N items before each position's target (shifted sequence).
    "cloze": inputs are the last N items with some replaced by the mask token; targets are
    the original items at masked positions.
    """
    n = model.max_len
    if model.objective == "cloze":
        seqs = torch.from_numpy(dataset.padded_prefixes(users, lengths, n))
        masked, labels = cast(Any, model).cloze_batch(seqs, gen)
        return masked.to(device), labels.to(device)
    window = torch.from_numpy(dataset.padded_prefixes(users, lengths, n + 1))
    inputs, targets = window[:, :-1], window[:, 1:]
    targets = torch.where(inputs > 0, targets, torch.zeros_like(targets))
    return inputs.to(device), targets.to(device)


def training_windows(users: np.ndarray, lengths: np.ndarray, window: int,
                     stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(users, prefix lengths) of the training rows, with ``train.window_stride`` (ours).

    ``window``: the items one row reads (N + 1 for next-item models: N inputs and their shifted
    targets; N for cloze). A history of L > window items adds rows ending at L - k, L - 2k, ...,
    until one reaches its first item: ceil((L - window) / k) extra rows. stride 0 returns the
    rows unchanged (one per user: the paper's).
    """
    if stride <= 0:
        return users, lengths
    extra = np.where(lengths > window, -(-(lengths - window) // stride), 0)
    counts = 1 + extra
    starts = np.cumsum(counts) - counts
    step = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    return np.repeat(users, counts), np.repeat(lengths, counts) - step * stride


def batch_loss(tc: TrainConfig, model: SequentialRecommender, forward: Any, inputs: torch.Tensor,
               targets: torch.Tensor, gen: torch.Generator,
               proposal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, target mask) of one batch; ``forward`` is the model or its DDP wrapper, and
    ``proposal`` the negative sampler's distribution (popularity; None = uniform).

    The rows run in ``train.length_groups`` groups of similar length, each trimmed to its
    longest history, and one loss is taken over every group's target positions: the mean over
    the same positions as one padded batch (DDP takes one forward per step, so one group there).
    The forward pass and loss run under bf16 autocast when ``train.precision`` asks for it;
    the loss comes back in fp32 either way. A model that returns ``extras["aux_loss"]`` [B]
    (one value per row: the pathway routers' budget or distillation terms) has its mean over
    the rows added to the task loss.
    """
    mask = targets > 0  # [B, N]
    n = inputs.shape[1]
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16,
                        enabled=tc.precision == "bf16"):
        parts = [(rows, width) for rows, width in length_groups(inputs, tc.length_groups)
                 if width] if forward is model else []
        aux: list[torch.Tensor] = []
        if not parts:  # DDP, or a batch without a real token
            out = forward(inputs)
            hidden, target = out.hidden[mask], targets[mask]  # [P, d], [P]
            aux += [out.extras["aux_loss"]] if "aux_loss" in out.extras else []
        else:
            states, labels = [], []
            for rows, width in parts:
                part = targets[rows, n - width:]  # [b, width]
                out = forward(inputs[rows, n - width:])
                states.append(out.hidden[part > 0])
                labels.append(part[part > 0])
                aux += [out.extras["aux_loss"]] if "aux_loss" in out.extras else []
            hidden, target = torch.cat(states), torch.cat(labels)  # [P, d], [P]
        loss = compute_loss(tc.loss, model, hidden, target, gen, tc.negatives, tc.gbce_t,
                            tc.label_smoothing, proposal).float()
        if aux:
            loss = loss + torch.cat(aux).float().mean()  # [B] rows -> one auxiliary term
    return loss, mask


def release_free_memory() -> None:
    """Give the pages of freed tensors back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Batches of varying shape leave freed blocks in the C heap, which keeps them resident: after
    an epoch of training that is hundreds of MB the evaluation would otherwise add to.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "torch_rng": torch.Tensor, "epoch": int,
    "best": (int, float), "best_epoch": int, "bad_epochs": int, "history": list,
    "elapsed": (int, float)}


def _check_state(state: dict[str, Any], path: Path) -> None:
    """Every entry resume reads is there and of its type (the file may be damaged or foreign)."""
    wrong = [k for k, t in _STATE_TYPES.items()
             if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if wrong:
        raise RunDirError(f"{path}: corrupted trainer state (missing or wrong type: "
                          f"{', '.join(wrong)})")


def _restore(state: dict[str, Any], model: SequentialRecommender,
             optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Put model, optimizer and RNG back as they were after the saved epoch."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise RunDirError(f"{path}: does not match this run's model and optimizer "
                          f"({_first_line(exc)}); the file is damaged or from another run") from None
    _restore_rng(state["torch_rng"], path)


def _restore_rng(rng: torch.Tensor, path: Path) -> None:
    try:
        torch.set_rng_state(rng.clone())  # a copy: torch misreads a view's storage offset
    except (RuntimeError, TypeError) as exc:
        raise RunDirError(f"{path}: corrupted RNG state ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class EpochStats:
    """What one epoch of training did: mean loss, optimiser steps, sequences, seconds."""

    loss: float
    steps: int
    sequences: int
    seconds: float

    @property
    def sequences_per_second(self) -> float:
        return self.sequences / max(self.seconds, 1e-9)


def learning_rate(tc: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (1-based) of ``total``: linear warm-up over
    ``warmup_steps``, then constant or a linear / cosine decay to 0 at ``total``."""
    if step <= tc.warmup_steps:
        return tc.lr * step / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    done = (step - tc.warmup_steps) / max(total - tc.warmup_steps, 1)
    done = min(done, 1.0)
    if tc.lr_schedule == "linear":
        return tc.lr * (1.0 - done)
    return tc.lr * 0.5 * (1.0 + math.cos(math.pi * done))


def make_optimizer(model: SequentialRecommender, tc: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the paper; weight decay as L2 in the gradient) or AdamW (decoupled)."""
    kind = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return kind(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def train_epoch(model: SequentialRecommender, dataset: SequenceDataset, users: np.ndarray,
                lengths: np.ndarray, optimizer: torch.optim.Optimizer, tc: TrainConfig, seed: int,
                epoch: int, device: torch.device | None = None, forward: Any = None,
                ctx: distributed.Context | None = None,
                proposal: torch.Tensor | None = None) -> EpochStats:
    """One epoch over the training prefixes (``users[i]``'s first ``lengths[i]`` items).

    The order is a permutation drawn from (seed, epoch) and the batch randomness (negatives,
    cloze masks) a generator seeded from them too, so an epoch is the same whenever it runs.
    ``forward`` is the model or its DDP wrapper (``ctx`` the process group); both default to
    single-process training. A learning-rate schedule (``tc.lr_schedule``, ``warmup_steps``)
    sets each step's rate from its global step number. ``proposal``: the distribution of
    sampled-softmax negatives (None = uniform). Raises :class:`TrainingDiverged` on a
    non-finite loss, before the optimiser step that would spread it.
    """
    device = device or torch.device("cpu")
    forward = model if forward is None else forward
    ctx = ctx or distributed.Context()
    t0 = time.perf_counter()
    model.train()
    n_train = len(users)
    perm = np.random.default_rng([seed, epoch]).permutation(n_train)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919 * ctx.rank)
    total, steps, seen = 0.0, 0, 0
    bar = tqdm(range(0, n_train, tc.batch_size), desc=f"epoch {epoch}", unit="batch",
               disable=not (progress_bars(tc.progress) and ctx.is_main), leave=False)
    per_epoch = -(-n_train // tc.batch_size)
    scheduled = tc.lr_schedule != "constant" or tc.warmup_steps > 0
    for start in bar:
        if scheduled:
            step = (epoch - 1) * per_epoch + start // tc.batch_size + 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(tc, step, tc.epochs * per_epoch)
        idx, counted = ctx.shard(perm[start:start + tc.batch_size])
        inputs, targets = training_batch(model, dataset, users[idx], lengths[idx], gen, device)
        loss, mask = batch_loss(tc, model, forward, inputs, targets, gen, proposal)
        step_loss = loss  # the step's mean loss over every rank's target positions
        if ctx.enabled:
            loss, step_loss = distributed.global_mean(
                loss, int(mask.sum()) if counted else 0, model, ctx)
        if not torch.isfinite(step_loss):
            raise TrainingDiverged(f"loss became {step_loss.item()} at epoch {epoch}, "
                                   f"step {steps + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        total += step_loss.item()
        steps += 1
        seen += min(tc.batch_size, n_train - start)
        bar.set_postfix(loss=f"{total / steps:.4f}",
                        seq_s=f"{seen / (time.perf_counter() - t0):.0f}")
    seconds = time.perf_counter() - t0
    release_free_memory()
    return EpochStats(total / max(steps, 1), steps, seen, seconds)


@dataclass
class FitSummary:
    """How training ended: epochs run, the best epoch and its validation value, and why it
    stopped ("patience", "time cap", "epoch cap"; "not trained" for a model without training)."""

    epochs_run: int
    best_epoch: int
    best_value: float | None
    stopped_by: str

    def to_dict(self) -> dict[str, Any]:
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch,
                "best_valid": self.best_value, "stopped_by": self.stopped_by}


def fit(cfg: RunConfig, model: SequentialRecommender, data: RunData, run_dir: Path,
        resume: bool = False, device: torch.device | None = None, log: Any = print,
        ctx: distributed.Context | None = None,
        on_validation: Callable[[int, float], None] | None = None) -> FitSummary:
    """Train ``model`` epoch by epoch, validating and keeping the best weights in ``run_dir``.

    Each epoch writes last.safetensors, metrics.jsonl and trainer_state.pt (and
    model.safetensors when validation improved), so ``resume`` continues after the last
    finished epoch. Stops by patience (after ``min_epochs``), ``max_minutes`` or ``epochs``.
    ``on_validation(epoch, value)`` sees every validation value (a tuner's pruning; an
    exception it raises ends training there, with the epoch's checkpoints written).
    """
    tc = cfg.train
    device = device or torch.device("cpu")
    ctx = ctx or distributed.Context()
    meta = {"model": cfg.model_name, "dataset": data.dataset.name}
    ddp = distributed.wrap(model, ctx, device)
    optimizer = make_optimizer(model, tc)
    proposal = None
    if tc.negative_sampler == "popularity":
        proposal = popularity_proposal(data.split.train_item_counts(data.dataset))
    history: list[dict[str, Any]] = []
    start_epoch, best, best_epoch, bad = 1, -math.inf, 0, 0
    elapsed = 0.0
    if resume:
        state = load_trainer_state(run_dir / "trainer_state.pt")
        _check_state(state, run_dir / "trainer_state.pt")
        if state["best_epoch"] > 0:  # fail now, not after the remaining epochs
            load_weights(model, run_dir / "model.safetensors")
        _restore(state, model, optimizer, run_dir / "trainer_state.pt")
        per_rank = state.get("torch_rng_ranks")
        if isinstance(per_rank, torch.Tensor) and per_rank.shape[0] == ctx.world_size > 1:
            _restore_rng(per_rank[ctx.rank], run_dir / "trainer_state.pt")
        elif ctx.enabled:  # saved by another number of processes: fresh streams per rank
            distributed.seed_rank(cfg.seed + int(state["epoch"]), ctx)
        start_epoch = int(state["epoch"]) + 1
        best, best_epoch, bad = float(state["best"]), int(state["best_epoch"]), int(state["bad_epochs"])
        history = list(state["history"])
        elapsed = float(state["elapsed"])
        log(f"resuming {run_dir} after epoch {state['epoch']} (best {tc.valid_metric} "
            f"{best:.4f} at epoch {best_epoch})")
    writer = _tensorboard(run_dir) if tc.tensorboard and ctx.is_main else None
    split = data.split
    window = model.max_len + (model.objective != "cloze")
    train_users, train_lengths = training_windows(split.train_users, split.train_lengths,
                                                  window, tc.window_stride)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.epochs + 1):
        if _patience_spent(tc, bad, epoch - 1) or (tc.max_minutes
                                                   and elapsed >= tc.max_minutes * 60):
            epoch -= 1
            break
        t0 = time.perf_counter()
        try:
            stats = train_epoch(model, data.dataset, train_users, train_lengths,
                                optimizer, tc, cfg.seed, epoch, device, ddp, ctx, proposal)
        except TrainingDiverged as exc:
            kept = ("none had been written yet" if epoch == 1 else
                    f"last: epoch {epoch - 1}, best: "
                    + (f"epoch {best_epoch}" if best_epoch else "none yet"))
            raise TrainingDiverged(f"{exc}; the checkpoints in {run_dir} are untouched "
                                   f"({kept}). Lower train.lr or set train.grad_clip") from None
        row: dict[str, Any] = {"epoch": epoch, "loss": stats.loss,
                               "train_seconds": round(stats.seconds, 3),
                               "sequences_per_second": round(stats.sequences_per_second, 1)}
        line = f"epoch {epoch:3d}  loss {row['loss']:.4f}"
        if ctx.is_main and (epoch % tc.eval_every == 0 or epoch == tc.epochs):
            res = evaluate(model, data.dataset, split.valid, tc.valid_protocol, cfg.eval,
                           data.negatives["valid"])
            value = res["metrics"].get(tc.valid_metric)
            if value is None:
                raise RetrError(f"train.valid_metric {tc.valid_metric!r} is not computed; "
                                f"choose one of {', '.join(res['metrics'])}")
            row["valid"] = {"protocol": tc.valid_protocol, **res["metrics"]}
            if value > best:
                best, best_epoch, bad = value, epoch, 0
                save_weights(model, run_dir / "model.safetensors", {**meta, "epoch": str(epoch)})
            else:
                bad += tc.eval_every
            line += f"  valid {tc.valid_metric} {value:.4f}  (best {best:.4f} @ {best_epoch})"
        if ctx.is_main:
            log(f"{line}  {stats.seconds:.1f}s")
        elapsed += time.perf_counter() - t0
        row["elapsed_seconds"] = round(elapsed, 3)
        history.append(row)
        rng_ranks = distributed.gather_rng_states(ctx, device) if ctx.enabled else None
        if ctx.is_main:
            if writer is not None:
                writer.add_scalar("train/loss", row["loss"], epoch)
                for k, v in row.get("valid", {}).items():
                    if isinstance(v, float):
                        writer.add_scalar(f"valid/{k}", v, epoch)
            save_weights(model, run_dir / "last.safetensors", {**meta, "epoch": str(epoch)})
            atomic_write_text(run_dir / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in history))
            state = {
                "format_version": RUN_FORMAT_VERSION, "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "best": best, "best_epoch": best_epoch,
                "bad_epochs": bad, "history": history, "elapsed": elapsed,
            }
            if rng_ranks is not None:
                state["torch_rng_ranks"] = rng_ranks
            save_trainer_state(state, run_dir / "trainer_state.pt")
        # rank 0's evaluation decides for everyone (the others wait here meanwhile)
        shared = distributed.share_from_main([best, best_epoch, bad, elapsed], ctx, device)
        best, best_epoch, bad, elapsed = shared[0], int(shared[1]), int(shared[2]), shared[3]
        if on_validation is not None and "valid" in row:
            on_validation(epoch, float(row["valid"][tc.valid_metric]))
        if _patience_spent(tc, bad, epoch):
            log(f"early stop: no {tc.valid_metric} improvement for {bad} epochs")
    if writer is not None:
        writer.close()
    if best_epoch == 0 and ctx.is_main:
        save_weights(model, run_dir / "model.safetensors", {**meta, "epoch": "0"})
    if epoch >= tc.epochs:
        stopped = "epoch cap"
    elif _patience_spent(tc, bad, epoch):
        stopped = "patience"
    else:
        stopped = "time cap"
    return FitSummary(epoch, best_epoch, best if best_epoch else None, stopped)


def _patience_spent(tc: TrainConfig, bad: int, epochs_done: int) -> bool:
    """Early stopping: ``patience`` epochs without improvement, once ``min_epochs`` have run."""
    return bool(tc.patience) and bad >= tc.patience and epochs_done >= tc.min_epochs


def summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RetrError("train.tensorboard = true needs the tensorboard package: "
                        "pip install tensorboard (or set train.tensorboard = false)") from None
    return SummaryWriter


def _tensorboard(run_dir: Path) -> Any:
    return summary_writer_class()(str(run_dir / "tensorboard"))


