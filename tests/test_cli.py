"""The command line end to end on tiny data."""

import json

import pytest

from retr.cli import main

TINY = "synthetic:n_users=150,n_items=150,n_themes=10,min_len=10,max_len=16,seed=1"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_pop_then_evaluate(tmp_path, capsys):
    run_dir = tmp_path / "pop"
    code, out, err = run(capsys, "train", "--data", TINY, "--model", "pop", "--out", str(run_dir),
                         "--set", "train.progress=false")
    assert code == 0, err
    assert "HR@10" in out and "sampled-100" in out
    for name in ("config.json", "vocab.json", "split.npz", "model.safetensors", "results.json",
                 "negatives_valid.npy", "negatives_test.npy", "env.json"):
        assert (run_dir / name).is_file(), name
    code, out, err = run(capsys, "evaluate", str(run_dir), "--protocol", "full", "--json")
    assert code == 0, err
    res = json.loads(out)
    saved = json.loads((run_dir / "results.json").read_text())
    full_test = [r for r in saved["results"] if r["split"] == "test" and r["protocol"] == "full"][0]
    assert res["results"][0]["metrics"] == full_test["metrics"]
    assert res["data_fingerprint"] == saved["data_fingerprint"]


def test_describe_json_and_table(capsys):
    code, out, _ = run(capsys, "data", "describe", TINY, "--json", "--no-filter")
    assert code == 0
    stats = json.loads(out)
    assert stats["users"] == 150 and stats["items"] > 0
    code, out, _ = run(capsys, "data", "describe", TINY)
    assert code == 0 and "interactions" in out


@pytest.mark.parametrize("argv, needle", [
    (["data", "describe", "no-such-dataset"], "no-such-dataset"),
    (["train", "--data", TINY, "--model", "nope", "--out", "x"], "nope"),
    (["train", "--data", TINY, "--model", "pop", "--out", "x", "--set", "train.bogus=1"], "bogus"),
    (["train", "--data", TINY, "--model", "pop", "--out", "x", "--set", "eval.ks=[0]"], "eval.ks"),
    (["train", "--data", TINY, "--model", "pop", "--out", "x", "--set", "train.lr=fast"], "train.lr"),
    (["evaluate", "/nonexistent/run"], "no such run directory"),
])
def test_bad_input_one_line_error(capsys, argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert run(capsys, "train", "--data", TINY, "--model", "pop", "--out", str(run_dir),
               "--set", "train.progress=false")[0] == 0
    code, _, err = run(capsys, "train", "--data", TINY, "--model", "pop", "--out", str(run_dir))
    assert code != 0 and "--resume" in err


def test_config_show(capsys):
    code, out, _ = run(capsys, "config", "show", "--model", "pop", "--set", "train.lr=0.01")
    assert code == 0
    cfg = json.loads(out)
    assert cfg["train"]["lr"] == 0.01 and cfg["model"]["name"] == "pop"


def test_compare_prints_one_table(tmp_path, capsys):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(
        "[train]\nepochs = 2\nloss = 'ce'\nprogress = false\n[eval]\nnegatives = 50\n"
        "[models.sasrec]\nhidden_size = 16\nmax_len = 16\n[models.pop]\nmax_len = 16\n")
    code, out, err = run(capsys, "compare", "--data", TINY, "--models", "pop,sasrec",
                         "--config", str(cfg), "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    rows = [ln for ln in out.splitlines() if ln.startswith(("pop", "sasrec"))]
    assert len(rows) == 4  # two models x two protocols, test split
    assert (tmp_path / "cmp" / "sasrec" / "model.safetensors").is_file()


def test_data_synthetic_writes_log_and_pathways(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "synthetic", str(tmp_path / "syn"), "--spec", TINY)
    assert code == 0
    assert (tmp_path / "syn" / "interactions.csv").is_file()
    assert (tmp_path / "syn" / "pathways.json").is_file()
    code, out, _ = run(capsys, "data", "describe", str(tmp_path / "syn" / "interactions.csv"),
                       "--json", "--no-filter")
    assert code == 0 and json.loads(out)["users"] == 150
