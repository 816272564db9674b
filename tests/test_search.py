"""Search driver, datasets and the sweep CLI (python -m fxsearch.search)."""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import fxsearch
from fxsearch import ConfigError, fused_choices
from fxsearch.data import load_data
from fxsearch.final_modules import QuantWeightMixin
from fxsearch.search_modules import ActSearch, WeightSearchMixin
from fxsearch.search import (SearchResult, SearchSettings, bracket_zero, evaluate, make_optimizers, run_search,
                             search, sequential_search, warmup)
from fxsearch.search_cli import main


class Tiny(nn.Module):
    """conv-bn-relu x2, global pool, linear: small enough for a few CPU steps per test."""

    def __init__(self, c_in: int = 1, width: int = 8, classes: int = 10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def digits8():
    """Digits at 1x8x8, 320 training and 128 validation/test samples."""
    return load_data("digits", channels=1, image_size=8).limited(320, 128)


def loaders(data, batch: int = 32):
    gen = torch.Generator().manual_seed(0)
    return (DataLoader(data.train, batch_size=batch, shuffle=True, generator=gen),
            DataLoader(data.val, batch_size=128), DataLoader(data.test, batch_size=128))


# ---- datasets ------------------------------------------------------------------------------
def test_digits_splits_are_fixed_stratified_and_disjoint():
    a, b = load_data("digits"), load_data("digits", channels=1, image_size=8)
    assert a.input_shape == (3, 16, 16) and b.input_shape == (1, 8, 8) and a.num_classes == 10
    assert (len(a.train), len(a.val), len(a.test)) == (1079, 359, 359)
    assert torch.equal(a.test.labels, b.test.labels)             # same split whatever the shape
    assert torch.equal(a.test.labels, load_data("digits").test.labels)
    counts = torch.bincount(a.val.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37               # stratified
    x, y = a.val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[0], x[1])                                 # gray repeated over channels


def write_cifar(root, per_batch: int = 6, test: int = 8, seed: int = 0) -> str:
    """A tiny copy of CIFAR-10's python format: cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)

    def batch(name, n):
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)], "filenames": [f"{k}.png" for k in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)

    for k in range(1, 6):
        batch(f"data_batch_{k}", per_batch)
    batch("test_batch", test)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)], "num_vis": 3072}, f)
    return str(root)


def test_cifar10_reads_the_python_format(tmp_path):
    root = write_cifar(tmp_path)
    data = load_data(f"cifar10:{root}")
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 8)
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        raw = pickle.load(f)
    x, y = data.test[2]
    assert y == raw["labels"][2] and x.shape == (3, 32, 32)
    expected = torch.tensor(raw["data"][2], dtype=torch.float32).view(3, 32, 32) / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    torch.testing.assert_close(x, (expected - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    assert data.train[0][0].shape == (3, 32, 32)                 # augmented crops keep the shape


def test_missing_or_bad_dataset_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_data(f"cifar10:{tmp_path}/nowhere")
    with pytest.raises(ConfigError, match="data_batch_1 not found"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(ConfigError, match="no such file"):
        load_data(f"imagefolder:{tmp_path}/nowhere")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_data("mnist")
    with pytest.raises(ConfigError, match="needs a path"):
        load_data("cifar10")


def test_imagefolder_splits_one_folder(tmp_path):
    from PIL import Image
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / c)
        for k in range(10):
            Image.new("RGB", (20, 24), (k * 20, 0, 0)).save(tmp_path / c / f"{k}.png")
    data = load_data(f"imagefolder:{tmp_path}", image_size=12)
    assert data.num_classes == 2 and data.input_shape == (3, 12, 12)
    assert (len(data.train), len(data.val), len(data.test)) == (16, 2, 2)
    assert data.test[0][0].shape == (3, 12, 12)


# ---- the driver ----------------------------------------------------------------------------
def test_the_readme_loop_moves_the_choices_and_keeps_clip_ranges_around_zero():
    """README's own loop: convert keeps the model's mode (eval here, where every choice is its
    argmax and the choices get no gradient), so the loop calls train(); make_optimizers spares
    the clip bounds weight decay; bracket_zero clamps lo <= 0 <= hi and nothing else."""
    torch.manual_seed(0)
    sm = fxsearch.convert(Tiny(c_in=3).eval(), (torch.randn(4, 3, 8, 8),))
    assert not sm.training
    opt_w, opt_a = make_optimizers(sm)
    bounds = {id(p) for p in sm.quantizer_parameters()}
    assert bounds and all(g["weight_decay"] == (0.0 if id(g["params"][0]) in bounds else 1e-4)
                          for g in opt_w.param_groups)
    before = [p.detach().clone() for p in sm.arch_parameters()]
    sm.train()
    for _ in range(2):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(sm(x), y) + 0.5 * sm.cost / sm.cost.detach()
        opt_w.zero_grad(); opt_a.zero_grad(); loss.backward(); opt_w.step(); opt_a.step()
        bracket_zero(sm)
    assert any(not torch.equal(a, b) for a, b in zip(before, sm.arch_parameters()))
    acts = [m for m in sm.modules() if isinstance(m, ActSearch) and isinstance(m.lo, nn.Parameter)]
    first, last = acts[0], acts[-1]
    assert first is not last
    with torch.no_grad():
        first.lo.fill_(0.3)
        last.hi.fill_(-0.2)
        kept = first.hi.detach().clone(), last.lo.detach().clone()
    bracket_zero(sm)
    assert float(first.lo.detach()) == 0.0 and float(last.hi.detach()) == 0.0
    assert torch.equal(first.hi.detach(), kept[0]) and torch.equal(last.lo.detach(), kept[1])


def test_search_trains_and_a_large_lambda_cuts_the_cost(digits8):
    train, val, _ = loaders(digits8)
    torch.manual_seed(0)
    model = Tiny()
    warmup(model, train, val, 2, SearchSettings(**QUIET))
    example = (next(iter(train))[0],)

    sm = fxsearch.convert(model, example)
    history = run_search(sm, train, val, 0.0, SearchSettings(epochs=3, patience=0, **QUIET))
    assert history[-1]["task"] < history[0]["task"]              # the task loss falls
    assert history[1]["temperature"] == pytest.approx(history[0]["temperature"] * math.exp(-0.045))

    sm = fxsearch.convert(model, example, sampling="hard")
    start = sm.discrete_cost()
    history = run_search(sm, train, val, 50.0, SearchSettings(epochs=3, patience=0, arch_lr=0.5, **QUIET))
    assert sm.discrete_cost() < 0.5 * start                       # the cost falls under a large lambda
    assert history[-1]["argmax_cost"] == pytest.approx(sm.discrete_cost())
    assert not sm.training


def test_progress_bars_do_not_change_the_training(digits8):
    """Same seed, same batches, same weights with and without progress bars (tqdm.auto's
    class once built a DataLoader iterator of its own, which advanced the shuffle generator)."""
    trained = []
    for progress in (False, True):
        torch.manual_seed(0)
        model = Tiny()
        train, val, _ = loaders(digits8)
        history = warmup(model, train, val, 2, SearchSettings(progress=progress))
        trained.append((history, model.state_dict()))
    (h0, s0), (h1, s1) = trained
    assert [r["loss"] for r in h0] == [r["loss"] for r in h1]
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_optimisers_follow_the_protocol():
    sm = fxsearch.convert(Tiny(), (torch.randn(2, 1, 8, 8),))
    opt_w, opt_a = make_optimizers(sm)
    assert isinstance(opt_w, torch.optim.Adam) and isinstance(opt_a, torch.optim.SGD)
    decayed = {id(p) for g in opt_w.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]}
    free = {id(p) for g in opt_w.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {id(p) for p in sm.quantizer_parameters()} == free
    assert decayed | free == {id(p) for p in sm.weight_parameters()}
    assert opt_a.param_groups[0]["lr"] == 1e-2 and opt_a.param_groups[0]["momentum"] == 0.9
    assert opt_a.param_groups[0]["weight_decay"] == 0 and opt_w.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ConfigError):
        SearchSettings(epochs=-1)
    opt_a = make_optimizers(sm, SearchSettings(arch_optimizer="adam", arch_lr=0.01))[1]
    assert isinstance(opt_a, torch.optim.Adam) and opt_a.param_groups[0]["lr"] == 0.01
    for bad in (dict(arch_optimizer="rmsprop"), dict(schedule="linear")):
        with pytest.raises(ConfigError):
            SearchSettings(**bad)


def test_search_returns_a_finalized_fine_tuned_model(digits8):
    train, val, test = loaders(digits8)
    torch.manual_seed(0)
    settings = SearchSettings(epochs=2, finetune_epochs=1, arch_lr=0.1, **QUIET)
    result = search(Tiny(), train, val, test, lam=0.5, settings=settings, warmup_epochs=1, sampling="hard")
    assert isinstance(result, SearchResult)
    assert 0 <= result.accuracy <= 1 and result.float_accuracy is not None
    assert list(result.costs)[0] == "size" and result.costs["size_bytes"] == result.costs["size"] / 8
    assert {"search", "finetune", "warmup", "total"} <= set(result.timings)
    assert any(isinstance(m, QuantWeightMixin) for m in result.final.modules())
    assert result.accuracy == pytest.approx(evaluate(result.final, test)[0])
    assert [r["layer"] for r in result.layers] == ["c1", "c2", "fc"]
    for r in result.layers:
        assert r["channels_kept"] == len(r["w_bits"]) <= r["channels_original"]
    counted = fxsearch.cost_models.count_cost(result.final, (torch.randn(1, 1, 8, 8),), "size")
    assert result.costs["size"] == pytest.approx(counted)
    assert result.search_model.discrete_cost() == pytest.approx(result.costs["size"])
    assert not any(getattr(m, "fused", False) for m in result.search_model.modules())


def test_search_can_fuse_the_quantizers(digits8, monkeypatch):
    """settings.fuse_quantizers reaches the model the search trains: its quantizers and its
    choice side (masks, weights, cost), which compiles without a fallback warning and serves
    the cost of every training step."""
    train, val, _ = loaders(digits8)
    settings = SearchSettings(epochs=1, finetune_epochs=0, fuse_quantizers=True, **QUIET)
    served = []
    step_costs = fused_choices.step_costs
    monkeypatch.setattr(fused_choices, "step_costs", lambda *a: served.append(step_costs(*a)) or served[-1])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*could not be compiled")
        result = search(Tiny(), train, val, lam=0.5, settings=settings)
    quantizers = [m for m in result.search_model.modules() if isinstance(m, (ActSearch, WeightSearchMixin))]
    assert quantizers and all(m.fused for m in quantizers)
    assert result.search_model.fused_cost
    side = fused_choices._SIDES[result.search_model]
    assert side.compiled and side.failed is None  # it ran compiled
    train_steps = len(train)
    assert sum(c is not None for c in served) == train_steps, (len(served), train_steps)


def test_sequential_baseline_prunes_then_quantizes(digits8):
    train, val, test = loaders(digits8)
    torch.manual_seed(0)
    settings = SearchSettings(epochs=2, finetune_epochs=1, arch_lr=0.5, **QUIET)
    result = sequential_search(Tiny(), train, val, test, lam=5.0, settings=settings, sampling="hard")
    bits = {b for r in result.layers for b in r["w_bits"]}
    assert bits <= {2, 4, 8}
    assert [r["channels_original"] for r in result.layers] == [8, 8, 10]
    assert {"prune_search", "precision_search", "search", "total"} <= set(result.timings)
    assert {"prune_search", "precision_search"} <= set(result.history)
    with pytest.raises(ConfigError, match="must not hold 0"):
        sequential_search(Tiny(), train, val, test, lam=1.0, settings=settings, w_precisions=(0, 4))


# ---- the CLI -------------------------------------------------------------------------------
def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fxsearch.search", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_run_is_the_same_whether_it_trained_or_read_the_warm_up(tmp_path):
    """A run in the invocation that trains the warm-up equals the same run in a later
    invocation that reads warmup.pt (the warm model was left in eval mode by the first)."""
    args = ("--lambdas", "2", "--baselines", "none", "--epochs", "1", "--warmup-epochs", "1",
            "--finetune-epochs", "1", "--limit-train", "96", "--limit-eval", "64", "--batch-size", "32", "-q")
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli(*args, "--out", str(first)).returncode == 0
    second.mkdir()
    for name in ("settings.json", "warmup.pt", "warmup.json"):
        (second / name).write_bytes((first / name).read_bytes())
    done = cli(*args, "--out", str(second))
    assert done.returncode == 0, done.stderr
    a, b = (torch.load(d / "joint/lambda_2/final.pt", weights_only=True) for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_help_and_usage_errors(tmp_path, capsys):
    done = cli("--help")
    assert done.returncode == 0 and "--lambdas" in done.stdout and "--limit-train" in done.stdout
    done = cli("--lambdas", "one")
    assert done.returncode == 2 and "usage:" in done.stderr
    for bad in (["--epochs", "-3"], ["--data", "mnist"], ["--baselines", "w3a8"], ["--cost", "watts"],
                ["--a-precisions", "8,x"], ["--no-such-option"]):
        assert main(bad) == 2, bad
        assert "usage:" in capsys.readouterr().err
    assert main(["--data", f"cifar10:{tmp_path}/nowhere", "--out", str(tmp_path / "run"), "-q"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ConfigError: cifar10:")


TINY_RUN = ("--lambdas", "2", "--baselines", "w8a8", "--epochs", "1", "--warmup-epochs", "1",
            "--finetune-epochs", "1", "--limit-train", "96", "--limit-eval", "64", "--batch-size", "32", "-q")


def test_cli_writes_a_resumable_run_directory(tmp_path):
    out = tmp_path / "run"
    done = cli(*TINY_RUN, "--out", str(out))
    assert done.returncode == 0, done.stderr
    for rel in ("settings.json", "warmup.pt", "warmup.json", "pareto.csv", "pareto.png",
                "joint/lambda_2/report.json", "joint/lambda_2/model.onnx", "joint/lambda_2/search.pt",
                "joint/lambda_2/final.pt", "uniform/w8a8/report.json", "uniform/w8a8/model.onnx"):
        assert (out / rel).is_file(), rel
    assert not [p for p in out.rglob("*.tmp")]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "joint/lambda_2/report.json").read_text())
    assert report["kind"] == "joint" and report["lambda"] == 2 and 0 <= report["accuracy"] <= 1
    assert report["costs"]["size_bytes"] > 0 and report["layers"][0]["layer"] == "conv"
    assert {"channels_kept", "channels_original", "w_bits", "a_bits"} <= set(report["layers"][0])
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert [(r["kind"], r["name"]) for r in rows] == [("joint", "lambda_2"), ("uniform", "w8a8")]
    assert float(rows[1]["size_bytes"]) == 77360 and {"lambda", "accuracy", "wall_s", "on_front"} <= set(rows[0])
    assert "plot:" in done.stdout and "model.onnx" in done.stdout

    sm = fxsearch.load(out / "joint/lambda_2/search.pt")         # the checkpoint rebuilds
    final = fxsearch.finalize(sm)
    final.load_state_dict(torch.load(out / "joint/lambda_2/final.pt", weights_only=True))

    stamp = (out / "joint/lambda_2/report.json").stat().st_mtime_ns
    again = cli(*TINY_RUN[:-1], "--out", str(out), "--lambdas", "2,3")   # resume, one more lambda
    assert again.returncode == 0, again.stderr
    assert "joint lambda_2: done before" in again.stderr and "uniform w8a8: done before" in again.stderr
    assert "warm-up: read" in again.stderr
    assert (out / "joint/lambda_2/report.json").stat().st_mtime_ns == stamp
    assert (out / "joint/lambda_3/report.json").is_file()
    assert len(list(csv.DictReader((out / "pareto.csv").open()))) == 3

    for option, stored in ((("--epochs", "2"), "epochs=1"), (("--amp", "bf16"), "amp=None")):
        changed = cli(*TINY_RUN, "--out", str(out), *option)
        assert changed.returncode == 1 and "error: ConfigError: run directory" in changed.stderr
        assert stored in changed.stderr
