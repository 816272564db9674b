"""Checkpoints: round trip (same and new process), typed errors for bad files, atomic writes,
model references."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fxsearch
from fxsearch import CheckpointError, ConfigError
from fxsearch import meta
from fxsearch.checkpoint import FORMAT, VERSION
from fxsearch.model_refs import default_input_shape, resolve_model_ref
from fxsearch.search_modules import GroupChoice
from fxsearch.zoo import resnet8

X = (2, 3, 32, 32)


def searched_resnet8(**options) -> fxsearch.SearchModel:
    """A ResNet-8 search model after a few training steps, some channels argmax-pruned."""
    sm = fxsearch.convert(resnet8(), (torch.randn(X),), **options)
    sm.train()
    params = sm.weight_parameters() + sm.arch_parameters()
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(X)
    for _ in range(2):
        loss = sm(x).square().mean() + 1e-7 * sm.cost
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for m in sm.modules():
            if isinstance(m, GroupChoice) and 0 in m.precisions:
                m.alpha[0, ::3] = 5.0  # frozen units stay unpruned through `allowed`
    sm.temperature = 0.5
    return sm.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    sm = searched_resnet8(cost={"size": "size", "mpic": "mpic"})
    path = tmp_path_factory.mktemp("ck") / "search.pt"
    fxsearch.save(sm, path, model_ref="resnet8", extra={"epoch": 3, "lam": 1e-6, "t": torch.arange(3)})
    return sm, path


def test_round_trip_same_process(saved):
    sm, path = saved
    loaded = fxsearch.load(path)
    x = torch.randn(X)
    with torch.no_grad():
        assert torch.equal(sm(x), loaded(x))
    assert loaded.training is False and loaded.temperature == pytest.approx(0.5)
    assert loaded.sampling == sm.sampling and loaded.config.w_precisions == sm.config.w_precisions
    assert set(loaded.costs) == {"size", "mpic"}
    assert loaded.discrete_cost("mpic") == sm.discrete_cost("mpic")
    info = loaded.meta[meta.CHECKPOINT]
    assert info["model_ref"] == "resnet8" and info["inputs"] == [{"shape": list(X), "dtype": "float32"}]
    assert info["extra"]["epoch"] == 3 and torch.equal(info["extra"]["t"], torch.arange(3))
    # the finalized models agree too: same pruned channels, same integers
    fa, fb = fxsearch.finalize(sm), fxsearch.finalize(loaded)
    with torch.no_grad():
        assert torch.equal(fa(x), fb(x))
    assert sum(p.numel() for p in fa.parameters()) < sum(p.numel() for p in resnet8().parameters())


def test_round_trip_new_process(saved, tmp_path):
    sm, path = saved
    x = torch.randn(X)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch, fxsearch
        sm = fxsearch.load({str(path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(sm(x), {str(tmp_path / 'y.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), sm(x))


def test_train_mode_and_options_round_trip(tmp_path):
    sm = fxsearch.convert(resnet8(), (torch.randn(X),), sampling="hard", exclude=["stack1.conv1"],
                          w_precisions=(0, 4, 8), a_precisions=(4, 8), input_bits=None)
    sm.train()
    fxsearch.save(sm, tmp_path / "c.pt", model_ref="resnet8")
    loaded = fxsearch.load(tmp_path / "c.pt")
    assert loaded.training and loaded.sampling == "hard"
    assert loaded.config.exclude == ("stack1.conv1",) and loaded.config.input_bits is None
    assert "stack1.conv1" not in loaded.analysis.layers


def test_module_factory_reference_and_leaf_type(tmp_path):
    from models import Residual  # tests/ is on sys.path under pytest
    x = torch.randn(2, 3, 8, 8)
    sm = fxsearch.convert(Residual(), (x,), leaf_modules=[nn.Hardswish])
    fxsearch.save(sm, tmp_path / "m.pt", model_ref="models:Residual")
    loaded = fxsearch.load(tmp_path / "m.pt").eval()
    assert loaded.config.leaf_modules == (nn.Hardswish,)
    with torch.no_grad():
        assert torch.equal(sm.eval()(x), loaded(x))


def test_load_leaves_global_rng_alone(saved):
    _, path = saved
    torch.manual_seed(1)
    want = torch.rand(3)
    torch.manual_seed(1)
    fxsearch.load(path)
    assert torch.equal(torch.rand(3), want)


# ---- corrupt, truncated, foreign files ------------------------------------------------------
def _record(path):
    return torch.load(path, weights_only=True)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fxsearch.load(tmp_path / "nope.pt")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        fxsearch.load(tmp_path)


def test_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt|corrupt"):
            fxsearch.load(bad)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="corrupt"):
        fxsearch.load(bad)


def test_plain_state_dict_is_foreign(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(resnet8().state_dict(), path)
    with pytest.raises(CheckpointError, match="not an fxsearch checkpoint.*state_dict"):
        fxsearch.load(path)


def test_pickled_module_is_not_unpickled(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(resnet8(), path)
    with pytest.raises(CheckpointError, match="not loaded for safety"):
        fxsearch.load(path)


def test_version_mismatch(saved, tmp_path):
    _, path = saved
    record = _record(path)
    record["version"] = VERSION + 1
    torch.save(record, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match=f"version {VERSION + 1}"):
        fxsearch.load(tmp_path / "v.pt")
    record["version"], record["format"] = VERSION, "something.else"
    torch.save(record, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match=FORMAT):
        fxsearch.load(tmp_path / "f.pt")


@pytest.mark.parametrize("change, match", [
    ("missing", "key 'stack2.conv1.weight' of the rebuilt model is missing"),
    ("unexpected", "key 'bogus.weight' of the checkpoint is unexpected"),
    ("shape", "key 'fc.weight' has shape \\(3, 3\\)"),
])
def test_state_dict_mismatch_names_the_key(saved, tmp_path, change, match):
    _, path = saved
    record = _record(path)
    state = record["state_dict"]
    if change == "missing":
        del state["stack2.conv1.weight"]
    elif change == "unexpected":
        state["bogus.weight"] = torch.zeros(1)
    else:
        state["fc.weight"] = torch.zeros(3, 3)
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=match):
        fxsearch.load(tmp_path / "bad.pt")


def test_unknown_model_reference_in_file(saved, tmp_path):
    _, path = saved
    record = _record(path)
    record["model_ref"] = "no_such_zoo_model"
    torch.save(record, tmp_path / "ref.pt")
    with pytest.raises(CheckpointError, match="cannot rebuild.*no_such_zoo_model"):
        fxsearch.load(tmp_path / "ref.pt")


# ---- saving: validation and atomic writes -----------------------------------------------------
def test_wrong_reference_fails_at_save(saved, tmp_path):
    sm, _ = saved
    with pytest.raises(CheckpointError, match="does not rebuild this search model.*shape \\(4, 10\\) in this search model but \\(4, 3\\)"):
        fxsearch.save(sm, tmp_path / "w.pt", model_ref="resnet8", model_kwargs={"num_classes": 3})
    with pytest.raises(CheckpointError, match="unknown built-in model"):
        fxsearch.save(sm, tmp_path / "w.pt", model_ref="resnet9")
    assert not list(tmp_path.iterdir())


def test_non_serializable_config_is_rejected(tmp_path):
    class LocalLeaf(nn.Module):
        def forward(self, x):
            return x

    class WithLeaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.leaf = LocalLeaf()

        def forward(self, x):
            return self.conv(self.leaf(x))

    sm = fxsearch.convert(WithLeaf(), (torch.randn(1, 3, 8, 8),), leaf_modules=[LocalLeaf])
    with pytest.raises(CheckpointError, match="leaf_modules entry .*importable"):
        fxsearch.save(sm, tmp_path / "x.pt", model_ref="models:PlainChain")
    sm = fxsearch.convert(resnet8(), (torch.randn(X),), cost={"mine": lambda layer: layer.bits.sum()})
    with pytest.raises(CheckpointError, match="cost model 'mine'.*register_cost_model"):
        fxsearch.save(sm, tmp_path / "x.pt", model_ref="resnet8")
    with pytest.raises(CheckpointError, match="extra\\['opt'\\] holds a SGD"):
        fxsearch.save(sm, tmp_path / "x.pt", model_ref="resnet8",
                      extra={"opt": torch.optim.SGD(sm.parameters(), lr=1)})
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing_and_keeps_old_file(saved, tmp_path, monkeypatch):
    sm, _ = saved
    path = tmp_path / "c.pt"
    fxsearch.save(sm, path, model_ref="resnet8", verify=False)
    before = path.read_bytes()

    def disk_full(fd):  # the temporary file holds part of the bytes when the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*c.pt.*No space left"):
        fxsearch.save(sm, path, model_ref="resnet8", verify=False)
    with pytest.raises(CheckpointError):
        fxsearch.save(sm, tmp_path / "new.pt", model_ref="resnet8", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert path.read_bytes() == before


def test_unwritable_path(saved, tmp_path):
    sm, _ = saved
    missing_dir = tmp_path / "no" / "such" / "dir" / "c.pt"
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*no/such/dir/c.pt"):
        fxsearch.save(sm, missing_dir, model_ref="resnet8", verify=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*d'"):
        fxsearch.save(sm, tmp_path / "d", model_ref="resnet8", verify=False)
    assert os.listdir(tmp_path / "d") == [] and sorted(os.listdir(tmp_path)) == ["d"]


def test_saved_file_is_plain_data(saved):
    _, path = saved
    record = _record(path)  # weights_only=True: plain containers and tensors only
    assert record["format"] == FORMAT and record["version"] == VERSION
    assert record["config"]["exclude"] == [] and isinstance(record["model_kwargs"], dict)


# ---- model references -------------------------------------------------------------------------
@pytest.mark.parametrize("ref, kwargs, match", [
    ("", None, "non-empty string"),
    ("no_such_model", None, "unknown built-in model"),
    ("torchvision:resnet1", None, "unknown torchvision model 'resnet1'; did you mean resnet18"),
    ("no_such_pkg.mod:f", None, "cannot import module 'no_such_pkg.mod'"),
    ("fxsearch.zoo:nope", None, "has no attribute 'nope'"),
    ("fxsearch.zoo:", None, "not of the form"),
    ("fxsearch.zoo:F", None, "names a module, not a factory"),
    ("builtins:dict", None, "returned a dict, not a torch.nn.Module"),
    ("resnet8", {"width": 3}, "does not accept kwargs"),
    ("resnet8", [1], "must be a dict"),
    ("resnet8", {"n": object()}, "not plain JSON"),
])
def test_bad_model_references(ref, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_model_ref(ref, kwargs)


def test_model_references_build():
    assert resolve_model_ref("resnet8", {"num_classes": 4}).fc.out_features == 4
    assert resolve_model_ref("fxsearch.zoo:DSCNN", {"num_classes": 5}).fc.out_features == 5
    assert resolve_model_ref("torchvision:resnet18", {"num_classes": 7}).fc.out_features == 7
    assert default_input_shape("torchvision:resnet18") == (1, 3, 224, 224)
    assert default_input_shape("torchvision:fcn_resnet50") is None
