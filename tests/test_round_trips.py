"""Dtypes, devices and round trips: float64 end to end, bit-identical repeats from one seed,
CUDA (where there is one), state_dict save/load of search and finalized models, and a
checkpoint that exports the same ONNX bytes in a new process."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fxsearch
from fxsearch.exporters import verify_onnx
from fxsearch.search_modules import GroupChoice

import models as M

TESTS = os.path.dirname(os.path.abspath(__file__))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 convolutions and matmuls on the GPU, as on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def searched(model: torch.nn.Module, x: torch.Tensor, steps: int = 3, **options) -> fxsearch.SearchModel:
    """Convert ``model`` and take a few joint search steps (weights, choices, clip bounds);
    then push some choices to 0 bits so that finalize prunes."""
    sm = fxsearch.convert(model, (x,), **options)
    sm.train()
    opt = torch.optim.Adam(sm.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = sm(x).square().mean() + 1e-6 * sm.cost
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for m in sm.modules():
            if isinstance(m, GroupChoice):
                m.alpha[0, ::3] = 5.0  # frozen units keep their channels through `allowed`
    return sm.eval()


def finalize(sm: fxsearch.SearchModel) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a tensor revived at one channel
        return fxsearch.finalize(sm)


def onnx_bytes(final, x, fmt: str = "qdq") -> bytes:
    return fxsearch.exporters.onnx_qdq.export_qdq(final, (x,)).SerializeToString() if fmt == "qdq" else \
        fxsearch.exporters.onnx_qdq.export_packed(final, (x,)).SerializeToString()


def fine_tune(final, x, steps: int = 2) -> None:
    final.train()
    opt = torch.optim.SGD(final.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = final(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final.eval()


# ---- float64 ---------------------------------------------------------------------------------
def test_float64_end_to_end(tmp_path):
    x = M.example_input(4).double()
    sm = searched(M.Residual().double(), x)
    floats = {t.dtype for t in sm.state_dict().values() if t.is_floating_point()} - {torch.float32}
    assert floats == {torch.float64}
    assert {p.dtype for p in sm.parameters()} == {torch.float64}  # choices and clip bounds too
    with torch.no_grad():
        want = sm(x)
    assert want.dtype == torch.float64
    final = finalize(sm)
    assert {p.dtype for p in final.parameters()} == {torch.float64}
    with torch.no_grad():
        got = final(x)
    assert got.dtype == torch.float64
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # the bias on its int32 grid
    for fmt in ("qdq", "packed"):
        path = tmp_path / f"{fmt}.onnx"
        fxsearch.export_onnx(final, path, (x,), format=fmt)
        report = verify_onnx(final, path, (x,))
        assert report.weights_exact and report.ok, report.summary()


def test_float64_checkpoint_loads_as_float64(tmp_path):
    x = M.example_input(2).double()
    sm = searched(M.Residual().double(), x)
    fxsearch.save(sm, tmp_path / "c.pt", model_ref="models:Residual")
    back = fxsearch.load(tmp_path / "c.pt").eval()
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    for k, v in sm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(back(x), sm(x))


# ---- same seed, same bits --------------------------------------------------------------------
def _run_from_seed(seed: int):
    torch.manual_seed(seed)
    x = M.example_input(4)
    sm = searched(M.SEGate(), x, sampling="gumbel")  # random sampling: the seed must fix it
    return sm, x


def test_same_seed_gives_bit_identical_search_and_onnx():
    a, x = _run_from_seed(3)
    b, y = _run_from_seed(3)
    assert torch.equal(x, y)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    fa, fb = finalize(a), finalize(a)
    for fmt in ("qdq", "packed"):
        assert onnx_bytes(fa, x, fmt) == onnx_bytes(fb, x, fmt)
    assert onnx_bytes(finalize(b), x) == onnx_bytes(fa, x)
    c, _ = _run_from_seed(4)
    assert not torch.equal(c.state_dict()["fxs_choices.g0.alpha"], sa["fxs_choices.g0.alpha"])


# ---- state_dict round trips ------------------------------------------------------------------
@pytest.mark.parametrize("model_cls", [M.Residual, M.Concat, M.ConvNeXtLike], ids=lambda c: c.__name__)
def test_state_dict_round_trip_of_search_and_finalized_models(model_cls, tmp_path):
    torch.manual_seed(0)
    x = M.example_input(4)
    sm = searched(model_cls(), x)
    final = finalize(sm)
    fine_tune(final, x)  # weights and clip bounds move away from the search model's
    torch.save(sm.state_dict(), tmp_path / "search.pt")
    torch.save(final.state_dict(), tmp_path / "final.pt")

    torch.manual_seed(1)  # a fresh model with other initial weights
    sm2 = fxsearch.convert(model_cls(), (x,))
    sm2.load_state_dict(torch.load(tmp_path / "search.pt", weights_only=True))
    sm2.eval()
    final2 = finalize(sm2)
    final2.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    final2.eval()
    with torch.no_grad():
        assert torch.equal(sm(x), sm2(x))
        assert torch.equal(final(x), final2(x))
    sm.train(), sm2.train()  # softmax sampling is deterministic: train mode agrees too
    with torch.no_grad():
        assert torch.equal(sm(x), sm2(x))
    assert onnx_bytes(final, x) == onnx_bytes(final2, x)


def test_checkpoint_exports_the_same_onnx_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    x = M.example_input(2)
    sm = searched(M.Residual(), x)
    fxsearch.save(sm, tmp_path / "c.pt", model_ref="models:Residual")
    torch.save(x, tmp_path / "x.pt")
    here = {}
    for fmt in ("qdq", "packed"):
        fxsearch.export_onnx(finalize(fxsearch.load(tmp_path / "c.pt")), tmp_path / f"here.{fmt}.onnx", (x,), format=fmt)
        here[fmt] = (tmp_path / f"here.{fmt}.onnx").read_bytes()
    assert here["qdq"] == onnx_bytes(finalize(sm), x)  # what was saved is what was searched
    script = textwrap.dedent(f"""
        import warnings, torch, fxsearch
        warnings.simplefilter("ignore")
        final = fxsearch.finalize(fxsearch.load({str(tmp_path / 'c.pt')!r}))
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        for fmt in ("qdq", "packed"):
            fxsearch.export_onnx(final, {str(tmp_path)!r} + f"/there.{{fmt}}.onnx", (x,), format=fmt)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env=env)
    for fmt in ("qdq", "packed"):
        assert (tmp_path / f"there.{fmt}.onnx").read_bytes() == here[fmt], fmt


# ---- CUDA ------------------------------------------------------------------------------------
def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in module.state_dict().values()}


@cuda
@pytest.mark.parametrize("model_cls", [M.Residual, M.SEGate, M.Concat, M.GroupedConv], ids=lambda c: c.__name__)
def test_cuda_search_finalize_export(model_cls, tmp_path):
    torch.manual_seed(0)
    x = M.example_input(4)
    model = model_cls()
    cpu_sm = fxsearch.convert(copy.deepcopy(model), (x,))
    sm = fxsearch.convert(model.cuda(), (x.cuda(),))
    assert _devices(sm) == {"cuda"}
    sm.load_state_dict(cpu_sm.state_dict())  # the same starting point on both devices
    for s, inp in ((cpu_sm, x), (sm, x.cuda())):
        s.train()
        opt = torch.optim.SGD(s.parameters(), lr=1e-2)  # steps proportional to the gradients (Adam's are not)
        for _ in range(2):
            loss = s(inp).square().mean() + 1e-6 * s.cost
            opt.zero_grad()
            loss.backward()
            opt.step()
        s.eval()
    for k, v in sm.state_dict().items():
        torch.testing.assert_close(v.cpu(), cpu_sm.state_dict()[k], rtol=1e-3, atol=1e-3, msg=k)
    assert sm.discrete_cost() >= 0 and sm.cost.device.type == "cuda"
    final = finalize(sm)
    assert _devices(final) == {"cuda"}
    with torch.no_grad():
        want, got = sm(x.cuda()), final(x.cuda())
    assert got.device.type == "cuda"
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # other kernels: a tie may flip
    fine_tune(final, x.cuda())
    for fmt in ("qdq", "packed"):
        path = tmp_path / f"{fmt}.onnx"
        fxsearch.export_onnx(final, path, (x.cuda(),), format=fmt)
        report = verify_onnx(final, path, (x.cuda(),))
        assert report.weights_exact and report.worst_lsb <= 1.0 + 1e-3, report.summary()


@cuda
def test_cuda_checkpoint_loads_on_the_device_and_exports_the_cpu_bytes(tmp_path):
    torch.manual_seed(0)
    x = M.example_input(2)
    sm = searched(M.Residual(), x)
    fxsearch.save(sm, tmp_path / "c.pt", model_ref="models:Residual")
    on_gpu = fxsearch.load(tmp_path / "c.pt", map_location="cuda")
    assert _devices(on_gpu) == {"cuda"}
    with torch.no_grad():  # a rounding tie may fall the other way on the GPU: a loose bound
        want = sm(x)
        assert (on_gpu(x.cuda()).cpu() - want).abs().max() <= 1e-2 * want.abs().max()
    final = finalize(on_gpu)
    assert _devices(final) == {"cuda"}
    cpu_final = finalize(sm)
    for name, (layer, _) in fxsearch.exporters.onnx_qdq.quant_layers(final).items():
        assert torch.equal(layer.weight_int().cpu(), cpu_final.get_submodule(name).weight_int()), name


@cuda
def test_cuda_input_for_a_cpu_model_names_both_devices():
    with pytest.raises(fxsearch.TraceError, match=r"example_inputs\[0\] is on cuda:0 but the model's parameters are on cpu"):
        fxsearch.convert(M.PlainChain(), (M.example_input().cuda(),))
    model = M.PlainChain()
    model.fc.cuda()
    with pytest.raises(fxsearch.UnsupportedModelError, match="Linear 'fc' on cuda:0"):
        fxsearch.convert(model, (M.example_input(),))
