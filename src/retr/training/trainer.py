"""The explicit training loop: data -> split -> model -> epochs -> best checkpoint -> test once.

No training framework: one function, read top to bottom. Resume is exact on CPU in
deterministic mode because everything random is either restored (model, optimizer, global RNG
for dropout) or re-derived from (seed, epoch) (shuffling, negatives, masks).
"""

from __future__ import annotations

import ctypes
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from retr.config import RunConfig, TrainConfig
from retr.data.dataset import SequenceDataset
from retr.data.negatives import sample_negatives
from retr.data.splits import Split, make_split
from retr.errors import RetrError, RunDirError
from retr.evaluation.protocol import evaluate
from retr.manifest import remove_manifest, write_manifest
from retr.models.base import SequentialRecommender, length_groups
from retr.serving.recommender import save_item_counts
from retr.text.transfer import build_run_model
from retr.training import distributed
from retr.training.checkpoint import (
    RUN_FORMAT_VERSION,
    load_array,
    load_trainer_state,
    load_weights,
    save_array,
    save_trainer_state,
    save_weights,
)
from retr.training.losses import compute_loss
from retr.utils import atomic_write_json, atomic_write_text, read_json


class TrainingDiverged(RetrError):
    """The loss became NaN or infinite."""


@dataclass
class RunData:
    """What a run needs besides the model: the data, its split and stored negatives."""

    dataset: SequenceDataset
    split: Split
    negatives: dict[str, np.ndarray]


def setup_torch(cfg: RunConfig) -> None:
    """Seeds, threads and the deterministic switch."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)


def prepare_run_data(cfg: RunConfig, dataset: SequenceDataset, run_dir: Path) -> RunData:
    """Make the split and its sampled negatives once, and store them in the run directory."""
    split = _make_split(cfg, dataset)
    pop = split.train_item_counts(dataset) if cfg.eval.negative_sampling == "popularity" else None
    negatives = {}
    for offset, part in enumerate(("valid", "test")):
        negatives[part] = sample_negatives(dataset, split.examples(part), cfg.eval.negatives,
                                           seed=cfg.seed * 2 + offset, popularity=pop)
        save_array(run_dir / f"negatives_{part}.npy", negatives[part])
    split.save(run_dir / "split.npz")
    save_item_counts(run_dir, split.train_item_counts(dataset))  # popularity fallback in serving
    dataset.vocab.save(run_dir / "vocab.json")
    return RunData(dataset, split, negatives)


def _make_split(cfg: RunConfig, dataset: SequenceDataset) -> Split:
    return make_split(dataset, cfg.split.kind, seed=cfg.seed, valid_cutoff=cfg.split.valid_cutoff,
                      test_cutoff=cfg.split.test_cutoff, rolling_steps=cfg.split.rolling_steps)


def load_run_data(cfg: RunConfig, dataset: SequenceDataset, run_dir: Path) -> RunData:
    """Reload a run's stored split and negatives, checking they belong to ``dataset``."""
    env = read_json(run_dir / "env.json")
    if env.get("data_fingerprint") != dataset.fingerprint():
        raise RunDirError(f"{run_dir}: the data of {cfg.data.source!r} changed since this run was "
                          f"made (fingerprint {dataset.fingerprint()} now, {env.get('data_fingerprint')} "
                          "recorded in env.json)")
    split = Split.load(run_dir / "split.npz")
    _check_split(split, dataset, run_dir / "split.npz")
    negatives = {p: load_array(run_dir / f"negatives_{p}.npy") for p in ("valid", "test")}
    for part, neg in negatives.items():
        rows = len(split.examples(part))
        if (neg.ndim != 2 or neg.shape[0] != rows or not np.issubdtype(neg.dtype, np.integer)
                or (neg.size and (neg.min() < 1 or neg.max() > dataset.n_items))):
            raise RunDirError(f"{run_dir / f'negatives_{part}.npy'}: corrupted: expected {rows} "
                              f"rows of item ids in 1..{dataset.n_items}, found {neg.dtype} "
                              f"{neg.shape}; delete the run directory and train again")
    return RunData(dataset, split, negatives)


def _check_split(split: Split, dataset: SequenceDataset, path: Path) -> None:
    """Refuse a split whose arrays point outside the data: a damaged file, not a crash later."""
    lengths = dataset.lengths
    parts = [("train", split.train_users, split.train_lengths, None, 0),
             ("valid", split.valid.users, split.valid.lengths, split.valid.targets, 1),
             ("test", split.test.users, split.test.lengths, split.test.targets, 1)]
    for name, users, lens, targets, room in parts:
        arrays = [users, lens] + ([targets] if targets is not None else [])
        ok = all(a.ndim == 1 and len(a) == len(users) and np.issubdtype(a.dtype, np.integer)
                 for a in arrays)
        if ok and len(users):
            ok = bool(users.min() >= 0 and users.max() < dataset.n_users)
            ok = ok and bool((lens >= 1).all() and (lens + room <= lengths[users]).all())
            if targets is not None:
                ok = ok and bool((targets == dataset.items[dataset.offsets[users] + lens]).all())
        if not ok:
            raise RunDirError(f"{path}: corrupted: the {name} part does not fit the data "
                              "(ids or lengths out of range); delete the run directory and "
                              "train again")


def training_batch(model: SequentialRecommender, data: RunData, users: np.ndarray, lengths: np.ndarray,
                   gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) with targets 0 where there is nothing to predict.

    "next": inputs are the last N items before each position's target (shifted sequence).
    "cloze": inputs are the last N items with some replaced by the mask token; targets are
    the original items at masked positions.
    """
    n = model.max_len
    if model.objective == "cloze":
        seqs = torch.from_numpy(data.dataset.padded_prefixes(users, lengths, n))
        masked, labels = cast(Any, model).cloze_batch(seqs, gen)
        return masked.to(device), labels.to(device)
    window = torch.from_numpy(data.dataset.padded_prefixes(users, lengths, n + 1))
    inputs, targets = window[:, :-1], window[:, 1:]
    targets = torch.where(inputs > 0, targets, torch.zeros_like(targets))
    return inputs.to(device), targets.to(device)


def batch_loss(tc: TrainConfig, model: SequentialRecommender, forward: Any, inputs: torch.Tensor,
               targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, target mask) of one batch; ``forward`` is the model or its DDP wrapper.

    The rows run in ``train.length_groups`` groups of similar length, each trimmed to its
    longest history, and one loss is taken over every group's target positions: the mean over
    the same positions as one padded batch (DDP takes one forward per step, so one group there).
    The forward pass and loss run under bf16 autocast when ``train.precision`` asks for it;
    the loss comes back in fp32 either way.
    """
    mask = targets > 0  # [B, N]
    n = inputs.shape[1]
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16,
                        enabled=tc.precision == "bf16"):
        parts = [(rows, width) for rows, width in length_groups(inputs, tc.length_groups)
                 if width] if forward is model else []
        if not parts:  # DDP, or a batch without a real token
            hidden, target = forward(inputs).hidden[mask], targets[mask]  # [P, d], [P]
        else:
            states, labels = [], []
            for rows, width in parts:
                part = targets[rows, n - width:]  # [b, width]
                states.append(forward(inputs[rows, n - width:]).hidden[part > 0])
                labels.append(part[part > 0])
            hidden, target = torch.cat(states), torch.cat(labels)  # [P, d], [P]
        loss = compute_loss(tc.loss, model, hidden, target, gen, tc.negatives, tc.gbce_t).float()
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


def _env(dataset: SequenceDataset) -> dict[str, Any]:
    import retr

    return {"retr": retr.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "run_format_version": RUN_FORMAT_VERSION, "data_fingerprint": dataset.fingerprint(),
            "data": dataset.describe()}


def train(cfg: RunConfig, dataset: SequenceDataset, run_dir: str | Path, resume: bool = False,
          log: Any = print, model: SequentialRecommender | None = None,
          fit: bool = True) -> dict[str, Any]:
    """Train ``cfg.model_name`` on ``dataset`` into ``run_dir``; return the final results.

    ``model`` replaces the freshly built one (fine-tuning starts from transferred weights);
    ``fit=False`` evaluates it as it is, with no training (zero-shot transfer).

    With ``resume`` the run continues from ``run_dir/trainer_state.pt`` and ends with the same
    weights an uninterrupted run would have (CPU, deterministic mode).
    """
    run_dir = Path(run_dir)
    setup_torch(cfg)
    if model is None:  # before the run directory is touched: item text errors come first
        model = build_run_model(cfg, dataset.n_items, dataset)
    ctx, device = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, dataset, run_dir, resume, log if ctx.is_main else _quiet, model, fit,
                      ctx, device)
    finally:
        distributed.cleanup(ctx)


def _quiet(msg: str) -> None:
    """The log of ranks other than 0: one voice is enough."""


def _train(cfg: RunConfig, dataset: SequenceDataset, run_dir: Path, resume: bool, log: Any,
           model: SequentialRecommender, fit: bool, ctx: distributed.Context,
           device: torch.device) -> dict[str, Any]:
    if cfg.train.tensorboard and ctx.is_main:
        _summary_writer_class()  # fail before anything is written, not after the first epoch
    if ctx.is_main:
        _remove_stale_temporaries(run_dir)
        remove_manifest(run_dir)  # files change from here on; write_manifest ends the run
    trainable = getattr(model, "trainable", True)
    if resume and trainable and fit and not (run_dir / "trainer_state.pt").is_file():
        log(f"{run_dir}: no epoch had finished; starting the run over from its config.json")
        resume = False
    if resume:
        data = load_run_data(cfg, dataset, run_dir)
    elif ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", cfg.to_json())
        atomic_write_json(run_dir / "env.json", _env(dataset))
        data = prepare_run_data(cfg, dataset, run_dir)
    else:  # the split rank 0 stores, made here too (it is seeded): no shared filesystem needed
        data = RunData(dataset, _make_split(cfg, dataset), {})
    model = model.to(device)
    distributed.seed_rank(cfg.seed, ctx)
    meta = {"model": cfg.model_name, "dataset": dataset.name}
    if not ctx.is_main and (not trainable or not fit):
        return {"model": cfg.model_name, "results": []}
    if not trainable or not fit:
        if not trainable:
            cast(Any, model).fit_counts(data.split.train_item_counts(dataset))
        save_weights(model, run_dir / "model.safetensors", meta)
        save_weights(model, run_dir / "last.safetensors", meta)
        return final_evaluation(cfg, model, data, run_dir, log)
    _fit(cfg, model, data, run_dir, resume, device, meta, log, ctx)
    if not ctx.is_main:
        return {"model": cfg.model_name, "results": []}
    load_weights(model, run_dir / "model.safetensors")
    return final_evaluation(cfg, model, data, run_dir, log)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the half-written temporaries (``.NAME.XXXX.tmp``) a killed write left behind."""
    if not run_dir.is_dir():
        return
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()


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


def _fit(cfg: RunConfig, model: SequentialRecommender, data: RunData, run_dir: Path, resume: bool,
         device: torch.device, meta: dict[str, str], log: Any,
         ctx: distributed.Context) -> None:
    tc = cfg.train
    ddp = distributed.wrap(model, ctx, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
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
    n_train = len(split.train_users)
    for epoch in range(start_epoch, tc.epochs + 1):
        if _patience_spent(tc, bad, epoch - 1) or (tc.max_minutes
                                                   and elapsed >= tc.max_minutes * 60):
            break
        t0 = time.perf_counter()
        model.train()
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 7_919 * ctx.rank)
        total, steps, seen = 0.0, 0, 0
        bar = tqdm(range(0, n_train, tc.batch_size), desc=f"epoch {epoch}", unit="batch",
                   disable=not tc.progress or not ctx.is_main, leave=False)
        for start in bar:
            idx, counted = ctx.shard(perm[start:start + tc.batch_size])
            inputs, targets = training_batch(model, data, split.train_users[idx],
                                             split.train_lengths[idx], gen, device)
            loss, mask = batch_loss(tc, model, ddp, inputs, targets, gen)
            step_loss = loss  # the step's mean loss over every rank's target positions
            if ctx.enabled:
                loss, step_loss = distributed.global_mean(
                    loss, int(mask.sum()) if counted else 0, model, ctx)
            if not torch.isfinite(step_loss):
                kept = ("none had been written yet" if epoch == 1 else
                        f"last: epoch {epoch - 1}, best: "
                        + (f"epoch {best_epoch}" if best_epoch else "none yet"))
                raise TrainingDiverged(
                    f"loss became {step_loss.item()} at epoch {epoch}, step {steps + 1}; the "
                    f"checkpoints in {run_dir} are untouched ({kept}). Lower train.lr or set "
                    "train.grad_clip")
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
        train_time = time.perf_counter() - t0
        release_free_memory()
        row: dict[str, Any] = {"epoch": epoch, "loss": total / max(steps, 1),
                               "train_seconds": round(train_time, 3),
                               "sequences_per_second": round(seen / max(train_time, 1e-9), 1)}
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
            log(f"epoch {epoch:3d}  loss {row['loss']:.4f}  valid {tc.valid_metric} {value:.4f}  "
                f"(best {best:.4f} @ {best_epoch})  {train_time:.1f}s")
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
                              "".join(_json_line(r) for r in history))
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
        if _patience_spent(tc, bad, epoch):
            log(f"early stop: no {tc.valid_metric} improvement for {bad} epochs")
    if writer is not None:
        writer.close()
    if best_epoch == 0 and ctx.is_main:
        save_weights(model, run_dir / "model.safetensors", {**meta, "epoch": "0"})


def _patience_spent(tc: TrainConfig, bad: int, epochs_done: int) -> bool:
    """Early stopping: ``patience`` epochs without improvement, once ``min_epochs`` have run."""
    return bool(tc.patience) and bad >= tc.patience and epochs_done >= tc.min_epochs


def _json_line(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj) + "\n"


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RetrError("train.tensorboard = true needs the tensorboard package: "
                        "pip install tensorboard (or set train.tensorboard = false)") from None
    return SummaryWriter


def _tensorboard(run_dir: Path) -> Any:
    return _summary_writer_class()(str(run_dir / "tensorboard"))


def final_evaluation(cfg: RunConfig, model: SequentialRecommender, data: RunData, run_dir: Path,
                     log: Any = print) -> dict[str, Any]:
    """Evaluate the selected weights on validation and, once, on test; write results.json."""
    results: dict[str, Any] = {
        "model": cfg.model_name, "dataset": data.dataset.name, "seed": cfg.seed,
        "split": cfg.split.kind, "data_fingerprint": data.dataset.fingerprint(),
        "n_items": data.dataset.n_items, "results": [],
    }
    for part in ("valid", "test"):
        for protocol in cfg.eval.protocols:
            res = evaluate(model, data.dataset, data.split.examples(part), protocol, cfg.eval,
                           data.negatives[part], progress=cfg.train.progress)
            results["results"].append({"split": part, **res})
    atomic_write_json(run_dir / "results.json", results)
    write_manifest(run_dir)  # last: the run is complete
    return results
