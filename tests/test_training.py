"""Training end to end: every model through the CLI, resume equality, checkpoints, divergence."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from retr.cli import main
from retr.config import resolve_config
from retr.data.load import load_dataset
from retr.errors import RunDirError
from retr.models import build_model
from retr.runs import load_run, train
from retr.training.checkpoint import load_trainer_state

DATA = "synthetic:n_users=300,n_items=120,n_themes=10,min_len=10,max_len=20,seed=2"
SMALL = {
    "sasrec": ["model.hidden_size=32", "model.num_heads=2", "model.max_len=20"],
    "retr": ["model.hidden_size=32", "model.num_heads=2", "model.ffn_size=32", "model.max_len=20",
             "model.router_hidden=16"],
    "bert4rec": ["model.hidden_size=32", "model.num_heads=2", "model.ffn_size=64", "model.max_len=20"],
    "gru4rec": ["model.embedding_size=32", "model.hidden_size=32", "model.max_len=20"],
}


def _sets(model, epochs, extra=()):
    base = [f"train.epochs={epochs}", "train.batch_size=64", "train.lr=0.005", "train.loss='ce'",
            "train.progress=false", "train.patience=0", "eval.negatives=50"]
    return [a for s in [*SMALL.get(model, []), *base, *extra] for a in ("--set", s)]


def _metric(run_dir, split="test", protocol="full", name="NDCG@10"):
    res = json.loads((run_dir / "results.json").read_text())
    return [r for r in res["results"] if r["split"] == split and r["protocol"] == protocol][0]["metrics"][name]


@pytest.fixture(scope="module")
def pop_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "pop"
    assert main(["train", "--data", DATA, "--model", "pop", "--out", str(d), *_sets("pop", 1)]) == 0
    return d


@pytest.mark.parametrize("model", ["sasrec", "retr", "bert4rec", "gru4rec"])
def test_every_model_trains_through_cli_and_beats_pop(model, tmp_path, pop_run, capsys):
    d = tmp_path / model
    # BERT4Rec's cloze objective needs far more steps than next-item training (its official
    # code trains 400k steps); 200 short epochs take seconds here.
    epochs, extra = (200, ["train.eval_every=20", "train.batch_size=32", "train.lr=0.003"]) \
        if model == "bert4rec" else (20, [])
    assert main(["train", "--data", DATA, "--model", model, "--out", str(d),
                 *_sets(model, epochs, extra)]) == 0
    capsys.readouterr()
    for f in ("model.safetensors", "last.safetensors", "trainer_state.pt", "metrics.jsonl"):
        assert (d / f).is_file()
    lines = (d / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == epochs and "valid" in json.loads(lines[-1])
    assert json.loads(lines[-1])["loss"] < json.loads(lines[0])["loss"]
    assert _metric(d, "valid") > _metric(pop_run, "valid")
    assert _metric(d, "test") > _metric(pop_run, "test")


@pytest.mark.parametrize("loss", ["bpr", "bce", "gbce", "sampled_softmax"])
def test_losses_run(loss, tmp_path):
    cfg = resolve_config(None, ["model.name='sasrec'", f"data.source='{DATA}'", f"train.loss='{loss}'",
                                "train.negatives=4", "train.epochs=1", "train.progress=false",
                                "eval.negatives=50", *SMALL["sasrec"]])
    res = train(cfg, load_dataset(cfg.data), tmp_path / loss, log=lambda m: None)
    assert np.isfinite([r["metrics"]["MRR"] for r in res["results"]]).all()


def test_bf16_precision_trains_close_to_fp32(tmp_path):
    """bf16 autocast changes the arithmetic, not the training: same losses to ~1e-2, fp32 weights."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve_config(None, ["model.name='retr'", f"data.source='{DATA}'",
                                    "train.loss='ce'", "train.epochs=2", "train.progress=false",
                                    f"train.precision='{precision}'", "eval.negatives=50",
                                    *SMALL["retr"]])
        train(cfg, load_dataset(cfg.data), tmp_path / precision, log=lambda m: None)
        rows = [json.loads(x) for x in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = [r["loss"] for r in rows]
        weights = load_file(str(tmp_path / precision / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in weights.values())
    assert np.allclose(losses["fp32"], losses["bf16"], rtol=1e-2)
    with pytest.raises(Exception, match="train.precision"):
        resolve_config(None, ["train.precision='fp16'"])


def test_resume_gives_identical_weights(tmp_path, capsys):
    """An interrupted run resumed from its last epoch ends bit-identical to an uninterrupted one."""
    sets = _sets("retr", 4, ["train.loss='bpr'"])
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--data", DATA, "--model", "retr", "--out", str(full), *sets]) == 0
    # Simulate a kill after epoch 2: run 2 epochs, then raise the epoch budget and resume.
    assert main(["train", "--data", DATA, "--model", "retr", "--out", str(part), *_sets("retr", 2, ["train.loss='bpr'"])]) == 0
    cfg = json.loads((part / "config.json").read_text())
    cfg["train"]["epochs"] = 4
    (part / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(part)]) == 0
    a, b = load_file(str(full / "last.safetensors")), load_file(str(part / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (full / "metrics.jsonl").read_text().count("\n") == (part / "metrics.jsonl").read_text().count("\n")


def test_checkpoint_round_trip_gives_identical_scores(tmp_path, capsys):
    d = tmp_path / "sas"
    assert main(["train", "--data", DATA, "--model", "sasrec", "--out", str(d), *_sets("sasrec", 1)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(d), "--protocol", "full", "--protocol", "sampled", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["results"]
    saved = [r for r in json.loads((d / "results.json").read_text())["results"] if r["split"] == "test"]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in saved]
    run = load_run(d)
    assert not run.model.training


def test_trainer_state_is_weights_only_and_corruption_is_named(tmp_path, capsys):
    d = tmp_path / "g"
    assert main(["train", "--data", DATA, "--model", "gru4rec", "--out", str(d), *_sets("gru4rec", 1)]) == 0
    state = load_trainer_state(d / "trainer_state.pt")
    assert state["epoch"] == 1
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RunDirError, match="model.safetensors"):
        load_run(d)
    (d / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError, match="trainer_state.pt"):
        load_trainer_state(d / "trainer_state.pt")


def test_divergence_stops_with_clear_error(tmp_path, capsys):
    d = tmp_path / "nan"
    code = main(["train", "--data", DATA, "--model", "sasrec", "--out", str(d),
                 *_sets("sasrec", 2, ["train.lr=1e30", "train.loss='bce'"])])
    err = capsys.readouterr().err
    if code != 0:
        assert "loss became" in err and "untouched" in err


def test_missing_tensorboard_fails_before_writing(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    d = tmp_path / "tb"
    code = main(["train", "--data", DATA, "--model", "sasrec", "--out", str(d),
                 *_sets("sasrec", 1, ["train.tensorboard=true"])])
    assert code != 0 and "pip install tensorboard" in capsys.readouterr().err
    assert not d.exists() or not any(d.iterdir())


@pytest.mark.parametrize("min_epochs, ran", [(0, 2), (4, 4)])
def test_min_epochs_holds_early_stopping(tmp_path, min_epochs, ran):
    """With no improvement (a learning rate too small to move a weight), patience 1 ends the
    run after its second epoch, unless min_epochs asks for more."""
    d = tmp_path / "run"
    extra = ["train.patience=1", "train.lr=1e-12", f"train.min_epochs={min_epochs}"]
    assert main(["train", "--data", DATA, "--model", "sasrec", "--out", str(d),
                 *_sets("sasrec", 6, extra)]) == 0
    assert len((d / "metrics.jsonl").read_text().splitlines()) == ran


def test_patience_counts_epochs_not_validations(tmp_path):
    """Patience 4, a validation every 2 epochs, no improvement: the first validation (epoch 2)
    stays the best, epochs 4 and 6 bring no gain, and 4 epochs without one end the run at epoch
    6, not after four more validations (epoch 10)."""
    d = tmp_path / "run"
    extra = ["train.patience=4", "train.eval_every=2", "train.lr=1e-12"]
    assert main(["train", "--data", DATA, "--model", "sasrec", "--out", str(d),
                 *_sets("sasrec", 12, extra)]) == 0
    epochs = [json.loads(line)["epoch"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert max(epochs) == 6


def test_min_epochs_must_not_be_negative():
    from retr.config import TrainConfig
    from retr.errors import ConfigError

    with pytest.raises(ConfigError, match="train.min_epochs"):
        TrainConfig(min_epochs=-1)


@pytest.mark.parametrize("key", ["sasrec", "sasrec_pathway", "retr", "bert4rec", "gru4rec"])
def test_length_groups_give_the_loss_and_gradients_of_one_padded_batch(key):
    from retr.config import TrainConfig
    from retr.models.base import length_groups
    from retr.training.trainer import batch_loss
    from tests.test_models import N_ITEMS, tiny

    model = tiny(key).eval()  # no dropout: both ways must agree to rounding
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([16, 1, 9, 3, 12, 5, 2, 16, 7])
    seqs = torch.randint(1, N_ITEMS + 1, (9, 16), generator=g)
    seqs[torch.arange(16)[None, :] < 16 - lengths[:, None]] = 0  # left padding
    if key == "bert4rec":
        inputs, targets = model.cloze_batch(seqs, g)
    else:
        inputs, targets = seqs[:, :-1], torch.where(seqs[:, :-1] > 0, seqs[:, 1:], 0)
    groups = length_groups(inputs, 3)
    assert [w for _, w in groups] == sorted(w for _, w in groups) and len(groups) == 3
    real = (inputs > 0).sum(dim=1)
    for rows, width in groups:  # a multiple of 8 or the whole window, never cutting a history
        assert width % 8 == 0 or width == inputs.shape[1]
        assert int(real[rows].max()) <= width < int(real[rows].max()) + 8
    assert [w for _, w in length_groups(inputs, 3, multiple=1)] == [
        int(real[rows].max()) for rows, _ in groups]
    assert sorted(torch.cat([r for r, _ in groups]).tolist()) == list(range(9))
    grads = []
    for k in (1, 3, 9):
        model.zero_grad()
        loss, mask = batch_loss(TrainConfig(loss="ce", length_groups=k), model, model, inputs,
                                targets, torch.Generator())
        loss.backward()
        assert torch.equal(mask, targets > 0)
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                      if p.grad is not None]))
    for loss, g_k in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(g_k, grads[0][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_length_groups_must_be_positive():
    from retr.config import TrainConfig
    from retr.errors import ConfigError

    with pytest.raises(ConfigError, match="length_groups"):
        TrainConfig(length_groups=0)


@pytest.mark.parametrize(("key", "upstream"), [("sasrec", 1.0), ("bert4rec", 1.0),
                                               ("sasrec", -2.5), ("sasrec", 0.0)])
def test_fused_cross_entropy_matches_the_library_one(key, upstream):
    import torch.nn.functional as F

    from retr.training.losses import ce_loss
    from tests.test_models import N_ITEMS, tiny

    model = tiny(key)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, model.item_representation(torch.tensor([1])).shape[-1], generator=g,
                    requires_grad=True)
    targets = torch.randint(1, N_ITEMS + 1, (50,), generator=g)
    loss = ce_loss(model, h, targets, g)
    grads = torch.autograd.grad(loss * upstream, [h, *model.parameters()], allow_unused=True)
    items = torch.arange(1, N_ITEMS + 1)
    ref = F.cross_entropy(model.score_items(h, items), targets - 1)
    ref_grads = torch.autograd.grad(ref * upstream, [h, *model.parameters()], allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_cross_entropy_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 7 rows (the last one shorter) give the value and gradient of one block."""
    import retr.training.losses as losses
    from tests.test_models import N_ITEMS, tiny

    model = tiny("sasrec")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(1, N_ITEMS + 1, (50,), generator=g)
    whole = losses.ce_loss(model, h, targets, g)
    (gw,) = torch.autograd.grad(whole, [h])
    monkeypatch.setattr(losses, "_rows_per_block", lambda x, elements=0: 7)
    blocks = losses.ce_loss(model, h, targets, g)
    (gb,) = torch.autograd.grad(blocks, [h])
    torch.testing.assert_close(blocks, whole)
    torch.testing.assert_close(gb, gw)


def test_fused_cross_entropy_under_bf16_autocast_matches_the_library_one():
    import torch.nn.functional as F

    from retr.training.losses import ce_loss
    from tests.test_models import N_ITEMS, tiny

    model = tiny("sasrec")
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(1, N_ITEMS + 1, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce_loss(model, h, targets, g)
        ref = F.cross_entropy(model.score_items(h, torch.arange(1, N_ITEMS + 1)), targets - 1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.float(), rtol=1e-2, atol=1e-2)
    (gh,) = torch.autograd.grad(loss, [h])
    (rh,) = torch.autograd.grad(ref, [h])
    assert gh.dtype == h.dtype
    torch.testing.assert_close(gh, rh.float(), rtol=5e-2, atol=5e-3)


def test_learning_rate_schedules() -> None:
    from retr.config import TrainConfig
    from retr.training.trainer import learning_rate

    warm = TrainConfig(lr=1.0, warmup_steps=4, lr_schedule="cosine")
    assert [learning_rate(warm, s, 104) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert learning_rate(warm, 54, 104) == pytest.approx(0.5)  # half way through the decay
    assert learning_rate(warm, 104, 104) == pytest.approx(0.0, abs=1e-12)
    linear = TrainConfig(lr=2.0, lr_schedule="linear")
    assert [learning_rate(linear, s, 10) for s in (1, 5, 10)] == pytest.approx([1.8, 1.0, 0.0])
    assert learning_rate(TrainConfig(lr=0.3), 7, 10) == 0.3


def test_training_options_are_checked() -> None:
    from retr.config import TrainConfig
    from retr.errors import ConfigError

    for bad, match in [({"optimizer": "sgd"}, "train.optimizer"),
                       ({"lr_schedule": "step"}, "train.lr_schedule"),
                       ({"warmup_steps": -1}, "warmup_steps"),
                       ({"loss": "bpr", "label_smoothing": 0.1}, "full softmax"),
                       ({"loss": "ce", "negative_sampler": "popularity"}, "sampled_softmax")]:
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**bad)


def test_label_smoothing_matches_torch() -> None:
    from retr.training.losses import ce_loss

    torch.manual_seed(0)
    model = build_model("sasrec", 40, {"hidden_size": 8, "max_len": 5})
    h = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(1, 41, (13,))
    gen = torch.Generator().manual_seed(0)
    ours = ce_loss(model, h, targets, gen, smoothing=0.2)
    logits = h @ model.item_representation(torch.arange(1, 41)).T
    ref = F.cross_entropy(logits, targets - 1, label_smoothing=0.2)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, h)[0]
    g_ref = torch.autograd.grad(ref, h)[0]
    torch.testing.assert_close(g_ours, g_ref)


def test_logq_correction_estimates_the_full_softmax() -> None:
    """Negatives drawn by popularity: with the logQ correction the sampled partition sum is an
    importance-sampling estimate of the full one, so the loss tends to its full-catalogue
    limit log(a + Z - e^s_t) - log a, a = e^s_t / (n Q_t); without it, it is biased."""
    from retr.training.losses import popularity_proposal, sampled_softmax_loss

    torch.manual_seed(0)
    n_items, n = 60, 4000
    model = build_model("sasrec", n_items, {"hidden_size": 8, "max_len": 5})
    h = torch.randn(32, 8)
    targets = torch.randint(1, n_items + 1, (32,))
    counts = np.concatenate([[0], np.geomspace(1000, 1, n_items)])  # a long tail
    proposal = popularity_proposal(counts)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        scores = model.score_items(h, torch.arange(1, n_items + 1)).double()  # [P, I]
        e_t = scores.gather(1, targets[:, None] - 1).exp().squeeze(1)
        a = e_t / (n * proposal.double()[targets])
        limit = float(((a + scores.exp().sum(1) - e_t).log() - a.log()).mean())
        corrected = np.mean([float(sampled_softmax_loss(model, h, targets, gen, n, proposal))
                             for _ in range(5)])
        neg = torch.multinomial(proposal, n, replacement=True, generator=gen)
        logits = torch.cat([model.score_candidates(h, targets[:, None]),
                            model.score_items(h, neg).masked_fill(
                                neg[None, :] == targets[:, None], float("-inf"))], dim=1)
        uncorrected = float(F.cross_entropy(logits, torch.zeros_like(targets)))
    assert abs(corrected - limit) < 0.02 * abs(limit)
    assert abs(uncorrected - limit) > 10 * abs(corrected - limit)


def test_resume_with_the_training_options_is_exact(tmp_path):
    """AdamW, warm-up and popularity-sampled softmax resume bit-identically too (the
    learning rate follows the step count; the proposal comes from the stored split)."""
    options = ["train.optimizer='adamw'", "train.weight_decay=0.01", "train.warmup_steps=3",
               "train.loss='sampled_softmax'", "train.negative_sampler='popularity'",
               "train.negatives=20"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--data", DATA, "--model", "sasrec", "--out", str(full),
                 *_sets("sasrec", 3, options)]) == 0
    assert main(["train", "--data", DATA, "--model", "sasrec", "--out", str(part),
                 *_sets("sasrec", 2, options)]) == 0
    cfg = json.loads((part / "config.json").read_text())
    cfg["train"]["epochs"] = 3
    (part / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(part)]) == 0
    a, b = load_file(str(full / "last.safetensors")), load_file(str(part / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_windows_by_hand() -> None:
    from retr.training.trainer import training_windows

    users, lengths = np.array([0, 1, 2]), np.array([5, 12, 6])
    u, n = training_windows(users, lengths, window=5, stride=4)
    # 5 fits the window; 12 adds ceil(7 / 4) = 2 rows ending 4 and 8 items earlier; 6 adds one.
    assert u.tolist() == [0, 1, 1, 1, 2, 2] and n.tolist() == [5, 12, 8, 4, 6, 2]
    same = training_windows(users, lengths, window=5, stride=0)
    assert same[0] is users and same[1] is lengths


@pytest.mark.parametrize("cloze", [False, True])
def test_training_windows_reach_every_target(cloze: bool) -> None:
    """With stride = N every target of a long history is in exactly one row's window; with a
    smaller stride every target is still reached (windows overlap)."""
    from retr.training.trainer import training_windows

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 200, size=300)
    n = 16
    window = n if cloze else n + 1
    first = 0 if cloze else 1  # a next-item row's first item is input only
    for stride, once in [(n, True), (5, False), (1, False)]:
        users, ends = training_windows(np.arange(300), lengths, window, stride)
        hits = np.zeros((300, 200), dtype=np.int64)
        for u, e in zip(users, ends, strict=True):  # test-side bookkeeping, not library code
            hits[u, max(e - window, 0) + first:e] += 1
        for u, length in enumerate(lengths):
            assert (hits[u, first:length] >= 1).all() and not hits[u, length:].any()
            if once:
                assert (hits[u, first:length] == 1).all()


def test_window_stride_is_checked() -> None:
    from retr.config import TrainConfig, resolve_config
    from retr.errors import ConfigError

    with pytest.raises(ConfigError, match="train.window_stride"):
        TrainConfig(window_stride=-1)
    with pytest.raises(ConfigError, match="model.max_len"):
        resolve_config(None, ["model.name='sasrec'", "model.max_len=20",
                              "train.window_stride=21"])


def test_window_stride_trains_and_resumes_exactly(tmp_path, capsys):
    """Histories of up to 60 items, a window of 10: the extra rows train, and resume after a
    kill is bit-identical with them."""
    data = "synthetic:n_users=120,n_items=200,n_themes=8,min_len=30,max_len=60,seed=3"
    options = ["model.max_len=10", "train.window_stride=10"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--data", data, "--model", "sasrec", "--out", str(full),
                 *_sets("sasrec", 2, options)]) == 0
    assert main(["train", "--data", data, "--model", "sasrec", "--out", str(part),
                 *_sets("sasrec", 1, options)]) == 0
    cfg = json.loads((part / "config.json").read_text())
    assert cfg["train"]["window_stride"] == 10
    cfg["train"]["epochs"] = 2
    (part / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(part)]) == 0
    a, b = load_file(str(full / "last.safetensors")), load_file(str(part / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain"  # the same run on the last windows only trains other weights
    assert main(["train", "--data", data, "--model", "sasrec", "--out", str(plain),
                 *_sets("sasrec", 2, ["model.max_len=10"])]) == 0
    c = load_file(str(plain / "last.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    capsys.readouterr()


def test_too_few_negatives_names_a_value_that_works(tmp_path, capsys):
    import re

    data = "synthetic:n_users=120,n_items=80,n_themes=8,min_len=30,max_len=60,seed=3"
    assert main(["train", "--data", data, "--model", "pop", "--out", str(tmp_path / "r"),
                 *_sets("pop", 1)]) != 0
    err = capsys.readouterr().err
    fits = int(re.search(r"--set eval.negatives=(\d+)", err).group(1))
    assert "fewer than the 50 negatives" in err and 1 <= fits < 50
    assert main(["train", "--data", data, "--model", "pop", "--out", str(tmp_path / "ok"),
                 *_sets("pop", 1, [f"eval.negatives={fits}"])]) == 0
