"""`python -m fxsearch.search`: a lambda sweep of the joint search, uniform baselines, a
Pareto front, in one resumable run directory.

  python -m fxsearch.search                                  # ResNet-8 on digits, defaults
  python -m fxsearch.search --model dscnn --lambdas 0.5,1,2 --out runs/ds
  python -m fxsearch.search --data cifar10:~/data --epochs 50 --warmup-epochs 30

Run directory (--out, default runs/<model>-<data>):
  settings.json                 the options that shape the results (a rerun must repeat them)
  warmup.pt, warmup.json        float warm-up weights and accuracy, shared by every run below
  joint/lambda_<L>/             one joint search per lambda
      report.json               accuracy, costs, per-layer channels kept and bits, timings, history
      search.pt                 the search model (fxsearch.save; fxsearch.load rebuilds it)
      final.pt                  state_dict of the fine-tuned finalized model
      model.onnx                the fine-tuned finalized model, QDQ ONNX
  uniform/w8a8/ (w4a8, w2a8)    the uniform baselines, same files, same epochs
  sequential/lambda_<L>/        with --sequential: prune-only search, then mixed precision
  pareto.csv, pareto.png        every finished run: accuracy versus cost

Rerunning the same command resumes: a run whose report.json exists is skipped. Every file is
written atomically. Exit status: 0 ok, 1 failure (one line: `error: <ErrorType>: ...`),
2 bad usage.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import time
from typing import Any, Sequence

import torch

from . import distributed
from .checks import make_run_dir
from . import cli
from .errors import ConfigError
from .files import torch_save_atomically as torch_save, write_atomically, write_json
from .malloc import keep_freed_memory

BASELINES = ("w8a8", "w4a8", "w2a8")
DEFAULT_LAMBDAS = "1,2,4,8"
ACT_INDEPENDENT = ("size", "size_bytes", "params", "macs")   # costs blind to activation bits
# options that shape the results: a run directory keeps them in settings.json
RESULT_OPTIONS = ("model", "model_kwargs", "data", "image_size", "cost", "w_precisions", "a_precisions",
                  "sampling", "epochs", "warmup_epochs", "finetune_epochs", "patience", "batch_size", "seed",
                  "lr", "arch_lr", "arch_optimizer", "finetune_lr", "schedule", "lambda_ramp_epochs", "normalize_cost", "freeze_bn", "keep", "limit_train",
                  "limit_eval", "integer_adds", "amp")


# ---- argument types --------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not v >= 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: write non-negative numbers separated by commas, e.g. 0.5,1,2")
    return sorted(set(values))


def _bits(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: write bit-widths separated by commas, e.g. 0,2,4,8")
    return values


def _a_bits(text: str) -> str | tuple[int, ...]:
    return "auto" if text.strip().lower() == "auto" else _bits(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _data_spec(text: str) -> str:
    name, sep, path = text.partition(":")
    if (name == "digits" and not sep) or (name in ("cifar10", "imagefolder") and sep and path):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use digits, cifar10:PATH or imagefolder:PATH")


def _baselines(text: str) -> list[str]:
    names = [] if text.strip().lower() == "none" else [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [n for n in names if not re.fullmatch(r"w[248]a[248]", n)]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r}: baselines are wNaM with N, M in 2, 4, 8 "
                                          "(e.g. w8a8,w4a8,w2a8) or 'none'")
    return names


def build_parser() -> argparse.ArgumentParser:
    from .cost_models import COST_MODELS
    p = argparse.ArgumentParser(
        prog="python -m fxsearch.search",
        description="Joint pruning + mixed-precision search: a lambda sweep with uniform baselines, "
                    "written to a resumable run directory (reports, checkpoints, ONNX, Pareto CSV and plot).",
        epilog="Models: a built-in name (resnet8, dscnn), a torchvision name (resnet18 or "
               "torchvision:resnet18) or package.module:factory. Exit status: 0 ok, 1 failure, 2 bad usage.")
    a = p.add_argument
    a("--model", default="resnet8", metavar="REF", help="the seed model (default resnet8)")
    a("--model-kwargs", type=cli.json_object, default=None, metavar="JSON",
      help="factory kwargs as a JSON object (num_classes is set from the data unless given)")
    a("--data", type=_data_spec, default="digits", metavar="SPEC",
      help="digits (bundled with scikit-learn, default), cifar10:PATH or imagefolder:PATH")
    a("--image-size", type=cli.positive, default=None, metavar="N", help="digits/imagefolder image side (default 16/32)")
    a("--cost", default="size", choices=sorted(COST_MODELS), help="the cost the search prices (default size)")
    a("--lambdas", type=_floats, default=_floats(DEFAULT_LAMBDAS), metavar="L1,L2",
      help=f"lambda values of the sweep; the cost is normalised by its initial value, so lambda=1 "
           f"weighs the initial cost like one nat of task loss (default {DEFAULT_LAMBDAS})")
    a("--w-precisions", type=_bits, default=(0, 2, 4, 8), metavar="BITS", help="weight bit-widths, 0 = pruned (default 0,2,4,8)")
    a("--a-precisions", type=_a_bits, default="auto", metavar="BITS",
      help="activation bit-widths; auto: 8 for costs blind to activations (size, params, macs), else 2,4,8")
    a("--sampling", choices=("softmax", "hard", "gumbel"), default="hard",
      help="how the search draws precisions (default hard: argmax forward, softmax gradient)")
    a("--integer-adds", action="store_true",
      help="quantize the operands of residual adds too (the tensor's own quantizer, else a fixed "
           "8-bit one) so that onnxruntime runs every convolution in int8 (see README, Deployment)")
    a("--baselines", type=_baselines, default=list(BASELINES), metavar="LIST",
      help="uniform baselines trained for the same epochs (default w8a8,w4a8,w2a8; 'none')")
    a("--sequential", action="store_true",
      help="also run the sequential baseline per lambda: prune-only search (0,8), then 2,4,8 on the pruned model")
    a("--epochs", type=_count, default=15, metavar="N", help="search epochs at most (default 15)")
    a("--warmup-epochs", type=_count, default=10, metavar="N", help="float warm-up epochs (default 10)")
    a("--finetune-epochs", type=_count, default=5, metavar="N", help="fine-tune (QAT) epochs (default 5)")
    a("--patience", type=_count, default=0, metavar="N",
      help="stop the search after N epochs without a better validation accuracy (default 0: off; "
           "the accuracy falls while the search compresses, so early stopping ends it early)")
    a("--lambda-ramp-epochs", type=_count, default=4, metavar="N",
      help="raise lambda linearly from 0 over the first N search epochs (default 4)")
    a("--no-normalize-cost", dest="normalize_cost", action="store_false",
      help="use the raw cost (lambda then carries the cost's unit)")
    a("--keep", choices=("last", "best"), default="last",
      help="which search epoch is finalized: the last one, or the best validation epoch after the ramp")
    a("--batchnorm-batch-stats", dest="freeze_bn", action="store_false",
      help="BatchNorm normalises with batch statistics during the search (default: it keeps the "
           "warm-up statistics, so that the task loss sees a layer being pruned)")
    a("--lr", type=_rate, default=1e-3, metavar="LR", help="Adam learning rate of the weights (default 1e-3)")
    a("--arch-optimizer", choices=("sgd", "adam"), default="adam",
      help="optimiser of the choice parameters (default adam: every channel's logits move at one "
           "pace, where SGD moves a layer's in proportion to its cost share; sgd: the reference's, momentum 0.9)")
    a("--arch-lr", type=_rate, default=None, metavar="LR",
      help="learning rate of the choice parameters (default 0.01 with adam, 0.1 with sgd; the "
           "reference's SGD uses 1e-2 with hundreds of steps per epoch)")
    a("--finetune-lr", type=_rate, default=1e-3, metavar="LR", help="fine-tune learning rate (default 1e-3)")
    a("--schedule", choices=("cosine", "constant"), default="cosine",
      help="learning rate of the warm-up and the fine-tune: cosine decay to 0 (default) or constant")
    a("--batch-size", type=cli.positive, default=64, metavar="N", help="batch size (default 64)")
    a("--seed", type=_count, default=0, metavar="N", help="random seed of every run (default 0)")
    a("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    a("--amp", choices=("bf16", "fp16"), default=None,
      help="mixed precision of the training steps: bf16 (CPU or CUDA) or fp16 (CUDA, loss scaling); "
           "the quantizers compute in float32 either way (default: float32 throughout)")
    a("--fuse-quantizers", action="store_true",
      help="CPU: run the search's quantizers, quantized weights, masks and cost as code compiled "
           "by inductor (same forward values; steps take about 25%% less time after a first step "
           "that compiles)")
    a("--threads", type=cli.positive, default=1, metavar="N",
      help="CPU threads of torch (default 1: small models gain little from more, and lose much "
           "when the cores are shared; raise it for large models)")
    a("--workers", type=_count, default=0, metavar="N", help="DataLoader worker processes (default 0)")
    a("--limit-train", type=cli.positive, default=None, metavar="N", help="use the first N training samples")
    a("--limit-eval", type=cli.positive, default=None, metavar="N", help="use the first N validation and test samples")
    a("--check", action="store_true", help="verify every ONNX file with onnxruntime (report: onnx_check)")
    a("--out", default=None, metavar="RUN_DIR", help="run directory (default runs/<model>-<data>)")
    a("-q", "--quiet", action="store_true", help="no progress bars or epoch lines")
    return p


# ---- files -------------------------------------------------------------------------------------
def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg}); delete it to redo that part") from err


# ---- model and data ------------------------------------------------------------------------------
def model_kwargs(ref: str, given: dict[str, Any] | None, num_classes: int) -> dict[str, Any]:
    """The user's kwargs, plus num_classes from the data when the factory takes it."""
    from .model_refs import resolve_factory
    kwargs = dict(given or {})
    if "num_classes" in kwargs:
        return kwargs
    factory = resolve_factory(ref)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return kwargs
    if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["num_classes"] = num_classes
    return kwargs


def input_channels(model: torch.nn.Module) -> int | None:
    """What the model's first convolution takes (None: no convolution)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def lambda_name(lam: float) -> str:
    return f"lambda_{lam:g}"


# ---- the sweep -----------------------------------------------------------------------------------
class Sweep:
    """One run directory: warm-up, uniform baselines, joint runs per lambda, sequential runs."""

    def __init__(self, args: argparse.Namespace):
        from .data import load_data
        from .model_refs import resolve_model_ref
        from .search import SearchSettings
        if args.arch_lr is None:
            args.arch_lr = 0.01 if args.arch_optimizer == "adam" else 0.1
        self.args = args
        self.ref = cli.model_ref(args.model)
        probe = resolve_model_ref(self.ref, args.model_kwargs)
        data = load_data(args.data, channels=input_channels(probe), image_size=args.image_size)
        self.data = data.limited(args.limit_train, args.limit_eval)
        self.kwargs = model_kwargs(self.ref, args.model_kwargs, data.num_classes)
        if args.a_precisions == "auto":
            self.a_precisions = (8,) if args.cost in ACT_INDEPENDENT else (2, 4, 8)
        else:
            self.a_precisions = args.a_precisions
        joined = distributed.active()
        self.device = distributed.init_from_env(args.device)  # torchrun: join the process group
        self.owns_group = distributed.active() and not joined
        if args.batch_size % distributed.world_size():
            raise ConfigError(f"--batch-size {args.batch_size} is the global batch, split over "
                              f"{distributed.world_size()} processes: make it a multiple of that")
        self.out = args.out or os.path.join("runs", _slug(f"{args.model}-{args.data.split(':')[0]}"))
        self.settings = SearchSettings(
            epochs=args.epochs, finetune_epochs=args.finetune_epochs, patience=args.patience, lr=args.lr,
            arch_lr=args.arch_lr, arch_optimizer=args.arch_optimizer, finetune_lr=args.finetune_lr, schedule=args.schedule, normalize_cost=args.normalize_cost,
            lambda_ramp_epochs=args.lambda_ramp_epochs,
            freeze_bn=args.freeze_bn and args.warmup_epochs > 0, restore_best=args.keep == "best", device=str(self.device), amp=args.amp,
            fuse_quantizers=args.fuse_quantizers, progress=not args.quiet,
            log=None if args.quiet else self.epoch_line)
        self.float_accuracy: float | None = None
        self.warmup_s = 0.0

    # -- messages
    def say(self, msg: str) -> None:
        if not self.args.quiet and distributed.is_main():
            print(f"fxsearch.search: {msg}", file=sys.stderr, flush=True)

    def epoch_line(self, msg: str) -> None:
        from tqdm import tqdm
        tqdm.write(f"  {msg}", file=sys.stderr)

    # -- pieces
    def options(self) -> dict[str, Any]:
        values = dict(vars(self.args), model=self.ref, model_kwargs=self.kwargs,
                      w_precisions=list(self.args.w_precisions), a_precisions=list(self.a_precisions))
        return {k: values[k] for k in RESULT_OPTIONS}

    def check_settings(self) -> None:
        path = os.path.join(self.out, "settings.json")
        mine = self.options()
        if os.path.exists(path):
            stored = {"integer_adds": False, **read_json(path)}  # run directories older than the option
            diff = [k for k in RESULT_OPTIONS if stored.get(k) != mine[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"run directory {self.out!r} was made with {k}={stored.get(k)!r}, this command "
                                  f"has {k}={mine[k]!r}; repeat the original options to resume, or choose "
                                  "another --out")
        elif distributed.is_main():
            write_json(path, mine)

    def loaders(self):
        """Fresh loaders: every run sees the same batches, whatever ran before it."""
        from torch.utils.data import DataLoader
        gen = torch.Generator().manual_seed(self.args.seed)
        kw = dict(num_workers=self.args.workers, pin_memory=self.device.type == "cuda")
        sampler = distributed.train_sampler(self.data.train, self.args.seed)  # several processes
        if sampler is None:
            train = DataLoader(self.data.train, batch_size=self.args.batch_size, shuffle=True, generator=gen, **kw)
        else:  # --batch-size is the global batch
            train = DataLoader(self.data.train, batch_size=self.args.batch_size // distributed.world_size(),
                               sampler=sampler, **kw)
        val = DataLoader(distributed.shard(self.data.val), batch_size=256, **kw)
        test = DataLoader(distributed.shard(self.data.test), batch_size=256, **kw)
        return train, val, test

    def fresh_model(self) -> torch.nn.Module:
        from .model_refs import resolve_model_ref
        torch.manual_seed(self.args.seed)
        return resolve_model_ref(self.ref, self.kwargs)

    def warm_model(self) -> torch.nn.Module:
        """The seed model after the float warm-up (trained once, then read from warmup.pt)."""
        from .checkpoint import load_weights
        from .search import evaluate, warmup
        model = self.fresh_model()
        weights, info = os.path.join(self.out, "warmup.pt"), os.path.join(self.out, "warmup.json")
        if os.path.exists(weights) and os.path.exists(info):
            load_weights(model, weights)
            record = read_json(info)
            self.float_accuracy, self.warmup_s = record["accuracy"], record["seconds"]
            self.say(f"warm-up: read {weights} (float test accuracy {100 * self.float_accuracy:.2f}%)")
            return model
        train, val, test = self.loaders()
        start = time.perf_counter()
        history = []
        if self.args.warmup_epochs:
            self.say(f"warm-up: {self.args.warmup_epochs} float epochs on {len(self.data.train)} samples")
            history = warmup(model, train, val, self.args.warmup_epochs, self.settings)
        self.warmup_s = time.perf_counter() - start
        self.float_accuracy = evaluate(model, test, self.device)[0]
        model.cpu()
        if distributed.is_main():  # the only writer; the others wait below
            torch_save(model.state_dict(), weights)
            write_json(info, {"accuracy": self.float_accuracy, "seconds": self.warmup_s,
                              "epochs": self.args.warmup_epochs, "history": history})
        distributed.barrier()
        self.say(f"warm-up done: float test accuracy {100 * self.float_accuracy:.2f}% ({self.warmup_s:.0f} s)")
        return model

    def example(self) -> tuple[torch.Tensor, ...]:
        return (torch.stack([self.data.train[i][0] for i in range(min(1, len(self.data.train)))]),)

    def runs(self) -> list[tuple[str, str, float, dict[str, Any]]]:
        """(kind, name, lambda, search options) of every run of this command, in order."""
        todo = [("joint", lambda_name(lam), lam, {"w_precisions": tuple(self.args.w_precisions)})
                for lam in self.args.lambdas]
        todo += [("uniform", b, 0.0, {"w_precisions": (int(b[1]),), "a_precisions": (int(b[3]),)})
                 for b in self.args.baselines]
        if self.args.sequential:
            todo += [("sequential", lambda_name(lam), lam, {}) for lam in self.args.lambdas]
        return todo

    def run_one(self, kind: str, name: str, lam: float, options: dict[str, Any], warm: torch.nn.Module) -> None:
        from .search import search, sequential_search
        folder = os.path.join(self.out, kind, name)
        report_path = os.path.join(folder, "report.json")
        if os.path.exists(report_path):
            self.say(f"{kind} {name}: done before ({report_path}), skipped")
            return
        if distributed.is_main():
            os.makedirs(folder, exist_ok=True)
        self.say(f"{kind} {name}: search {self.args.epochs} epochs, fine-tune {self.args.finetune_epochs}")
        torch.manual_seed(self.args.seed)
        train, val, test = self.loaders()
        common = dict(cost=self.args.cost, settings=self.settings, a_precisions=self.a_precisions,
                      sampling=self.args.sampling, integer_adds=self.args.integer_adds)
        if kind == "sequential":
            result = sequential_search(warm, train, val, test, lam=lam, **common)
        else:
            result = search(warm, train, val, test, lam=lam, **{**common, **options})
        if distributed.is_main():  # the only writer; the others wait below
            files = self.write_run(folder, kind, result)
            write_json(report_path, self.report(kind, name, result, files))
        distributed.barrier()
        self.say(f"{kind} {name}: test accuracy {100 * result.accuracy:.2f}%, "
                 f"{self.cost_text(result.costs)}, {result.timings['total']:.0f} s -> {report_path}")

    def write_run(self, folder: str, kind: str, result) -> dict[str, str]:
        from .checkpoint import save
        from .exporters import export_onnx, verify_onnx
        files = {}
        example = self.example()
        if kind != "sequential":   # a sequential run's search model is of the pruned network: no model_ref
            path = os.path.join(folder, "search.pt")
            # batch 2: rebuilding runs the model once with BatchNorm in training mode
            save(result.search_model, path, model_ref=self.ref, model_kwargs=self.kwargs,
                 example_shapes=[(2, *t.shape[1:]) for t in example],
                 extra={"kind": kind, "lambda": result.lam, "accuracy": result.accuracy})
            files["checkpoint"] = path
        path = os.path.join(folder, "final.pt")
        torch_save(result.final.state_dict(), path)
        files["final_state"] = path
        path = os.path.join(folder, "model.onnx")
        try:
            export_onnx(result.final, path, example)
        except Exception as err:  # keep the run (report, checkpoints) even when its export fails
            message = " ".join(f"{type(err).__name__}: {err}".split())
            self.say(f"warning: no ONNX file for {folder}: {message}")
            files["onnx_error"] = message
            return files
        files["onnx"] = path
        if self.args.check:
            check = verify_onnx(result.final, path, example)
            files["onnx_check"] = {"ok": bool(check.ok), "summary": check.summary()}
        return files

    def report(self, kind: str, name: str, result, files: dict[str, Any]) -> dict[str, Any]:
        layers = result.layers
        totals = {k: sum(r[k] for r in layers) for k in ("channels_kept", "channels_original", "weights", "weight_bits")}
        return {
            "kind": kind, "name": name, "lambda": result.lam, "model": self.ref, "model_kwargs": self.kwargs,
            "data": self.args.data, "cost": self.args.cost, "processes": distributed.world_size(),
            "amp": self.args.amp, "accuracy": result.accuracy,
            "val_accuracy": result.val_accuracy, "float_accuracy": self.float_accuracy,
            "costs": result.costs, "totals": totals,
            "timings": {**result.timings, "warmup_shared": self.warmup_s},
            "search_epochs": result.search_epochs,
            "files": {k: (os.path.relpath(v, self.out) if k in ("checkpoint", "final_state", "onnx") else v)
                      for k, v in files.items()},
            "layers": layers, "history": result.history,
        }

    def cost_text(self, costs: dict[str, float]) -> str:
        if "size_bytes" in costs:
            return f"{costs['size_bytes'] / 1000:.2f} kB of weights"
        return f"{self.args.cost} {costs.get(self.args.cost, float('nan')):.4g}"

    def execute(self) -> int:
        """The sweep; a process group this command joined is left at the end."""
        try:
            code = self._execute()
        except BaseException:
            if self.owns_group:
                distributed.shutdown(wait=False)
            raise
        if self.owns_group:
            distributed.shutdown()  # the other ranks wait here for rank 0's last files
        return code

    def _execute(self) -> int:
        if distributed.is_main():
            make_run_dir(self.out)
        self.check_settings()
        distributed.barrier()  # every process sees the run directory as rank 0 left it
        self.say(f"run directory {self.out}: model {self.ref}, data {self.data.name} "
                 f"({len(self.data.train)}/{len(self.data.val)}/{len(self.data.test)} samples, input "
                 f"{'x'.join(map(str, self.data.input_shape))}), cost {self.args.cost}, device {self.device}")
        todo = self.runs()
        pending = [r for r in todo if not os.path.exists(os.path.join(self.out, r[0], r[1], "report.json"))]
        warm = self.warm_model() if pending or not os.path.exists(os.path.join(self.out, "warmup.pt")) else None
        for kind, name, lam, options in todo:
            self.run_one(kind, name, lam, options, warm)
        if not distributed.is_main():
            return 0
        rows = collect_rows(self.out, self.args.cost)
        csv_path, png_path = os.path.join(self.out, "pareto.csv"), os.path.join(self.out, "pareto.png")
        write_csv(csv_path, rows)
        plot_front(rows, png_path, self.args.cost, f"{self.ref} on {self.data.name}")
        print(summary_table(rows, self.args.cost))
        print(f"plot:    {png_path}\nCSV:     {csv_path}")
        for kind, name, _, _ in todo:
            print(f"{kind + ' ' + name + ':':<20} {os.path.join(self.out, kind, name, 'report.json')}, "
                  f"{os.path.join(self.out, kind, name, 'model.onnx')}")
        return 0


# ---- the front -----------------------------------------------------------------------------------
def _x(costs: dict[str, float], cost: str) -> float:
    """The plotted cost: kB of weights for the size costs, else the cost itself."""
    if cost in ("size", "size_bytes") and "size_bytes" in costs:
        return costs["size_bytes"] / 1000
    return costs.get(cost, float("nan"))


def collect_rows(out: str, cost: str) -> list[dict[str, Any]]:
    """One row per finished run in the directory (every report.json), with on_front marking
    the runs no other run beats on both accuracy and cost."""
    rows = []
    for kind in ("joint", "uniform", "sequential"):
        folder = os.path.join(out, kind)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name, "report.json")
            if not os.path.isfile(path):
                continue
            r = read_json(path)
            row = {"kind": kind, "name": name, "lambda": r["lambda"], "accuracy": r["accuracy"],
                   "val_accuracy": r["val_accuracy"], "size_bytes": r["costs"].get("size_bytes")}
            row.update({f"cost_{k}": v for k, v in r["costs"].items()})
            row.update({"channels_kept": r["totals"]["channels_kept"], "channels_original": r["totals"]["channels_original"],
                        "search_epochs": r["search_epochs"], "wall_s": round(r["timings"]["total"], 2),
                        "warmup_s": round(r["timings"].get("warmup_shared", 0.0), 2)})
            row["_x"] = _x(r["costs"], cost)
            rows.append(row)
    rows.sort(key=lambda r: (r["kind"], r["lambda"], r["name"]))
    for r in rows:
        r["on_front"] = int(not any(o is not r and o["accuracy"] >= r["accuracy"] and o["_x"] <= r["_x"]
                                    and (o["accuracy"] > r["accuracy"] or o["_x"] < r["_x"]) for o in rows))
    return rows


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields and not k.startswith("_")]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_atomically(path, text.getvalue().encode())


def plot_front(rows: list[dict[str, Any]], path: str, cost: str, title: str) -> None:
    """Accuracy versus cost: the joint runs (their front as a line), the uniform and the
    sequential baselines. Agg canvas: no display, no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"joint": ("o", "tab:blue", "joint search"), "sequential": ("s", "tab:green", "sequential (prune, then MP)"),
              "uniform": ("D", "tab:red", "uniform precision")}
    for kind, (marker, color, label) in styles.items():
        pts = sorted(((r["_x"], 100 * r["accuracy"], r) for r in rows if r["kind"] == kind), key=lambda p: p[:2])
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        wall = sum(p[2]["wall_s"] for p in pts)
        ax.scatter(xs, ys, marker=marker, color=color, zorder=3,
                   label=f"{label}: {len(pts)} run{'s' * (len(pts) > 1)}, {wall:.0f} s")
        if kind != "uniform":
            front, best = [], -1.0
            for x, y, _ in pts:
                if y > best:
                    front.append((x, y))
                    best = y
            ax.plot([f[0] for f in front], [f[1] for f in front], color=color, alpha=0.6, zorder=2)
        for x, y, r in pts:
            text = r["name"] if kind == "uniform" else f"λ={r['lambda']:g}"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlabel("weight memory (kB)" if cost in ("size", "size_bytes") else cost)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    write_atomically(path, buffer.getvalue())


def summary_table(rows: list[dict[str, Any]], cost: str) -> str:
    unit = "kB" if cost in ("size", "size_bytes") else cost
    lines = [f"{'run':<24} {'accuracy':>9} {unit:>10} {'channels':>9} {'wall s':>7} front"]
    for r in rows:
        lines.append(f"{r['kind'] + ' ' + r['name']:<24} {100 * r['accuracy']:>8.2f}% {r['_x']:>10.4g} "
                     f"{r['channels_kept']:>4}/{r['channels_original']:<4} {r['wall_s']:>7.0f} {'*' if r['on_front'] else ''}")
    return "\n".join(lines)


def _sweep(args: argparse.Namespace) -> int:
    keep_freed_memory()  # no page faults for the tensors every step allocates again (fxsearch.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    return Sweep(args).execute()


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(build_parser(), _sweep, argv)


if __name__ == "__main__":
    sys.exit(main())
