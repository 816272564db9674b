"""Search-step overhead: one training step of the search model versus the float model.

A step is forward, loss, backward and optimiser step at batch 32 (--batch): the float model with Adam;
the search model as in the reference protocol (Adam on the weights, SGD with momentum on the
choice parameters, loss = task + lambda * SearchModel.cost, the cost evaluated every step).
Steps of the two alternate, so both see the same machine load; the time ratio is the median
of the per-pair ratios. Peak memory of one step counts everything live (parameters,
optimiser state, activations, temporaries): CUDA's allocator peak, or on CPU the profiler's
allocation trace (``profile_memory``) plus what was live when the step began.
Two search models are timed: "eager" (the default quantizers) and "fused"
(SearchModel.fuse_quantizers(): the quantizers compiled by torch.compile; its first steps,
which compile, are part of the warm-up and not timed).
Targets (issue 7): time ratio <= 1.3, peak memory ratio <= 1.5.

With --breakdown, more pairs of steps are run with a clock between the phases (forward, cost,
backward, optimiser) and their medians printed: where the search step's extra time goes.

    python bench/step_overhead.py [--device cuda] [--threads 2] [--pairs 20] [--models resnet8,dscnn] [--breakdown] [--integer-adds] [--batch 32] [--default-malloc]

Like `python -m fxsearch.search`, the benchmark first calls fxsearch.malloc.keep_freed_memory()
(freed tensors stay mapped: no page faults when the next step allocates them again), which
applies to both sides; --default-malloc leaves glibc's defaults.

At --batch 1 the tensors are small and the ratio shows the search step's fixed cost per step
(small ops on the choices, masks, weights and the cost).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

import torch
import torchvision

import fxsearch
from fxsearch.malloc import keep_freed_memory
from fxsearch.zoo import dscnn, resnet8

BATCH = 32
PHASES = ("forward", "cost", "backward", "optimiser")
CASES = {
    "resnet8": (lambda: resnet8(), (3, 32, 32), 10),
    "dscnn": (lambda: dscnn(), (1, 49, 10), 12),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64), 10),
}


class Trainer:
    """One model, its optimisers and one training step."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.search = isinstance(model, fxsearch.SearchModel)
        if self.search:
            self.opts = [torch.optim.Adam(model.weight_parameters(), lr=1e-3),
                         torch.optim.SGD(model.arch_parameters(), lr=1e-2, momentum=0.9)]
        else:
            self.opts = [torch.optim.Adam(model.parameters(), lr=1e-3)]

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def step(self, x: torch.Tensor, y: torch.Tensor, phases: dict[str, list[float]] | None = None) -> None:
        """One step; with `phases`, appends the seconds of forward, cost, backward and optimiser."""
        marks = [time.perf_counter()]

        def mark() -> None:
            if phases is not None:
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())

        self.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        mark()
        if self.search:
            loss = loss + 1e-9 * self.model.cost
        mark()
        loss.backward()
        mark()
        for opt in self.opts:
            opt.step()
        mark()
        if phases is not None:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                phases.setdefault(name, []).append(b - a)

    def live_bytes(self) -> int:
        """Parameters, buffers and optimiser state (what is live between steps, gradients freed)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [t for opt in self.opts for state in opt.state.values()
                    for t in state.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side prints two lines per profile
    (profiler_start / profiler_stop) that no setting turns off."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes allocated during one step, everything live included."""
    trainer.zero_grad()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.step(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # "Total Allocated" is a running total that carries over from earlier profiles in the process
    # (what earlier steps left allocated, such as gradients): growth is measured from its value
    # before this step's first event
    allocs = sorted((e for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})),
                    key=lambda e: e["ts"])
    grown = 0
    if allocs:
        start = allocs[0]["args"]["Total Allocated"] - allocs[0]["args"]["Bytes"]
        grown = max(e["args"]["Total Allocated"] for e in allocs) - start
    return trainer.live_bytes() + x.numel() * x.element_size() + y.numel() * y.element_size() + grown


def measure(name: str, device: str, pairs: int, breakdown: bool = False, batch: int = BATCH, **options) -> dict:
    factory, shape, classes = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    trainers = {"float": Trainer(factory().to(device).train()),
                "eager": Trainer(fxsearch.convert(factory(), (x[:8].cpu(),), **options).to(device).train()),
                "fused": Trainer(fxsearch.convert(factory(), (x[:8].cpu(),), **options).fuse_quantizers()
                                 .to(device).train())}
    for t in trainers.values():  # warm-up (optimiser state, allocator, lazy init)
        t.step(x, y)
        t.step(x, y)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    phases: dict[str, dict[str, list[float]]] = {k: {} for k in trainers}
    for _ in range(pairs):
        for k, t in trainers.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            t.step(x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - start)
    if breakdown:  # separate pairs: the phase marks synchronise, which the timed steps above avoid
        for _ in range(pairs):
            for k, t in trainers.items():
                t.step(x, y, phases[k])
    mem = {k: peak_step_bytes(t, x, y) for k, t in trainers.items()}
    row = {"model": name, "float_ms": 1e3 * statistics.median(times["float"]), "float_mib": mem["float"] / 2 ** 20}
    for k in ("eager", "fused"):
        row[f"{k}_ms"] = 1e3 * statistics.median(times[k])
        row[f"{k}_x"] = statistics.median(s / f for f, s in zip(times["float"], times[k]))
        row[f"{k}_mib"] = mem[k] / 2 ** 20
        row[f"{k}_mem_x"] = mem[k] / mem["float"]
    row["phases_ms"] = {k: {p: 1e3 * statistics.median(v) for p, v in ph.items()} for k, ph in phases.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--pairs", type=int, default=20, help="alternating float/search step pairs")
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--integer-adds", action="store_true", help="convert with integer_adds=True")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size (1: the fixed cost per step)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print the median ms of each phase (forward, cost, backward, optimiser)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc thresholds as they are (see fxsearch.malloc)")
    args = parser.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()
    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
          f"pairs={args.pairs} torch={torch.__version__} keep_freed_memory={kept}")
    print(f"{'model':<10} {'float ms':>9} {'eager ms':>9} {'x':>5} {'fused ms':>9} {'x':>5} "
          f"{'float MiB':>10} {'eager MiB':>10} {'x':>5} {'fused MiB':>10} {'x':>5}")
    for name in args.models.split(","):
        r = measure(name, args.device, args.pairs, args.breakdown, args.batch, integer_adds=args.integer_adds)
        print(f"{r['model']:<10} {r['float_ms']:>9.1f} {r['eager_ms']:>9.1f} {r['eager_x']:>5.2f} "
              f"{r['fused_ms']:>9.1f} {r['fused_x']:>5.2f} {r['float_mib']:>10.1f} {r['eager_mib']:>10.1f} "
              f"{r['eager_mem_x']:>5.2f} {r['fused_mib']:>10.1f} {r['fused_mem_x']:>5.2f}", flush=True)
        for k, ph in r["phases_ms"].items():
            if ph:
                print(f"  {k:<6} " + "  ".join(f"{p} {ms:.2f} ms" for p, ms in ph.items()), flush=True)


if __name__ == "__main__":
    main()
