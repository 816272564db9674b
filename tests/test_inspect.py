"""fxsearch.inspect_graph (rows of the rewritten graph), its DOT and HTML drawings, and the
`python -m fxsearch.inspect` command on a built-in model and on a checkpoint."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

import fxsearch
from fxsearch import cost_models
from fxsearch.graph_render import FROZEN, group_colour, to_dot, to_html
from fxsearch.inspect import main
from fxsearch.zoo import resnet8

import models

COSTS = ["size", "bitops"]


def choose(sm, group: int, units: list[int], bits: int) -> None:
    """Make the argmax of these units of a group ``bits``."""
    choice = sm.get_submodule(f"fxs_choices.g{group}")
    with torch.no_grad():
        choice.alpha[:, units] = -10.0
        choice.alpha[choice.precisions.index(bits), units] = 10.0


def choose_act(sm, name: str, bits: int) -> None:
    act = sm.get_submodule(f"fxs_act.{name}")
    with torch.no_grad():
        act.alpha.fill_(-10.0)
        act.alpha[act.precisions.index(bits)] = 10.0


@pytest.fixture(scope="module")
def residual():
    """Residual micro-model with some units at 0, 2 and 4 bits and a 4-bit activation."""
    torch.manual_seed(0)
    inputs = (models.example_input(),)
    sm = fxsearch.convert(models.Residual(), inputs, cost=COSTS).eval()
    group = sm.analysis.layers["stem"].group            # stem and b1_conv2, tied by the add
    choose(sm, group, [0, 1], 0)
    choose(sm, group, [2], 2)
    choose(sm, sm.analysis.layers["b2_conv1"].group, [0, 1, 2, 3], 4)
    choose_act(sm, "relu_1", 4)
    return sm, inputs, fxsearch.inspect_graph(sm)


def rows_by_name(report):
    return {r["name"]: r for r in report.nodes}


# ---- rows ----------------------------------------------------------------------------------------
def test_one_row_per_node_and_one_edge_per_use(residual):
    sm, _, report = residual
    assert [r["name"] for r in report.nodes] == [n.name for n in sm.graph.nodes]
    assert report.edges == [(a.name, n.name) for n in sm.graph.nodes for a in n.all_input_nodes]
    rows = rows_by_name(report)
    assert rows["x"]["op"] == "placeholder" and rows["x"]["shape"] == [2, 3, 8, 8]
    assert rows["b2_conv1"]["shape"] == [2, 12, 8, 8] and rows["b2_conv1"]["module"] == "SearchConv2d"
    assert rows["q_relu_2"]["shape"] == [2, 8, 8, 8]            # a quantizer keeps its input's shape
    assert rows["output"]["role"] is None and rows["output"]["groups"] == []


def test_layer_rows_carry_group_precisions_and_choices(residual):
    sm, _, report = residual
    rows = rows_by_name(report)
    analysis = sm.analysis
    for name, info in analysis.layers.items():
        row = rows[name.replace(".", "_")]
        choice = sm.get_submodule(f"fxs_choices.g{info.group}")
        bits = choice.argmax_bits()[info.unit_index]
        assert row["role"] == "weight_search" and row["groups"] == [info.group]
        assert row["w_bits"] == [0, 2, 4, 8]
        assert row["w_chosen"] == {b: int((bits == b).sum()) for b in (0, 2, 4, 8)}
        assert f"theta_g{info.group}" in row["search"]
    assert rows["stem"]["w_chosen"] == {0: 2, 2: 1, 4: 0, 8: 5}
    assert rows["b1_conv2"]["w_chosen"] == rows["stem"]["w_chosen"]    # tied units, same choices
    assert rows["b2_conv1"]["w_chosen"] == {0: 0, 2: 0, 4: 4, 8: 8}
    # the network input is quantized at 8 bits; the chosen activation bits show on the q_ node
    # and on the layer it feeds
    assert rows["stem"]["a_bits"] == [8] and rows["stem"]["a_chosen"] == 8
    assert rows["q_relu_1"]["a_bits"] == [2, 4, 8] and rows["q_relu_1"]["a_chosen"] == 4
    g0 = sm.analysis.layers["stem"].group
    assert rows["b1_conv2"]["a_chosen"] == 4 and rows["b1_conv2"]["search"] == ["q_relu_1", f"theta_g{g0}"]


def test_value_rows_name_the_groups_and_layers_whose_channels_they_hold(residual):
    sm, _, report = residual
    rows = rows_by_name(report)
    g0 = sm.analysis.layers["stem"].group
    assert rows["add"]["groups"] == [g0] and rows["add"]["layers"] == ["stem", "b1_conv2"]
    assert rows["add_1"]["layers"] == ["b2_conv2", "b2_short"]
    assert rows["add"]["search"] == ["q_relu_2"]  # the quantizer of its value (relu_2 absorbed in it)
    assert rows[f"theta_g{g0}"]["role"] == "choice" and rows[f"theta_g{g0}"]["shape"] == [4, 8]
    assert rows[f"theta_g{g0}"]["w_chosen"] == {0: 2, 2: 1, 4: 0, 8: 5}


def test_groups_and_frozen_units_match_the_analysis():
    torch.manual_seed(0)
    sm = fxsearch.convert(models.UnknownOp(), (models.example_input(),))
    report = fxsearch.inspect_graph(sm)
    analysis = sm.analysis
    assert [g["layers"] for g in report.groups] == [g.layers for g in analysis.groups]
    for row, group in zip(report.groups, analysis.groups):
        assert row["units"] == group.num_units and row["frozen"] == int(group.frozen.sum())
        assert {r: len(u) for r, u in row["frozen_units"].items()} == group.reason_counts()
        for reason, units in row["frozen_units"].items():
            assert all(group.reasons[u][0] == reason and bool(group.frozen[u]) for u in units)
    a = rows_by_name(report)["a"]
    assert a["frozen"] == 8 and any("is not modelled" in r for r in a["reasons"])
    assert rows_by_name(report)["b"]["frozen"] == 0
    assert any("reaches the model output" in r for r in rows_by_name(report)["fc"]["reasons"])
    assert [{k: v for k, v in r.items() if k != "cost"} for r in report.layers] == sm.layer_table()


def test_costs_per_layer_add_up_and_match_the_finalized_model(residual):
    sm, inputs, report = residual
    assert set(report.costs) == set(COSTS)
    for name in COSTS:
        assert report.costs[name] == sm.discrete_cost(name)
        assert report.costs[name] == pytest.approx(float(sm.costs[name]), rel=1e-6)   # eval mode: argmax
        assert sum(r["cost"][name] for r in report.layers) == pytest.approx(report.costs[name], rel=1e-12)
    # each layer's share, counted again from the finalized model's real modules
    final = fxsearch.finalize(sm)
    counted = {layer.name: layer for layer in cost_models.final_layers(final, inputs)}
    for row in report.layers:
        for name in COSTS:
            expect = float(cost_models.get_cost_model(name)([counted[row["layer"]]]))
            assert row["cost"][name] == pytest.approx(expect, rel=1e-9), (row["layer"], name)
    # by hand: b1_conv1 reads 6 alive channels of the stem group, 3x3 kernel, 8 channels at 8 bits
    assert {r["layer"]: r for r in report.layers}["b1_conv1"]["cost"]["size"] == 6 * 9 * 8 * 8


def test_cost_names_choose_the_models(residual):
    sm, _, _ = residual
    report = fxsearch.inspect_graph(sm, "macs")          # not one of the model's own: the registry's
    assert list(report.costs) == ["macs"] and list(report.layers[0]["cost"]) == ["macs"]
    assert report.costs["macs"] == pytest.approx(float(cost_models.get_cost_model("macs")(
        cost_models.search_layers(sm, discrete=True))))
    with pytest.raises(fxsearch.ConfigError, match="unknown cost model 'nope'"):
        fxsearch.inspect_graph(sm, ["size", "nope"])
    with pytest.raises(fxsearch.ConfigError, match="expects a SearchModel"):
        fxsearch.inspect_graph(torch.fx.symbolic_trace(models.PlainChain()))


def test_report_is_json_data(residual):
    data = json.loads(json.dumps(residual[2].as_dict()))
    assert len(data["nodes"]) == len(residual[2].nodes) and data["costs"]["size"] == residual[2].costs["size"]


# ---- drawings ------------------------------------------------------------------------------------
DOT_NODE = re.compile(r'^  "([^"]+)" \[(.*)\];$')
DOT_EDGE = re.compile(r'^  "([^"]+)" -> "([^"]+)"')
DOT_ATTR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_dot(text: str):
    nodes, edges = {}, []
    for line in text.splitlines():
        if m := DOT_EDGE.match(line):
            edges.append((m.group(1), m.group(2)))
        elif m := DOT_NODE.match(line):
            nodes[m.group(1)] = dict(DOT_ATTR.findall(m.group(2)))
    return nodes, edges


@pytest.fixture(scope="module")
def concat():
    """Two groups meet in a cat: its value holds both (a striped node); fc is frozen."""
    torch.manual_seed(0)
    sm = fxsearch.convert(models.Concat(), (models.example_input(),)).eval()
    return sm, fxsearch.inspect_graph(sm)


def test_dot_has_every_node_and_edge_coloured_by_group(concat):
    sm, report = concat
    text = to_dot(report)
    assert text.startswith('digraph "') and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}") == 1
    nodes, edges = parse_dot(text)
    assert set(nodes) == {n.name for n in sm.graph.nodes}
    assert sorted(edges) == sorted((a.name, n.name) for n in sm.graph.nodes for a in n.all_input_nodes)
    rows = rows_by_name(report)
    colour_of_group = {}
    for name, attrs in nodes.items():
        groups = rows[name]["groups"]
        assert attrs["fillcolor"] == (":".join(group_colour(g) for g in groups) or "#ffffff")
        for g, c in zip(groups, attrs["fillcolor"].split(":")):
            assert colour_of_group.setdefault(g, c) == c          # one colour per group everywhere
        assert (attrs.get("color") == FROZEN) == (rows[name]["frozen"] > 0)
    assert len(set(colour_of_group.values())) == len(sm.analysis.groups)
    cat = next(r for r in report.nodes if r["target"] == "cat")
    assert len(cat["groups"]) == 2 and "striped" in nodes[cat["name"]]["style"]
    assert "frozen units: 10" in nodes["fc"]["label"]


def test_html_is_self_contained_and_draws_every_node(concat):
    sm, report = concat
    page = to_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    lowered = page.lower()
    for banned in ("http://", "https://", "<script", "<link", " src=", "@import", "url(http"):
        assert banned not in lowered, banned
    for n in sm.graph.nodes:
        assert f'id="n-{n.name}"' in page
        for a in n.all_input_nodes:
            assert f'data-from="{a.name}" data-to="{n.name}"' in page
    for g in sm.analysis.groups:
        assert f"background:{group_colour(g.id)}" in page
    assert page.count(f'stroke="{FROZEN}"') == sum(1 for r in report.nodes if r["frozen"])
    assert "reaches the model output" in page


# ---- the command line ----------------------------------------------------------------------------
def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxsearch.inspect", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_on_resnet8_writes_dot_html_and_prints_json(tmp_path):
    r = cli("--model", "resnet8", "--input-shape", "2,3,16,16", "--format", "json", "--cost", "size,macs",
            "--out", str(tmp_path / "g.html"), "--out-dot", str(tmp_path / "g.dot"))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"] == "ResNet8" and len(data["groups"]) == 7 and list(data["costs"]) == ["size", "macs"]
    assert data["costs"]["size"] == 8 * 77360                        # every weight at 8 bits
    assert sum(r["cost"]["size"] for r in data["layers"]) == data["costs"]["size"]
    nodes, edges = parse_dot((tmp_path / "g.dot").read_text())
    assert set(nodes) == {n["name"] for n in data["nodes"]} and len(edges) == len(data["edges"])
    assert "<svg" in (tmp_path / "g.html").read_text()
    assert "wrote" in r.stderr and "Traceback" not in r.stderr


def test_cli_on_a_checkpoint_shows_its_choices(tmp_path):
    torch.manual_seed(0)
    sm = fxsearch.convert(resnet8(), (torch.randn(2, 3, 8, 8),))
    choose(sm, 0, [0, 1, 2], 0)
    choose(sm, 3, list(range(8)), 2)
    path = tmp_path / "search.pt"
    fxsearch.save(sm, path, model_ref="resnet8", verify=False)
    r = cli("--checkpoint", str(path), "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "== channel groups (7)" in r.stdout and "== cost per layer" in r.stdout
    group_lines = {line.split()[0]: line for line in r.stdout.split("== channel groups")[1].splitlines()[2:9]}
    assert "8b:13" in group_lines["0"] and "0b:3" in group_lines["0"]
    assert "2b:8" in group_lines["3"] and "8b:24" in group_lines["3"]
    total = re.search(r"^total\s+(\S+)$", r.stdout, re.MULTILINE).group(1)
    assert total == f"{sm.discrete_cost('size'):.6g}"


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_svg_without_graphviz_writes_the_dot_and_says_so(tmp_path, monkeypatch, capsys, quiet):
    """Said under --quiet too: the file asked for is missing."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["--model", "models:PlainChain", "--input-shape", "2,3,8,8", *quiet, "--out",
                 str(tmp_path / "g.svg")]) == 0
    err = capsys.readouterr().err
    assert "Graphviz `dot` is not on PATH" in err and "NOT rendered" in err
    assert (tmp_path / "g.dot").exists() and not (tmp_path / "g.svg").exists()


def test_svg_with_a_dot_binary_is_rendered(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho '<svg>rendered</svg>'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert main(["--model", "models:PlainChain", "--input-shape", "2,3,8,8", "-q", "--out",
                 str(tmp_path / "g.svg")]) == 0
    assert (tmp_path / "g.svg").read_text().strip() == "<svg>rendered</svg>"
    assert parse_dot((tmp_path / "g.dot").read_text())[0]


@pytest.mark.parametrize("args, error", [
    (["--model", "nosuchmodel", "--input-shape", "2,3,8,8"], "error: ConfigError: unknown built-in model (fxsearch.zoo) 'nosuchmodel'"),
    (["--model", "models:NoSuchClass", "--input-shape", "2,3,8,8"], "error: ConfigError: reference"),
    (["--model", "models:PlainChain", "--input-shape", "2,3,8,8", "--cost", "size,nope"],
     "error: ConfigError: unknown cost model 'nope'"),
    (["--checkpoint", "missing.pt"], "error: CheckpointError:"),
])
def test_bad_input_is_a_typed_error_and_writes_nothing(args, error, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert main([*args, "--out", str(out / "g.html"), "--out-dot", str(out / "g.dot")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(error), lines
    assert "package.module:factory" in lines[0] or "nosuchmodel" not in lines[0]   # the way out
    assert os.listdir(out) == []


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --checkpoint --model is required"),
    (["--model", "resnet8"], "no default input shape is known for 'resnet8'"),
    (["--model", "resnet8", "--out", "g.pdf"], "unknown suffix"),
    (["--model", "resnet8", "--format", "xml"], "invalid choice"),
    (["--checkpoint", "a.pt", "--input-shape", "1,3,8,8"], "go with --model"),
])
def test_bad_usage_exits_2(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_missing_output_folder_fails_before_any_work(tmp_path, capsys):
    assert main(["--model", "nosuchmodel", "--out", str(tmp_path / "no" / "g.html")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "ConfigError" in err
