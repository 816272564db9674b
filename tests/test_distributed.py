"""Several processes (torch.distributed, gloo on the CPU) and mixed precision.

The two-process tests spawn their processes themselves (torch.multiprocessing.spawn, or
torchrun for the CLI); each takes a few seconds, most of it importing torch twice.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fxsearch
from fxsearch import ConfigError, distributed
from fxsearch.quantizers import fake_quant_act
from fxsearch.search import SearchSettings, run_search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    """conv-bn-relu, conv-relu, pool, linear: a residual-free model with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def _data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


def _search_model(sampling: str = "hard"):
    torch.manual_seed(0)
    return fxsearch.convert(Net(), (torch.randn(4, 1, 6, 6),), sampling=sampling, a_precisions=(2, 4, 8))


SETTINGS = dict(epochs=2, lambda_ramp_epochs=1, freeze_bn=True, device="cpu", progress=False, arch_lr=0.1)
GLOBAL_BATCH = 8


def _run(world: int) -> dict[str, torch.Tensor]:
    """The search on this process's share: per-process batch = global batch / world, the
    training data in DistributedSampler order (the same global batches for any world size)."""
    data = _data()
    sampler = DistributedSampler(data, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=0)
    train = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    val = DataLoader(distributed.shard(_data(20)), batch_size=8)
    sm = _search_model()
    history = run_search(sm, train, val, lam=1.0, settings=SearchSettings(**SETTINGS))
    state = {k: v.clone() for k, v in sm.state_dict().items()}
    state["val_acc"] = torch.tensor([row["val_acc"] for row in history])
    state["temperature"] = torch.tensor(sm.temperature)
    return state


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state = _run(world)
        gathered = [None] * world
        dist.all_gather_object(gathered, state)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- DDP -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["hard", "gumbel", "softmax"])
def test_every_trainable_parameter_gets_a_gradient(sampling):
    """DistributedDataParallel needs no find_unused_parameters: argmax sampling still sends a
    gradient (zero where a choice is idle) to every choice parameter, also with lambda = 0."""
    sm = _search_model(sampling).train()
    out, _ = distributed.SearchStep(sm)(torch.randn(4, 1, 6, 6))
    out.square().mean().backward()
    missing = [n for n, p in sm.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(p.grad is not None for p in sm.arch_parameters())


def test_two_processes_equal_one_process(tmp_path):
    """Two gloo processes on half batches end where one process on the whole batch does:
    weights, choice parameters, clip bounds, temperature, validation accuracy per epoch."""
    out = str(tmp_path / "states.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    one = _run(1)
    for key, ref in one.items():
        for rank, state in enumerate(two):
            assert torch.allclose(state[key].float(), ref.float(), rtol=1e-4, atol=1e-5), (key, rank)
    assert torch.equal(two[0]["val_acc"], one["val_acc"])
    alphas = [k for k in one if k.endswith("alpha")]
    assert alphas and any(not torch.equal(one[k], _search_model().state_dict()[k]) for k in alphas)


def test_cli_under_torchrun_rank0_writes(tmp_path):
    """python -m fxsearch.search under torchrun with 2 processes: one run directory, every file
    once, one summary on stdout; the same directory resumes with one process."""
    out = tmp_path / "run"
    args = ["-m", "fxsearch.search", "--model", "dscnn", "--limit-train", "64", "--limit-eval", "32",
            "--image-size", "8", "--epochs", "1", "--warmup-epochs", "1", "--finetune-epochs", "1",
            "--lambdas", "1", "--baselines", "none", "--batch-size", "16", "--amp", "bf16", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("plot:") == 1 and run.stderr.count("warm-up done") == 1
    names = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert names == ["joint/lambda_1/final.pt", "joint/lambda_1/model.onnx", "joint/lambda_1/report.json",
                     "joint/lambda_1/search.pt", "pareto.csv", "pareto.png", "settings.json", "warmup.json",
                     "warmup.pt"]
    report = json.loads((out / "joint" / "lambda_1" / "report.json").read_text())
    assert report["processes"] == 2 and report["amp"] == "bf16"
    fxsearch.load(str(out / "joint" / "lambda_1" / "search.pt"))     # plain keys, no DDP prefix
    again = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before" in again.stderr and again.stdout.count("plot:") == 1


# ---- SyncBatchNorm -------------------------------------------------------------------------
def test_sync_batchnorm_search_model_trains_and_finalizes():
    """convert_sync_batchnorm on a search model: it trains (one process: plain batch norm),
    checkpoints under the same keys, and finalize folds SyncBatchNorm like BatchNorm2d."""
    sm = _search_model()
    sm = nn.SyncBatchNorm.convert_sync_batchnorm(sm)
    assert isinstance(sm.b1, nn.SyncBatchNorm)
    loss = sm(torch.randn(8, 1, 6, 6)).square().mean() + sm.cost * 1e-4
    loss.backward()
    sm.eval()
    x = torch.randn(5, 1, 6, 6)
    final = fxsearch.finalize(sm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in final.modules())
    with torch.no_grad():
        assert torch.allclose(final(x), sm(x), atol=1e-5)
    plain = _search_model()
    plain.load_state_dict(sm.state_dict())
    assert sm.state_dict().keys() == plain.state_dict().keys()


# ---- mixed precision -----------------------------------------------------------------------
def test_autocast_bf16_quantizers_compute_in_float32():
    """Under autocast bf16 the activation quantizer receives bf16 and answers in float32, on the
    same integer grid as float32 arithmetic on the same values; the weight quantizer is unchanged."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)
    x = torch.randn(2, 4, 10, 10)
    lo, hi = torch.tensor(-1.3), torch.tensor(2.1)
    bits, theta = torch.tensor([2.0, 4.0, 8.0]), torch.tensor([0.0, 0.0, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        assert y.dtype == torch.bfloat16
        q = fake_quant_act(y, lo, hi, bits, theta)
    assert q.dtype == torch.float32
    ref = fake_quant_act(y.float(), lo, hi, bits, theta)
    assert torch.equal(q, ref)
    scale = (hi - lo) / 255
    zp = torch.round(-lo / scale)
    codes = q / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= 0 and codes.max() <= 255

    sm = _search_model().train()
    inp = torch.randn(4, 1, 6, 6)
    layer = sm.search_layers()["c2"]
    theta_w = sm.get_submodule(f"fxs_choices.g{sm.analysis.layers['c2'].group}")()
    w_ref = layer.effective_params(theta_w)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_amp = layer.effective_params(theta_w)[0]
        out, cost = distributed.SearchStep(sm)(inp)
    assert w_amp.dtype == torch.float32 and torch.equal(w_amp, w_ref)
    assert cost.dtype == torch.float32 and torch.isfinite(out).all()
    (out.float().square().mean() + cost * 1e-4).backward()
    assert all(torch.isfinite(p.grad).all() for p in sm.parameters() if p.grad is not None)


def test_search_runs_under_bf16_autocast():
    data = _data()
    train = DataLoader(data, batch_size=GLOBAL_BATCH)
    sm = _search_model()
    history = run_search(sm, train, DataLoader(_data(16), batch_size=8), lam=1.0,
                         settings=SearchSettings(**{**SETTINGS, "epochs": 1, "amp": "bf16"}))
    assert len(history) == 1 and all(v == v for v in history[0].values())


def test_grad_scaler_path_matches_unscaled_steps():
    """The fp16 path's loss scaling (scale, step both optimisers, update), run here with a CPU
    GradScaler and no autocast: a power-of-two scale leaves the steps as they were."""
    from fxsearch.search import make_optimizers, search_epoch
    states = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        sm = _search_model().train()
        opt_w, opt_a = make_optimizers(sm, SearchSettings(arch_lr=0.1))
        search_epoch(sm, DataLoader(_data(), batch_size=GLOBAL_BATCH), opt_w, opt_a, 1.0, cost_scale=1e4,
                     device="cpu", scaler=scaler)
        states.append(sm.state_dict())
    for key, value in states[0].items():
        assert torch.allclose(states[1][key].float(), value.float(), atol=1e-6), key


def test_amp_options_are_checked():
    with pytest.raises(ConfigError, match="amp"):
        SearchSettings(amp="fp8")
    with pytest.raises(ConfigError, match="CUDA"):
        distributed.grad_scaler(torch.device("cpu"), "fp16")
    assert distributed.grad_scaler(torch.device("cpu"), "bf16") is None
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
