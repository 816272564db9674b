"""`python -m fxsearch.export`: usage, exit codes, one-line typed errors, end-to-end export."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import fxsearch
from fxsearch.export import main
from fxsearch.search_modules import GroupChoice
from fxsearch.zoo import resnet8


def _has_exporter() -> bool:
    if importlib.util.find_spec("fxsearch.exporters") is None:
        return False
    try:
        from fxsearch.exporters import export_onnx, verify_onnx  # noqa: F401
    except ImportError:
        return False
    return True


needs_exporter = pytest.mark.skipif(not _has_exporter(), reason="fxsearch.exporters.export_onnx is not available yet")


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxsearch.export", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_help_exits_0():
    r = cli("--help")
    assert r.returncode == 0
    assert "--checkpoint" in r.stdout and "--model" in r.stdout and "--bits" in r.stdout


def test_bad_usage_exits_2_in_a_subprocess():
    r = cli("-o", "x.onnx")
    assert r.returncode == 2
    assert "one of the arguments --checkpoint --model is required" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_checkpoint_exits_1_with_one_line(tmp_path):
    r = cli("--checkpoint", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: CheckpointError: ") and "missing.pt" in lines[0]
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --checkpoint --model is required"),
    (["--checkpoint", "a.pt", "--model", "resnet8"], "not allowed with"),
    (["--model", "resnet8", "--bits", "w3a8"], "wNaM with N and M in 2, 4, 8"),
    (["--model", "resnet8", "--bits", "8bit"], "wNaM"),
    (["--model", "resnet8", "--input-shape", "1,3,x"], "is not a shape"),
    (["--model", "resnet8", "--input-shape", "1,0,3"], "is not a shape"),
    (["--model", "resnet8", "--model-kwargs", "{bad"], "not valid JSON"),
    (["--model", "resnet8", "--model-kwargs", "[1]"], "must be a JSON object"),
    (["--model", "resnet8", "--opset", "-3"], "opset"),
    (["--model", "resnet8", "--format", "tflite"], "invalid choice"),
    (["--checkpoint", "a.pt", "--bits", "w8a8"], "go with --model"),
    (["--checkpoint", "a.pt", "--weights", "w.pt"], "go with --model"),
    (["--model", "resnet8"], "no default input shape is known for 'resnet8'"),
])
def test_bad_usage_exits_2(args, message, capsys, tmp_path):
    assert main([*args, "-o", str(tmp_path / "x.onnx")]) == 2
    assert message in capsys.readouterr().err


def test_output_is_required(capsys):
    assert main(["--model", "resnet8"]) == 2
    assert "-o/--output" in capsys.readouterr().err


@pytest.mark.parametrize("args, error", [
    (["--model", "no_such_model"], "error: ConfigError: unknown built-in model (fxsearch.zoo) 'no_such_model'"),
    (["--model", "torchvision:resnet1"], "error: ConfigError: unknown torchvision model 'resnet1'"),
    (["--model", "resnet8", "--input-shape", "1,3,32,32", "--model-kwargs", '{"width": 2}'],
     "error: ConfigError: model 'resnet8' does not accept kwargs"),
])
def test_failures_exit_1_with_one_typed_line(args, error, capsys, tmp_path):
    assert main([*args, "-q", "-o", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(error), err


def test_bad_files_exit_1(capsys, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    state = tmp_path / "sd.pt"
    torch.save(resnet8(num_classes=5).state_dict(), state)
    cases = [
        (["--checkpoint", str(garbage)], "error: CheckpointError: checkpoint"),
        (["--checkpoint", str(state)], "error: CheckpointError: "),
        (["--model", "resnet8", "--input-shape", "1,3,32,32", "--weights", str(state)],
         "error: CheckpointError: weights file"),
        (["--model", "resnet8", "--input-shape", "1,3,32,32", "--weights", str(garbage)],
         "error: CheckpointError: weights file"),
    ]
    for args, error in cases:
        assert main([*args, "-o", str(tmp_path / "x.onnx")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(error), (args, err)
    assert not (tmp_path / "x.onnx").exists()


@needs_exporter
def test_end_to_end_torchvision_resnet18(tmp_path):
    r = cli("--model", "torchvision:resnet18", "--bits", "w8a8", "--input-shape", "1,3,64,64", "--check",
            "-o", "r.onnx", "--report", "r.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.onnx").stat().st_size > 0
    assert "Traceback" not in r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["source"]["bits"] == "w8a8" and report["check"]["ok"]
    import onnx
    assert report["opset"] == onnx.load(tmp_path / "r.onnx").opset_import[0].version  # the one chosen
    assert all(set(layer["w_bits"]) == {8} and layer["a_bits"] in (8, None) for layer in report["layers"])
    assert report["totals"]["channels_kept"] == report["totals"]["channels_original"]


@needs_exporter
def test_end_to_end_from_a_pruned_checkpoint(tmp_path, capsys):
    sm = fxsearch.convert(resnet8(), (torch.randn(2, 3, 32, 32),))
    with torch.no_grad():
        for m in sm.modules():
            if isinstance(m, GroupChoice):
                m.alpha[0, ::2] = 5.0  # prune every other prunable unit
                m.alpha[1, 1::4] = 6.0  # and put some channels at 2 bits
    sm.eval()
    fxsearch.save(sm, tmp_path / "s.pt", model_ref="resnet8")
    code = main(["--checkpoint", str(tmp_path / "s.pt"), "-o", str(tmp_path / "s.onnx"),
                 "--report", str(tmp_path / "s.json"), "--check"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["source"]["model"] == "resnet8"
    assert report["input_shapes"] == [[2, 3, 32, 32]]
    totals = report["totals"]
    assert totals["channels_kept"] < totals["channels_original"]
    final = fxsearch.finalize(sm)
    layers = {r["layer"]: r for r in report["layers"]}
    for name, module in final.named_modules():
        if hasattr(module, "w_bits"):
            assert layers[name]["w_bits"] == module.w_bits.tolist()
            assert layers[name]["channels_kept"] == module.weight.shape[0]
    assert 2 in {b for r in report["layers"] for b in r["w_bits"]}
    if "costs" in report:
        from fxsearch.cost_models import count_cost
        assert report["costs"]["size"] == pytest.approx(count_cost(final, (torch.randn(2, 3, 32, 32),), "size"))
