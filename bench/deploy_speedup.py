"""Deployment speed-up of pruning: onnxruntime latency of finalized, pruned QDQ exports versus
the unpruned uniform 8-bit export of the same model, next to the MAC ratio.

Per model and pruning level f, a fraction f of the prunable channel units of every group is
set to 0 bits (evenly spread, the same units in every run), the rest of the weights and all
activations to 8 bits; fxsearch.finalize removes the pruned channels and the model is
exported in the qdq format (8-bit activations, so onnxruntime fuses QLinearConv / QGemm).
Latency is the median of runs on one batch (exported at that batch size) at ORT_ENABLE_ALL, the sessions of one model
alternating so that all see the same machine load; speed-up = latency(unpruned) / latency(pruned),
MAC ratio = MACs(unpruned) / MACs(pruned) counted from the finalized modules (count_cost).
Target (issue 7): speed-up >= 0.8 x MAC ratio.
Each model is exported twice, converted with float residual adds (the method as published) and
with integer_adds=True (8-bit add operands, so the convolutions feeding the adds fuse to
QLinearConv too); `int/float` = latency(float adds) / latency(integer adds) at the same level.

With --profile, onnxruntime's profiler then splits each file's node time into convolutions
(QLinearConv, Conv, FusedConv; nearly all of the MACs) and everything else, per level and with
the speed-up of each part: whether the convolution kernels themselves track the MAC ratio.

    python bench/deploy_speedup.py [--models resnet8,resnet18] [--levels 0,0.25,0.5,0.75] [--threads 1,2] [--batch 1] [--size 64] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import fxsearch
from fxsearch.cost_models import count_cost
from fxsearch.exporters.verify import optimized_ops
from fxsearch.search_modules import ActSearch, GroupChoice
from fxsearch.zoo import resnet8

CASES = {
    "resnet8": (lambda: resnet8(), (3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
}


def set_choices(sm: fxsearch.SearchModel, fraction: float) -> None:
    """Argmax choices: `fraction` of each group's prunable units at 0 bits, everything else at 8."""
    with torch.no_grad():
        for m in sm.modules():
            if isinstance(m, (GroupChoice, ActSearch)) and 8 in m.precisions:
                m.alpha.fill_(-10.0)
                m.alpha[m.precisions.index(8)] = 10.0
            if isinstance(m, GroupChoice) and 0 in m.precisions:
                prunable = torch.nonzero(m.allowed[m.precisions.index(0)]).flatten()
                k = int(round(fraction * len(prunable)))
                chosen = prunable[torch.linspace(0, len(prunable) - 1, k).round().long()] if k else prunable[:0]
                m.alpha[m.precisions.index(0), chosen] = 20.0


def export(factory, shape, fraction: float, path: str, integer_adds: bool = False) -> int:
    """Finalize at pruning level `fraction`, write the qdq ONNX file, return the MACs."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    sm = fxsearch.convert(factory(), (x,), integer_adds=integer_adds)
    set_choices(sm, fraction)
    sm.train()
    with torch.no_grad():  # BatchNorm statistics of real activations, as after a search
        for _ in range(3):
            sm(torch.randn(16, *shape[1:]))
    sm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = fxsearch.finalize(sm)
        fxsearch.export_onnx(final, path, (x,), format="qdq")
    return int(count_cost(final, (x,), "macs"))


def session(path: str, threads: int, profile: str | None = None) -> ort.InferenceSession:
    """ORT_ENABLE_ALL on the CPU; `profile`: onnxruntime's profiler on, its files named so."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def fused_ops(path: str) -> str:
    """The quantized ops onnxruntime runs after its graph optimisations (a check that it fused)."""
    ops = optimized_ops(path)
    return ", ".join(f"{op} x{ops.count(op)}" for op in ("QLinearConv", "QGemm", "FusedConv", "Conv", "Gemm")
                     if op in ops)


CONVOLUTIONS = ("QLinearConv", "Conv", "FusedConv")


def node_times(path: str, x: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    """Seconds per run in onnxruntime's profile: convolutions, the rest, and the slowest node."""
    s = session(path, threads, profile=os.path.join(os.path.dirname(path), "profile"))
    for _ in range(runs):
        s.run(None, {"input_0": x})
    trace = s.end_profiling()
    with open(trace) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    os.remove(trace)
    times = {"conv": 0.0, "rest": 0.0}
    by_node: dict[str, float] = {}
    for e in events:
        times["conv" if e["args"]["op_name"] in CONVOLUTIONS else "rest"] += e["dur"] * 1e-6 / runs
        by_node[e["name"]] = by_node.get(e["name"], 0.0) + e["dur"] * 1e-6 / runs
    slowest = max(by_node, key=by_node.get)
    times["slowest"], times["slowest_name"] = by_node[slowest], slowest.removesuffix("_kernel_time")
    return times


def print_profile(name: str, paths: dict, macs: dict, levels: list, x: np.ndarray, threads: int, runs: int) -> None:
    print(f"# onnxruntime profile, {name}, {threads} thread(s): node time in convolutions and the rest")
    print(f"{'model':<9} {'adds':>5} {'pruned':>6} {'conv ms':>8} {'speed-up':>8} {'rest ms':>8} {'speed-up':>8} "
          f"{'MAC ratio':>9}  slowest node")
    for adds in sorted({a for a, _ in paths}):
        base = node_times(paths[adds, 0.0], x, threads, runs)
        for f in levels:
            t = base if f == 0.0 else node_times(paths[adds, f], x, threads, runs)
            print(f"{name:<9} {adds:>5} {f:>6.0%} {1e3 * t['conv']:>8.3f} {base['conv'] / t['conv']:>8.2f} "
                  f"{1e3 * t['rest']:>8.3f} {base['rest'] / t['rest']:>8.2f} {macs[0.0] / macs[f]:>9.2f}  "
                  f"{t['slowest_name']} {1e3 * t['slowest']:.3f} ms", flush=True)


def latencies(sessions: dict, x: np.ndarray, runs: int) -> dict:
    times = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        for _ in range(5):
            s.run(None, {"input_0": x})
    for _ in range(runs):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"input_0": x})
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--levels", default="0,0.25,0.5,0.75", help="fractions of prunable units at 0 bits")
    parser.add_argument("--threads", default="1,2", help="onnxruntime intra-op thread counts")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="input side for resnet18 (default 64)")
    parser.add_argument("--profile", action="store_true",
                        help="also split onnxruntime's node time into convolutions and the rest (first thread count)")
    args = parser.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    print(f"onnxruntime {ort.__version__}, qdq format (w8a8), batch {args.batch}, ORT_ENABLE_ALL, median of {args.runs} runs")
    print(f"{'model':<9} {'adds':>5} {'pruned':>6} {'threads':>7} {'MACs':>11} {'latency ms':>10} {'MAC ratio':>9} "
          f"{'speed-up':>8} {'speed-up/MAC':>12} {'int/float':>9}")
    variants = {"float": False, "int8": True}
    for name in args.models.split(","):
        factory, sample = CASES[name]
        if args.size and name == "resnet18":
            sample = (3, args.size, args.size)
        shape = (args.batch, *sample)
        with tempfile.TemporaryDirectory() as tmp:
            paths, macs = {}, {}
            for adds, integer in variants.items():
                for f in [0.0] + [v for v in levels if v != 0.0]:
                    paths[adds, f] = os.path.join(tmp, f"{name}_{adds}_{f}.onnx")
                    macs[f] = export(factory, shape, f, paths[adds, f], integer)
                print(f"# {name}, {adds} adds: onnxruntime runs {fused_ops(paths[adds, 0.0])} (unpruned)")
            x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
            for threads in (int(t) for t in args.threads.split(",")):
                lat = latencies({k: session(p, threads) for k, p in paths.items()}, x, args.runs)
                for adds in variants:
                    for f in levels:
                        mac_ratio, speedup = macs[0.0] / macs[f], lat[adds, 0.0] / lat[adds, f]
                        print(f"{name:<9} {adds:>5} {f:>6.0%} {threads:>7} {macs[f]:>11,} {1e3 * lat[adds, f]:>10.3f} "
                              f"{mac_ratio:>9.2f} {speedup:>8.2f} {speedup / mac_ratio:>12.2f} "
                              f"{lat['float', f] / lat['int8', f]:>9.2f}", flush=True)
            if args.profile:
                print_profile(name, paths, macs, levels, x, int(args.threads.split(",")[0]), args.runs)


if __name__ == "__main__":
    main()
