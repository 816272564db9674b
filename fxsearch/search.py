"""The search driver: float warm-up, joint search, finalize, fine-tune (QAT), evaluate.

    from fxsearch.search import SearchSettings, search, warmup
    warmup(model, train_loader, val_loader, epochs=10)
    result = search(model, train_loader, val_loader, test_loader, lam=1.0, cost="size")
    result.accuracy, result.costs["size_bytes"], result.final      # a SearchResult

The protocol is the reference's (METHOD.md): weights Adam (lr 1e-3, weight decay 1e-4, none on
the activation clip bounds), choice logits SGD (lr 1e-2, momentum 0.9, no decay), both stepped
on the same batch with loss = task + lambda * cost; temperature annealed once per epoch
(tau <- tau * exp(-0.045)); optional early stopping (``patience``) on the validation accuracy
of the network the search trains. Then finalize, fine-tune with frozen precisions (the best
validation epoch is kept), evaluate on the test set.

Two departures, both measured on digits (README, Search): BatchNorm keeps the statistics of
the warm-up during the search (``freeze_bn``; the model's BatchNorm must be trained), because
with batch statistics shrinking every channel of a layer by 1 - theta[0] is invisible to the
task loss, nothing resists pruning and whole layers reach 0 bits in one epoch; and early
stopping is off by default, since the accuracy falls while the search compresses.

lambda is scale-free by default: the cost is divided by its value at the start of the search
(``normalize_cost``), so lambda = 1 weighs the whole initial cost like one nat of
cross-entropy, whatever the cost's unit (bits, MACs, cycles). ``lambda_ramp_epochs`` raises
lambda linearly from 0 over the first epochs (per step).

The pieces (``make_optimizers``, ``search_epoch``, ``run_search``, ``finetune``, ``evaluate``)
work from a user's own loop too; ``sequential_search`` is the prune-then-quantize baseline.
Any DataLoader yielding (inputs, targets) works; everything runs on ``settings.device``
("auto": CUDA when available). ``python -m fxsearch.search`` is the sweep CLI
(fxsearch/search_cli.py). In a process group (torchrun; fxsearch/distributed.py) every
training phase runs under DistributedDataParallel and evaluation sums are all-reduced, so
every rank must call these functions; ``settings.amp`` runs the training steps under autocast.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, meta
from .convert import convert
from .errors import ConfigError
from .final_modules import FakeQuantAct, QuantWeightMixin
from .finalize import finalize
from .model import SearchModel
from .search_modules import ActSearch, GroupChoice

Loader = Iterable[Any]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class SearchSettings:
    """Hyper-parameters of one search (defaults: the reference protocol but freeze_bn and patience)."""

    epochs: int = 30                 # search epochs at most (early stopping may end sooner)
    finetune_epochs: int = 10        # QAT epochs after finalize; the best validation epoch is kept
    patience: int = 0                # stop after this many epochs without a better val accuracy (0: never)
    lr: float = 1e-3                 # Adam on the weights
    weight_decay: float = 1e-4       # on the weights, never on the activation clip bounds
    arch_lr: float = 1e-2            # SGD on the choice logits
    arch_momentum: float = 0.9
    arch_optimizer: str = "sgd"      # "sgd" (the reference's, with arch_momentum) or "adam"
    finetune_lr: float = 1e-3
    schedule: str = "cosine"         # lr of the warm-up and fine-tune: "cosine" (to 0 over the epochs) or "constant"
    anneal_rate: float = 0.045       # tau <- tau * exp(-anneal_rate) after every search epoch
    normalize_cost: bool = True      # divide the cost by its value at the start: lambda is scale-free
    freeze_bn: bool = True           # BatchNorm keeps its (warm-up) statistics during the search
    restore_best: bool = False       # end the search in its best validation epoch (after the ramp), not its last
    lambda_ramp_epochs: int = 0      # lambda grows linearly from 0 over this many epochs
    device: str = "auto"             # "auto", "cpu", "cuda", "cuda:1", ...
    amp: str | None = None           # autocast dtype of the training steps: "bf16" (CPU, CUDA), "fp16" (CUDA, scaled)
    fuse_quantizers: bool = False    # CPU: the search's quantizers and cost compiled (SearchModel.fuse_quantizers)
    find_unused_parameters: bool = False   # DistributedDataParallel's, for models with parameters forward leaves unused
    sync_bn: bool = True             # several CUDA processes: BatchNorm that trains uses global-batch statistics
    progress: bool = True            # tqdm bars on stderr
    log: Callable[[str], None] | None = None   # one line per epoch (None: silent)

    def __post_init__(self) -> None:
        for name in ("epochs", "finetune_epochs", "patience", "lambda_ramp_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "arch_lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.amp not in (None, *distributed.AMP_DTYPES):
            raise ConfigError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.arch_optimizer not in ("sgd", "adam"):
            raise ConfigError(f"arch_optimizer must be 'sgd' or 'adam', got {self.arch_optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


@dataclasses.dataclass
class SearchResult:
    """What one search produced. ``costs`` are counted on the finalized model's real modules."""

    lam: float
    accuracy: float                  # test accuracy of the fine-tuned model (val when no test loader)
    val_accuracy: float
    costs: dict[str, float]          # cost name -> value (the main cost first)
    final: torch.fx.GraphModule      # finalized, fine-tuned, eval mode, on the CPU
    search_model: SearchModel | None
    timings: dict[str, float]        # seconds: search, finetune, total (and stages of a sequential run)
    search_epochs: int               # epochs the search ran (early stopping)
    layers: list[dict[str, Any]]     # per quantized layer: channels kept / original, bits
    history: dict[str, list[dict[str, float]]]   # per phase, per epoch
    float_accuracy: float | None = None


# ---- small pieces --------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device {device!r} is not a torch device ({err}); use auto, cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available; use --device cpu")
    return dev


def _no_decay(model: nn.Module) -> list[nn.Parameter]:
    """Activation clip bounds (search or finalized model): never weight-decayed."""
    if isinstance(model, SearchModel):
        return model.quantizer_parameters()
    return [p for m in model.modules() if isinstance(m, FakeQuantAct) for p in m.parameters(recurse=False)]


def weight_optimizer(model: nn.Module, params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with weight decay on every parameter but the activation clip bounds."""
    skip = {id(p) for p in _no_decay(model)}
    groups = [{"params": [p for p in params if id(p) not in skip], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr)


def make_optimizers(sm: SearchModel, settings: SearchSettings | None = None) -> tuple[torch.optim.Adam, torch.optim.Optimizer]:
    """The search's two optimisers: (weights: Adam, choice logits: SGD with momentum or Adam)."""
    s = settings or SearchSettings()
    opt_w = weight_optimizer(sm, sm.weight_parameters(), s.lr, s.weight_decay)
    if s.arch_optimizer == "adam":   # per-logit step size: small layers move as fast as large ones
        opt_a: torch.optim.Optimizer = torch.optim.Adam(sm.arch_parameters(), lr=s.arch_lr, weight_decay=0.0)
    else:
        opt_a = torch.optim.SGD(sm.arch_parameters(), lr=s.arch_lr, momentum=s.arch_momentum, weight_decay=0.0)
    return opt_w, opt_a


def _bar(loader: Loader, desc: str, progress: bool):
    if not progress:
        return loader
    # tqdm's plain class: tqdm.auto's (tqdm_asyncio) calls iter(loader) when it is built, and
    # that discarded DataLoader iterator draws from the shuffle generator, so progress bars
    # changed which batches the epoch saw
    from tqdm import tqdm
    return tqdm(loader, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _to(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, device: str | torch.device = "auto",
             criterion: Criterion = F.cross_entropy, soft: bool = False) -> tuple[float, float]:
    """(accuracy, mean loss) in eval mode. A search model answers with its argmax
    architecture, or with ``soft=True`` with the choices it trains with (softmax thetas) and
    BatchNorm in eval mode: the network the search optimises, whose BatchNorm statistics
    match (the argmax network's do not until it is finalized and fine-tuned)."""
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    if soft:
        for m in model.modules():
            if isinstance(m, (GroupChoice, ActSearch)):
                m.train()
    correct = total = 0
    loss_sum = 0.0
    try:
        for batch in loader:
            x, y = _to(batch, dev)
            out = model(x)
            loss_sum += float(criterion(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    correct, total, loss_sum = distributed.all_sum([correct, total, loss_sum])  # the whole split
    if total == 0:
        raise ConfigError("the evaluation loader yielded no samples")
    return correct / total, loss_sum / total


def _epoch(model: nn.Module, loader: Loader, optimizers: Sequence[torch.optim.Optimizer],
           loss_fn: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]],
           device: torch.device, desc: str, progress: bool, freeze_bn: bool = False,
           amp: str | None = None, scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One training epoch; loss_fn(outputs, targets, step) -> (loss, parts to average).
    freeze_bn: normalisation layers use (and keep) their running statistics. amp: forward and
    loss under autocast; scaler: fp16 loss scaling. Progress bars on rank 0 only."""
    progress = progress and distributed.is_main()
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    sums: dict[str, float] = {}
    n = 0
    bar = _bar(loader, desc, progress)
    for step, batch in enumerate(bar):
        x, y = _to(batch, device)
        with distributed.autocast(device, amp):
            loss, parts = loss_fn(model(x), y, step)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            for opt in optimizers:
                opt.step()
        else:
            scaler.scale(loss).backward()
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
        bracket_zero(model)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        if progress and step % 5 == 0:
            bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()}, refresh=False)
    if n == 0:
        raise ConfigError("the training loader yielded no batches")
    distributed.advance_epoch(loader)  # a DistributedSampler shuffles anew for the next pass
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def bracket_zero(model: nn.Module) -> None:
    """Keep every learned activation range [lo, hi] around 0 (lo <= 0 <= hi), in a search or a
    finalized model; call it after each optimiser step of a loop of your own (the driver does):
    a signed range that drifted to lo > 0 (inputs in [0, 1]) has no integer zero point in the
    uint8 grid."""
    for m in model.modules():
        if isinstance(m, (ActSearch, FakeQuantAct)) and isinstance(m.lo, nn.Parameter):
            m.lo.clamp_(max=0.0)
            m.hi.clamp_(min=0.0)


def _say(settings: SearchSettings, msg: str) -> None:
    if settings.log is not None and distributed.is_main():
        settings.log(msg)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- phases --------------------------------------------------------------------------------
def train_float(model: nn.Module, train_loader: Loader, val_loader: Loader, epochs: int,
                settings: SearchSettings | None = None, criterion: Criterion = F.cross_entropy,
                lr: float | None = None, desc: str = "train") -> list[dict[str, float]]:
    """Plain training (Adam, ``lr`` or the search's, its weight decay but none on activation
    clip bounds; ``settings.schedule``: cosine decay per epoch or constant), in place; keeps
    the best validation epoch. The float warm-up and the
    fine-tuning of a finalized model (QAT) both use it."""
    s = settings or SearchSettings()
    dev = resolve_device(s.device)
    model.to(dev)
    opt = weight_optimizer(model, [p for p in model.parameters() if p.requires_grad], lr or s.lr, s.weight_decay)
    history: list[dict[str, float]] = []
    best, best_state, stale = -1.0, None, 0
    scaler = distributed.grad_scaler(dev, s.amp)
    unsync_bn = distributed.sync_batchnorm(model, dev, s.sync_bn)   # several CUDA processes only
    net = distributed.wrap(model, dev, s.find_unused_parameters)    # DDP when several processes run

    def loss_fn(out, y, step):
        loss = criterion(out, y)
        return loss, {"loss": float(loss.detach())}

    base_lr = lr or s.lr
    for epoch in range(epochs):
        if s.schedule == "cosine":   # per epoch, from base_lr down towards 0
            for group in opt.param_groups:
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        row = _epoch(net, train_loader, [opt], loss_fn, dev, f"{desc} {epoch + 1}/{epochs}", s.progress,
                     amp=s.amp, scaler=scaler)
        row["val_acc"], row["val_loss"] = evaluate(model, val_loader, dev, criterion)
        history.append({"epoch": epoch + 1, **row})
        _say(s, f"{desc} epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}, val acc {100 * row['val_acc']:.2f}%")
        if row["val_acc"] > best:
            best, best_state, stale = row["val_acc"], _state(model), 0
        else:
            stale += 1
            if s.patience and stale >= s.patience:
                break
    del net
    unsync_bn()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def warmup(model: nn.Module, train_loader: Loader, val_loader: Loader, epochs: int,
           settings: SearchSettings | None = None, criterion: Criterion = F.cross_entropy) -> list[dict[str, float]]:
    """Float training of the seed model before the search (the model is trained in place)."""
    return train_float(model, train_loader, val_loader, epochs, settings, criterion, desc="warm-up")


def search_epoch(sm: SearchModel, loader: Loader, opt_w: torch.optim.Optimizer, opt_a: torch.optim.Optimizer,
                 lam: float | Callable[[int], float], *, cost_scale: float = 1.0,
                 device: str | torch.device = "auto", criterion: Criterion = F.cross_entropy,
                 progress: bool = False, desc: str = "search", freeze_bn: bool = False,
                 amp: str | None = None, scaler: torch.amp.GradScaler | None = None,
                 net: nn.Module | None = None) -> dict[str, float]:
    """One search epoch: loss = task + lam * cost / cost_scale, both optimisers on every batch.
    ``lam`` may be a function of the step within the epoch (a ramp). Returns epoch means of
    loss, task, cost (unscaled) and lam. ``net``: what the batches go through, a
    distributed.SearchStep of ``sm`` (default) or a DistributedDataParallel of one."""
    dev = resolve_device(device)
    net = net if net is not None else distributed.SearchStep(sm)

    def loss_fn(outputs, y, step):
        out, cost = outputs
        task = criterion(out, y)
        lam_now = lam(step) if callable(lam) else lam
        loss = task + (lam_now / cost_scale) * cost if lam_now else task
        return loss, {"loss": float(loss.detach()), "task": float(task.detach()),
                      "cost": float(cost.detach()), "lam": float(lam_now)}

    return _epoch(net, loader, [opt_w, opt_a], loss_fn, dev, desc, progress, freeze_bn, amp, scaler)


def _batches(loader: Loader) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def run_search(sm: SearchModel, train_loader: Loader, val_loader: Loader, lam: float,
               settings: SearchSettings | None = None, criterion: Criterion = F.cross_entropy) -> list[dict[str, float]]:
    """The search phase on ``sm`` (trained in place): up to ``settings.epochs`` epochs with
    temperature annealing, lambda ramp and early stopping; the last epoch's state is kept.
    Returns one row per epoch (loss, task, cost, lam, temperature, val_acc, argmax cost)."""
    s = settings or SearchSettings()
    dev = resolve_device(s.device)
    sm.to(dev).train()
    opt_w, opt_a = make_optimizers(sm, s)
    scaler = distributed.grad_scaler(dev, s.amp)
    unsync_bn = distributed.sync_batchnorm(sm, dev, s.sync_bn and not s.freeze_bn)  # several CUDA processes
    net = distributed.wrap(distributed.SearchStep(sm), dev, s.find_unused_parameters)  # DDP broadcasts rank 0's state
    with torch.no_grad():
        start = float(sm.cost)
    scale = start if s.normalize_cost and start > 0 else 1.0
    steps = _batches(train_loader) or 1
    history: list[dict[str, float]] = []
    best, best_state, stale = -1.0, None, 0
    for epoch in range(s.epochs):
        if s.lambda_ramp_epochs and lam:
            lam_e: float | Callable[[int], float] = (
                lambda step, e=epoch: lam * min(1.0, (e * steps + step + 1) / (s.lambda_ramp_epochs * steps)))
        else:
            lam_e = lam
        row = search_epoch(sm, train_loader, opt_w, opt_a, lam_e, cost_scale=scale, device=dev,
                           criterion=criterion, progress=s.progress, desc=f"search {epoch + 1}/{s.epochs}",
                           freeze_bn=s.freeze_bn, amp=s.amp, scaler=scaler, net=net)
        row["temperature"] = sm.temperature
        row["val_acc"], row["val_loss"] = evaluate(sm, val_loader, dev, criterion, soft=True)
        row["argmax_cost"] = sm.discrete_cost()
        history.append({"epoch": epoch + 1, **row})
        _say(s, f"search epoch {epoch + 1}/{s.epochs} (lambda {row['lam']:.3g}, tau {row['temperature']:.3f}): "
                f"task {row['task']:.4f}, cost {row['cost'] / start:.3f} x initial, argmax cost "
                f"{row['argmax_cost'] / start:.3f} x, val acc {100 * row['val_acc']:.2f}%")
        sm.anneal_temperature(s.anneal_rate)
        if epoch + 1 < s.lambda_ramp_epochs:
            continue  # accuracy is expected to fall while lambda rises
        if row["val_acc"] > best:
            best, stale = row["val_acc"], 0
            best_state = _state(sm) if s.restore_best else None
        else:
            stale += 1
            if s.patience and stale >= s.patience:
                _say(s, f"early stop: no better validation accuracy for {s.patience} epochs")
                break
    del net
    unsync_bn()
    if best_state is not None:
        sm.load_state_dict(best_state)
        _say(s, f"kept the search state of the best validation accuracy ({100 * best:.2f}%)")
    sm.eval()
    return history


def finetune(final: nn.Module, train_loader: Loader, val_loader: Loader,
             settings: SearchSettings | None = None, criterion: Criterion = F.cross_entropy) -> list[dict[str, float]]:
    """Quantization-aware fine-tuning of a finalized model (precisions frozen), in place;
    keeps the best validation epoch."""
    s = settings or SearchSettings()
    return train_float(final, train_loader, val_loader, s.finetune_epochs, s, criterion, s.finetune_lr, "fine-tune")


# ---- results -------------------------------------------------------------------------------
def quant_layers(final: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in final.named_modules() if isinstance(m, QuantWeightMixin)}


def layer_report(final: nn.Module, original: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Per quantized layer: output channels kept and originally, weight bits per channel
    (counts and list), input activation bits, weights and weight bits."""
    rows = []
    for name, m in quant_layers(final).items():
        bits = [int(b) for b in m.w_bits.tolist()]
        per_channel = m.weight[0].numel()
        rows.append({
            "layer": name, "channels_kept": len(bits),
            "channels_original": (original or {}).get(name, len(bits)),
            "w_bits_count": {str(b): bits.count(b) for b in sorted(set(bits))},
            "w_bits": bits, "a_bits": m.a_bits, "weights": int(m.weight.numel()),
            "weight_bits": int(sum(bits) * per_channel),
        })
    return rows


def final_costs(final: nn.Module, example_inputs: Sequence[Any], main: Any = "size") -> dict[str, float]:
    """The cost models ``main`` (as convert's ``cost``) and every registered one, counted on a
    finalized model; models that do not apply to some layer are left out. ``main`` first."""
    from . import cost_models
    layers = cost_models.final_layers(final, example_inputs)
    models = cost_models.resolve_costs(main)
    models.update({k: v for k, v in cost_models.COST_MODELS.items() if k not in models})
    out = {}
    for name, cm in models.items():
        try:
            out[name] = float(cm(layers))
        except Exception:  # e.g. a latency model without a formula for this layer shape
            continue
    return out


def _example(loader: Loader, n: int = 32) -> tuple[torch.Tensor, ...]:
    """A batch of real inputs (on the CPU): they set the activation clip ranges of convert."""
    batch = next(iter(loader))
    return (batch[0][:n].detach().cpu(),)


# ---- the whole thing -----------------------------------------------------------------------
def search(model: nn.Module, train_loader: Loader, val_loader: Loader, test_loader: Loader | None = None, *,
           lam: float, cost: Any = "size", settings: SearchSettings | None = None,
           warmup_epochs: int = 0, example_inputs: Sequence[Any] | None = None,
           criterion: Criterion = F.cross_entropy, **convert_options: Any) -> SearchResult:
    """Warm-up (optional, trains ``model`` in place), convert, search, finalize, fine-tune and
    evaluate. ``convert_options``: fxsearch.convert's (w_precisions, a_precisions, ...);
    ``example_inputs`` default to a batch of the training loader. With ``settings.freeze_bn``
    (the default) the model's BatchNorm statistics must be trained: warm it up (here or with
    ``warmup``), start from trained weights, or set freeze_bn=False. The model is converted
    with its BatchNorm as the search runs it (eval mode under freeze_bn, else training mode):
    the initial activation clip ranges come from that run, whatever mode ``model`` is in."""
    s = settings or SearchSettings()
    dev = resolve_device(s.device)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    history: dict[str, list[dict[str, float]]] = {}
    float_acc = None
    if warmup_epochs:
        history["warmup"] = warmup(model, train_loader, val_loader, warmup_epochs, s, criterion)
        float_acc = evaluate(model, test_loader or val_loader, dev, criterion)[0]
        timings["warmup"] = time.perf_counter() - t0
    inputs = tuple(example_inputs) if example_inputs is not None else _example(train_loader)
    inputs = distributed.from_main(inputs)  # one graph on every process (rank 0's clip ranges)
    inputs = tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in inputs)
    t1 = time.perf_counter()
    seed_model = copy.deepcopy(model).cpu().train(not s.freeze_bn)  # BatchNorm as the search will run it
    sm = convert(seed_model, inputs, cost=cost, **convert_options).fuse_quantizers(s.fuse_quantizers)
    history["search"] = run_search(sm, train_loader, val_loader, lam, s, criterion)
    timings["search"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    final = finalize(sm.cpu())
    history["finetune"] = finetune(final, train_loader, val_loader, s, criterion)
    timings["finetune"] = time.perf_counter() - t2
    val_acc = evaluate(final, val_loader, dev, criterion)[0]
    acc = evaluate(final, test_loader, dev, criterion)[0] if test_loader is not None else val_acc
    final.cpu().eval()
    sm.cpu()
    timings["total"] = time.perf_counter() - t0
    original = {name: info.out_features for name, info in sm.analysis.layers.items()}
    one = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs)
    return SearchResult(
        lam=float(lam), accuracy=acc, val_accuracy=val_acc, costs=final_costs(final, one, sm.meta.get(meta.COST_MODELS) or cost),
        final=final, search_model=sm, timings=timings, search_epochs=len(history["search"]),
        layers=layer_report(final, original), history=history, float_accuracy=float_acc)


def uniform_baseline(model: nn.Module, train_loader: Loader, val_loader: Loader, test_loader: Loader | None = None,
                     *, w_bits: int, a_bits: int = 8, cost: Any = "size", settings: SearchSettings | None = None,
                     **kwargs: Any) -> SearchResult:
    """The same protocol at one fixed precision (e.g. w4a8): QAT for the search epochs, then
    fine-tune; the reference's uniform baselines."""
    return search(model, train_loader, val_loader, test_loader, lam=0.0, cost=cost, settings=settings,
                  w_precisions=(w_bits,), a_precisions=(a_bits,), **kwargs)


def float_model(final: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A finalized model as a plain float network of the same (pruned, BN-folded) shape: its
    quantized weights and biases as float parameters, activation quantizers removed; ready to
    convert again."""
    from .final_modules import QUANT_CLASS
    plain_class = {q: base for base, q in QUANT_CLASS.items()}
    twin = copy.deepcopy(final).eval()
    modules = dict(twin.named_modules())
    for node in list(twin.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), FakeQuantAct):
            node.replace_all_uses_with(node.args[0])
            twin.graph.erase_node(node)
    twin.graph.lint()
    twin.delete_all_unused_submodules()
    for name, m in list(twin.named_modules()):
        if isinstance(m, QuantWeightMixin):
            with torch.no_grad():
                weight, bias = m.quant_weight().detach(), m.quant_bias()
            plain = plain_class[type(m)].__new__(plain_class[type(m)])
            plain.__dict__.update(m.__dict__)
            plain.__dict__.pop("input_quant", None)
            plain._buffers = {k: v for k, v in m._buffers.items() if k != "w_bits"}
            plain._parameters = dict(m._parameters)
            plain.weight = nn.Parameter(weight)
            if bias is not None:
                plain.bias = nn.Parameter(bias.detach())
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, leaf, plain)
    twin.recompile()
    return twin


def sequential_search(model: nn.Module, train_loader: Loader, val_loader: Loader, test_loader: Loader | None = None,
                      *, lam: float, cost: Any = "size", settings: SearchSettings | None = None,
                      prune_precisions: Sequence[int] = (0, 8), w_precisions: Sequence[int] = (2, 4, 8),
                      warmup_epochs: int = 0, criterion: Criterion = F.cross_entropy,
                      **convert_options: Any) -> SearchResult:
    """The sequential baseline: a pruning-only search (``prune_precisions``) with fine-tune,
    then a mixed-precision search without 0 bits (``w_precisions``) on the pruned network,
    with fine-tune. Timings and history hold both stages; channels_original counts the
    seed model's channels."""
    if 0 in w_precisions:
        raise ConfigError(f"the second stage of the sequential baseline searches precisions only; "
                          f"w_precisions={tuple(w_precisions)} must not hold 0")
    first = search(model, train_loader, val_loader, test_loader, lam=lam, cost=cost, settings=settings,
                   warmup_epochs=warmup_epochs, criterion=criterion, w_precisions=tuple(prune_precisions),
                   **convert_options)
    second = search(float_model(first.final), train_loader, val_loader, test_loader, lam=lam, cost=cost,
                    settings=settings, criterion=criterion, w_precisions=tuple(w_precisions), **convert_options)
    original = {r["layer"]: r["channels_original"] for r in first.layers}
    for row in second.layers:
        row["channels_original"] = original.get(row["layer"], row["channels_original"])
    timings = {f"prune_{k}": v for k, v in first.timings.items() if k != "total"}
    timings.update({f"precision_{k}": v for k, v in second.timings.items() if k != "total"})
    timings["search"] = first.timings["search"] + second.timings["search"]
    timings["finetune"] = first.timings["finetune"] + second.timings["finetune"]
    timings["total"] = first.timings["total"] + second.timings["total"]
    history = {f"prune_{k}": v for k, v in first.history.items()}
    history.update({f"precision_{k}": v for k, v in second.history.items()})
    return dataclasses.replace(second, timings=timings, history=history,
                               search_epochs=first.search_epochs + second.search_epochs,
                               float_accuracy=first.float_accuracy)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fxsearch.search``: see fxsearch/search_cli.py."""
    from .search_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
