"""`python -m fxsearch.export`: a searched checkpoint (or a model at uniform precision) to ONNX.

  python -m fxsearch.export --checkpoint search.pt -o model.onnx --report report.json --check
  python -m fxsearch.export --model torchvision:resnet18 --bits w8a8 -o resnet18.onnx

Exit status: 0 on success, 1 on failure (one line on stderr: `error: <ErrorType>: ...`),
2 on bad usage.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Sequence

import torch

from . import cli
from .errors import ExportError
from .files import write_json

BITS = re.compile(r"^w([248])a([248])$", re.IGNORECASE)


def _parse_bits(text: str) -> tuple[int, int]:
    m = BITS.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: write wNaM with N and M in 2, 4, 8 (weight and "
                                         "activation bits), e.g. w8a8 or w4a8")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fxsearch.export",
        description="Finalize a searched model (or a model at uniform precision) and write it as ONNX.",
        epilog="Model references: package.module:factory, torchvision:NAME, or a built-in name of "
               "fxsearch.zoo (resnet8, dscnn). Exit status: 0 ok, 1 failure, 2 bad usage.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a search checkpoint written by fxsearch.save")
    src.add_argument("--model", metavar="REF", help="a model reference, exported at --bits without search")
    p.add_argument("--weights", metavar="PATH", help="with --model: a state_dict file (read with weights_only=True)")
    p.add_argument("--model-kwargs", metavar="JSON", type=cli.json_object, help="with --model: factory kwargs as a JSON object")
    p.add_argument("--input-shape", metavar="SHAPE", type=cli.shape, action="append",
                   help="example input shape, batch first, e.g. 1,3,224,224 (repeat for several inputs); "
                        "default: the checkpoint's, or the model's known shape (torchvision: 1,3,224,224)")
    p.add_argument("--bits", metavar="wNaM", type=_parse_bits,
                   help="with --model: uniform weight/activation bits, N and M in 2, 4, 8 (default w8a8; "
                        "the network input stays 8-bit)")
    p.add_argument("--format", choices=("qdq", "packed"), default="qdq", help="ONNX flavour (default qdq)")
    p.add_argument("--opset", metavar="N", type=cli.positive, help="ONNX opset (default: the exporter's)")
    p.add_argument("-o", "--output", metavar="PATH", required=True, help="the .onnx file to write")
    p.add_argument("--report", metavar="PATH", help="write a JSON report: per layer channels kept, bits, costs")
    p.add_argument("--check", action="store_true",
                   help="verify the file against the PyTorch model with onnxruntime; exit 1 if it differs")
    p.add_argument("--seed", metavar="N", type=int, default=0,
                   help="with --model: seed of the initial weights (when no --weights) so that runs repeat (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"fxsearch.export: {msg}", file=sys.stderr, flush=True)


def _from_checkpoint(args: argparse.Namespace, say: _Progress):
    from . import meta
    from .checkpoint import load
    sm = load(args.checkpoint)
    info = sm.meta[meta.CHECKPOINT]
    stored = [s["shape"] for s in info["inputs"]]
    shapes = args.input_shape or stored
    inputs = cli.example_inputs(shapes, [s["dtype"] for s in info["inputs"]])
    say(f"loaded checkpoint {args.checkpoint} (model {info['model_ref']}, "
        f"{len(sm.analysis.layers)} searchable layers, inputs {', '.join(map(cli.shape_str, shapes))})")
    return sm, inputs, {"checkpoint": args.checkpoint, "model": info["model_ref"], "model_kwargs": info["model_kwargs"]}


def _from_model(args: argparse.Namespace, parser: argparse.ArgumentParser, say: _Progress):
    from .convert import convert
    w_bits, a_bits = args.bits or (8, 8)
    ref = cli.model_ref(args.model)
    shapes = cli.input_shapes(ref, args.input_shape)
    if shapes is None:
        parser.error(f"no default input shape is known for {args.model!r}; pass --input-shape")
    model = cli.build_model(ref, args.model_kwargs, args.weights, args.seed)
    inputs = cli.example_inputs(shapes)
    sm = convert(model, inputs, w_precisions=(w_bits,), a_precisions=(a_bits,))
    sm.eval()
    say(f"built {ref}{' with ' + args.weights if args.weights else ' (no --weights: initial weights)'}, "
        f"converted at w{w_bits}a{a_bits} on inputs {', '.join(map(cli.shape_str, shapes))} "
        "(activation ranges from random example inputs)")
    source = {"model": ref, "model_kwargs": args.model_kwargs or {}, "weights": args.weights,
              "bits": f"w{w_bits}a{a_bits}"}
    return sm, inputs, source


def _layers(sm, final: torch.nn.Module) -> list[dict[str, Any]]:
    """Per quantized layer of the final model: channels kept / original, bits per channel."""
    original = {name: info.out_features for name, info in sm.analysis.layers.items()}
    rows = []
    for name, module in final.named_modules():
        w_bits = getattr(module, "w_bits", None)
        if not isinstance(w_bits, torch.Tensor):
            continue
        bits = [int(b) for b in w_bits.reshape(-1).tolist()]
        a_bits = getattr(module, "a_bits", None)
        rows.append({
            "layer": name, "type": type(module).__name__,
            "channels_kept": int(module.weight.shape[0]), "channels_original": original.get(name, int(module.weight.shape[0])),
            "w_bits_count": {str(b): bits.count(b) for b in sorted(set(bits))},
            "w_bits": bits, "a_bits": None if a_bits is None else int(a_bits),
            "weights": int(module.weight.numel()),
            "weight_bits": int(sum(b * module.weight[0].numel() for b in bits)),
        })
    return rows


def _costs(sm, final: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, float] | None:
    """Cost-model values of the final model (every registered cost model), when available."""
    try:
        from . import cost_models, meta
        layers = cost_models.final_layers(final, inputs)
        models = dict(cost_models.COST_MODELS)
        models.update(sm.meta.get(meta.COST_MODELS) or {})
    except (ImportError, AttributeError):
        return None
    out = {}
    for name, cm in models.items():
        try:
            out[name] = float(cm(layers))
        except Exception:  # a cost model may not apply to every layer shape; leave it out
            continue
    return out


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    say = _Progress(args.quiet)
    if args.checkpoint and (args.weights or args.model_kwargs is not None or args.bits):
        parser.error("--weights, --model-kwargs and --bits go with --model; a checkpoint holds its own "
                     "weights, model and searched precisions")
    from .checks import check_output_file
    for path, what in ((args.output, "-o"), (args.report, "--report")):  # before minutes of work
        if path:
            check_output_file(path, ExportError, what)
    sm, inputs, source = _from_checkpoint(args, say) if args.checkpoint else _from_model(args, parser, say)
    from .finalize import finalize
    final = finalize(sm)
    final.eval()
    layers = _layers(sm, final)
    kept, total = (sum(r[k] for r in layers) for k in ("channels_kept", "channels_original"))
    say(f"finalized: {len(layers)} quantized layers, {kept} of {total} output channels kept")
    try:
        from fxsearch.exporters import export_onnx, verify_onnx
    except ImportError as err:
        raise ExportError(f"the ONNX exporter is not available (fxsearch.exporters: {err})") from err
    proto = export_onnx(final, args.output, inputs, format=args.format, opset=args.opset)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    say(f"wrote {args.output} ({os.path.getsize(args.output)} bytes, format {args.format})")
    verified = None
    if args.check:
        report = verify_onnx(final, args.output, inputs)
        print(report.summary())
        verified = {"ok": bool(report.ok), "summary": report.summary()}
    if args.report:
        data = {
            "source": source, "output": args.output, "format": args.format, "opset": opset,
            "onnx_bytes": os.path.getsize(args.output),
            "input_shapes": [list(t.shape) for t in inputs],
            "totals": {k: sum(r[k] for r in layers) for k in ("channels_kept", "channels_original", "weights", "weight_bits")},
            "layers": layers,
        }
        costs = _costs(sm, final, inputs)
        if costs is not None:
            data["costs"] = costs
        if verified is not None:
            data["check"] = verified
        write_json(args.report, data, error=ExportError, what="report")
        say(f"wrote report {args.report}")
    if verified is not None and not verified["ok"]:
        print(f"error: ExportError: {args.output} does not match the PyTorch model: {verified['summary']}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return cli.run_main(parser, lambda args: _run(args, parser), argv)


if __name__ == "__main__":
    sys.exit(main())
