"""`python -m fxsearch.inspect`: the rewritten graph of a search model, as a table, JSON,
Graphviz DOT or a self-contained HTML page.

  python -m fxsearch.inspect --model resnet8 --input-shape 1,3,32,32
  python -m fxsearch.inspect --checkpoint runs/r8/joint/lambda_2/search.pt --out graph.html --out graph.dot
  python -m fxsearch.inspect --model torchvision:mobilenet_v2 --format json --cost size,macs

Exit status: 0 on success, 1 on failure (one line on stderr: `error: <ErrorType>: ...`),
2 on bad usage.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import Sequence

from . import cli
from .errors import ConfigError, ExportError

SUFFIXES = {".dot": "dot", ".gv": "dot", ".html": "html", ".htm": "html", ".svg": "svg", ".png": "png",
            ".json": "json", ".txt": "table"}


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give cost model names separated by commas, e.g. size,macs")
    return names


def build_parser() -> argparse.ArgumentParser:
    from .cost_models import COST_MODELS
    p = argparse.ArgumentParser(
        prog="python -m fxsearch.inspect",
        description="Show the rewritten graph of a search model: every node with its search "
                    "annotations, the channel groups and frozen units, the cost of every layer; "
                    "optionally as a Graphviz DOT file and a self-contained HTML page.",
        epilog="Model references: a built-in name (resnet8, dscnn), a torchvision name (resnet18 or "
               "torchvision:resnet18) or package.module:factory. --out chooses the format by suffix: "
               ".dot/.gv, .html/.htm, .svg/.png (rendered by Graphviz `dot` when it is on PATH; the "
               ".dot is written next to it either way), .json, .txt. "
               "Exit status: 0 ok, 1 failure, 2 bad usage.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a search checkpoint written by fxsearch.save")
    src.add_argument("--model", metavar="REF", help="a model reference, converted with the default search options")
    p.add_argument("--model-kwargs", metavar="JSON", type=cli.json_object, help="with --model: factory kwargs as a JSON object")
    p.add_argument("--weights", metavar="PATH", help="with --model: a state_dict file (read with weights_only=True)")
    p.add_argument("--input-shape", metavar="SHAPE", type=cli.shape, action="append",
                   help="with --model: example input shape, batch first, e.g. 1,3,32,32 (repeat for several "
                        "inputs); default: the model's known shape (torchvision: 1,3,224,224)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="with --model: seed of the initial weights (default 0)")
    p.add_argument("--cost", metavar="NAMES", type=_names,
                   help=f"cost models priced per layer, separated by commas ({', '.join(COST_MODELS)}); "
                        "default: the model's own (size for --model)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="what is printed on stdout (default table)")
    p.add_argument("--out", metavar="PATH", action="append", default=[],
                   help="write a file, its format chosen by suffix (repeat for several)")
    p.add_argument("--out-dot", metavar="PATH", help="write the Graphviz DOT file")
    p.add_argument("--out-html", metavar="PATH", help="write the self-contained HTML page")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes on stderr")
    return p


def _outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(format, path) of every file to write; the folders must exist (checked before any work)."""
    outs = [("dot", args.out_dot)] if args.out_dot else []
    outs += [("html", args.out_html)] if args.out_html else []
    for path in args.out:
        kind = SUFFIXES.get(os.path.splitext(path)[1].lower())
        if kind is None:
            parser.error(f"--out {path}: unknown suffix; use one of {', '.join(SUFFIXES)}")
        outs.append((kind, path))
    for _, path in outs:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ConfigError(f"cannot write {path!r}: folder {folder!r} does not exist; create it or "
                              "choose another output path")
    return outs


def _search_model(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The search model to inspect and the cost names to price (None: its own)."""
    if args.checkpoint:
        if args.weights or args.model_kwargs is not None or args.input_shape:
            parser.error("--weights, --model-kwargs and --input-shape go with --model; a checkpoint "
                         "holds its own model, weights and input shapes")
        from .checkpoint import load
        return load(args.checkpoint), args.cost
    from .convert import convert
    ref = cli.model_ref(args.model)
    shapes = cli.input_shapes(ref, args.input_shape)
    if shapes is None:
        parser.error(f"no default input shape is known for {args.model!r}; pass --input-shape")
    model = cli.build_model(ref, args.model_kwargs, args.weights, args.seed)
    sm = convert(model, cli.example_inputs(shapes), cost=args.cost or "size")
    return sm.eval(), None


def render_graphviz(dot_text: str, fmt: str) -> bytes | None:
    """The DOT text rendered by Graphviz `dot` (svg or png), or None when `dot` is not on PATH."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ExportError(f"Graphviz `dot` ({exe}) could not render {fmt}: {err}") from err
    if done.returncode:
        message = done.stderr.decode(errors="replace").strip().splitlines()[:1]
        raise ExportError(f"Graphviz `dot` ({exe}) failed to render {fmt}: {' '.join(message)}; "
                          "the .dot file is written; open the HTML page (--out-html) instead")
    return done.stdout


def _write(kind: str, path: str, texts: dict[str, str], say) -> None:
    from .files import write_atomically
    if kind in ("svg", "png"):
        source = os.path.splitext(path)[0] + ".dot"
        write_atomically(source, texts["dot"].encode())
        picture = render_graphviz(texts["dot"], kind)
        if picture is None:  # what was asked for is missing: said even under --quiet
            say(force=True, msg=f"Graphviz `dot` is not on PATH, so {path} was NOT rendered; wrote its source {source} "
                f"(render it where Graphviz is installed: dot -T{kind} {source} -o {path}), or use "
                "--out-html for a picture without Graphviz")
            return
        write_atomically(path, picture)
    else:
        write_atomically(path, texts[kind].encode())
    say(f"wrote {path}")


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .graph_render import format_table, to_dot, to_html
    from .graph_view import inspect_graph

    def say(msg: str, force: bool = False) -> None:
        if force or not args.quiet:
            print(f"fxsearch.inspect: {msg}", file=sys.stderr, flush=True)

    outs = _outputs(args, parser)
    sm, cost = _search_model(args, parser)
    report = inspect_graph(sm, cost)
    kinds = {k for k, _ in outs} | {args.format}
    texts = {"json": cli.json_text(report.as_dict()) + "\n"}
    if "table" in kinds:
        texts["table"] = format_table(report) + "\n"
    if kinds & {"dot", "svg", "png"}:
        texts["dot"] = to_dot(report)
    if "html" in kinds:
        texts["html"] = to_html(report)
    for kind, path in outs:
        _write(kind, path, texts, say)
    sys.stdout.write(texts[args.format])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return cli.run_main(parser, lambda args: _run(args, parser), argv)


if __name__ == "__main__":
    sys.exit(main())
