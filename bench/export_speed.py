"""Export speed: convert + finalize + export (qdq) versus torch.onnx.export of the float model.

Per model, one repetition runs, and times separately:
  plain export   torch.onnx.export(model, (x,), path) with nothing else set: what a user who
                 exports the float model types (torch >= 2.9: the dynamo-based exporter);
  float export   torch.onnx.export of the float model with the settings fxsearch's exporter
                 uses (TorchScript exporter, opset 20, no constant folding), to a file: the
                 stricter baseline, several times faster than the plain one;
  convert        fxsearch.convert (trace, channel analysis, search nodes, cost description);
  finalize       fxsearch.finalize (argmax precisions; at the initial alphas nothing is pruned);
  export         fxsearch.export_onnx(format="qdq") to a file (float twin, torch.onnx, rewrite,
                 onnx.checker).
Repetitions alternate the exports with the pipeline, so all see the same machine load; the
ratios are medians over repetitions of pipeline / plain export and pipeline / float export.
Target (issue 7): <= 2 x a plain torch.onnx.export. --no-plain skips the plain export.

    python bench/export_speed.py [--models resnet50,efficientnet_b0] [--size 224] [--reps 3] [--threads 2] [--no-plain]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
import warnings

import torch
import torchvision

import fxsearch

OPSET = 20


def float_export(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=OPSET,
                          do_constant_folding=False, input_names=["input_0"])


def plain_export(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path)


def pipeline(model: torch.nn.Module, x: torch.Tensor, path: str) -> dict[str, float]:
    times = {}
    start = time.perf_counter()
    sm = fxsearch.convert(model, (x,))
    times["convert"] = time.perf_counter() - start
    start = time.perf_counter()
    final = fxsearch.finalize(sm)
    times["finalize"] = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxsearch.export_onnx(final, path, (x,), format="qdq", opset=OPSET)
    times["export"] = time.perf_counter() - start
    return times


def measure(name: str, size: int, reps: int, plain: bool) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, size, size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            row = {}
            if plain:
                start = time.perf_counter()
                plain_export(model, x, os.path.join(tmp, "plain.onnx"))
                row["plain"] = time.perf_counter() - start
            start = time.perf_counter()
            float_export(model, x, os.path.join(tmp, "float.onnx"))
            row["float"] = time.perf_counter() - start
            row.update(pipeline(model, x, os.path.join(tmp, "qdq.onnx")))
            row["pipeline"] = row["convert"] + row["finalize"] + row["export"]
            rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["ratio"] = statistics.median(r["pipeline"] / r["float"] for r in rows)
    med["plain_ratio"] = statistics.median(r["pipeline"] / r["plain"] for r in rows) if plain else float("nan")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,efficientnet_b0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain torch.onnx.export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"input 1x3x{args.size}x{args.size} threads={torch.get_num_threads()} reps={args.reps} "
          f"opset={OPSET} torch={torch.__version__}")
    print(f"{'model':<16} {'plain s':>8} {'float s':>8} {'convert s':>10} {'finalize s':>11} {'export s':>9} "
          f"{'total s':>8} {'/plain':>7} {'/float':>7}")
    for name in args.models.split(","):
        r = measure(name, args.size, args.reps, args.plain)
        print(f"{name:<16} {r.get('plain', float('nan')):>8.2f} {r['float']:>8.2f} {r['convert']:>10.2f} "
              f"{r['finalize']:>11.2f} {r['export']:>9.2f} {r['pipeline']:>8.2f} {r['plain_ratio']:>7.2f} "
              f"{r['ratio']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
