"""Search-step overhead: one training step of the search model versus the float model.

Prints, per model, the median step time of both (forward, backward, optimiser step, batch
32) measured alternately in one run, their ratio, and the ratio of peak memory (CUDA) or
of autograd-saved tensor bytes (CPU). Targets (issue 7): time ratio <= 1.3, memory <= 1.5.

    python bench/step_overhead.py [--device cuda] [--threads 2] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import fxsearch
from fxsearch.zoo import dscnn, resnet8

CASES = {
    "resnet8": (lambda: resnet8(), (3, 32, 32), 10),
    "dscnn": (lambda: dscnn(), (1, 49, 10), 12),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64), 10),
}


def _saved_bytes(model, x, y) -> int:
    """Bytes of tensors autograd keeps for backward during one forward (a device-free memory proxy)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return total


def _stepper(model, params):
    opt = torch.optim.Adam(params, lr=1e-3)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if isinstance(model, fxsearch.SearchModel):
            loss = loss + 1e-9 * model.cost
        loss.backward()
        opt.step()
    return step


def measure(name: str, device: str, steps: int) -> dict:
    factory, shape, classes = CASES[name]
    torch.manual_seed(0)
    float_model = factory().to(device).train()
    x = torch.randn(32, *shape, device=device)
    y = torch.randint(0, classes, (32,), device=device)
    search = fxsearch.convert(factory(), (x[:8].cpu(),)).to(device).train()
    runs = {"float": _stepper(float_model, float_model.parameters()),
            "search": _stepper(search, search.parameters())}
    times = {k: [] for k in runs}
    for k in runs:  # warm-up
        runs[k](x, y)
    for _ in range(steps):
        for k, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            run(x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    if device == "cuda":
        mem = {}
        for k, model in (("float", float_model), ("search", search)):
            torch.cuda.reset_peak_memory_stats()
            runs[k](x, y)
            mem[k] = torch.cuda.max_memory_allocated()
    else:
        mem = {k: _saved_bytes(m, x, y) for k, m in (("float", float_model), ("search", search))}
    return {"model": name, "float_ms": 1e3 * med["float"], "search_ms": 1e3 * med["search"],
            "time_ratio": med["search"] / med["float"], "mem_ratio": mem["search"] / mem["float"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", default=",".join(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={args.threads} batch=32")
    print(f"{'model':<10} {'float ms':>9} {'search ms':>10} {'time x':>7} {'mem x':>6}")
    for name in args.models.split(","):
        r = measure(name, args.device, args.steps)
        print(f"{r['model']:<10} {r['float_ms']:>9.1f} {r['search_ms']:>10.1f} {r['time_ratio']:>7.2f} {r['mem_ratio']:>6.2f}")


if __name__ == "__main__":
    main()
