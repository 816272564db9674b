"""Mean front over seeds of `python -m fxsearch.search` run directories, and the issue-5
acceptance check (joint search against the uniform baselines).

  python bench/search_seeds.py RUN_DIR [RUN_DIR ...] [--plot front.png] [--title TEXT]

Each RUN_DIR is one seed of the same command. Every run present in all of them is averaged
(test accuracy, weight kB, wall time); the table, the check and the optional plot (the search
command's own plot_front) use the means; the check is repeated per seed. The check: for each uniform baseline, a joint run
with at least its mean accuracy at no more than 70 % of its size (50 % against w8a8).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from fxsearch.search_cli import collect_rows, plot_front

LIMITS = {"w8a8": 0.5}     # size ratio a joint run must reach; others 0.7


def mean_rows(dirs: list[str]) -> list[dict]:
    per_dir = [{(r["kind"], r["name"]): r for r in collect_rows(d, "size")} for d in dirs]
    keys = sorted(set.intersection(*(set(p) for p in per_dir)))
    rows = []
    for key in keys:
        runs = [p[key] for p in per_dir]
        row = dict(runs[0])
        for field in ("accuracy", "_x", "wall_s", "channels_kept"):
            row[field] = statistics.fmean(r[field] for r in runs)
        row["accuracy_each"] = [r["accuracy"] for r in runs]
        rows.append(row)
    return rows


def check(rows: list[dict]) -> list[str]:
    lines, joint = [], [r for r in rows if r["kind"] == "joint"]
    for base in (r for r in rows if r["kind"] == "uniform"):
        limit = LIMITS.get(base["name"], 0.7)
        ok = [j for j in joint if j["accuracy"] >= base["accuracy"] and j["_x"] <= limit * base["_x"]]
        best = max(ok, key=lambda j: (j["accuracy"], -j["_x"]), default=None)
        lines.append(f"{base['name']}: {100 * base['accuracy']:.2f} % at {base['_x']:.1f} kB; need >= that at "
                     f"<= {limit * base['_x']:.1f} kB: " + (
                         f"yes, lambda {best['lambda']:g} ({100 * best['accuracy']:.2f} % at {best['_x']:.1f} kB, "
                         f"{best['_x'] / base['_x']:.0%})" if best else "NO"))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--plot", default=None)
    p.add_argument("--title", default="resnet8 on digits, mean over seeds")
    args = p.parse_args(argv)
    rows = mean_rows(args.dirs)
    print(f"mean over {len(args.dirs)} run directories")
    print(f"{'run':<22} {'test acc. (mean)':>16} {'each':<24} {'kB':>6} {'channels':>8} {'wall s':>7}")
    for r in rows:
        each = " ".join(f"{100 * a:.2f}" for a in r["accuracy_each"])
        print(f"{r['kind'] + ' ' + r['name']:<22} {100 * r['accuracy']:>15.2f}% {each:<24} {r['_x']:>6.1f} "
              f"{r['channels_kept']:>8.0f} {r['wall_s']:>7.0f}")
    for kind in ("joint", "sequential"):
        walls = [r["wall_s"] for r in rows if r["kind"] == kind]
        if walls:
            print(f"{kind}: {len(walls)} runs, {sum(walls):.0f} s in all (mean per seed)")
    print("mean over the seeds:\n  " + "\n  ".join(check(rows)))
    for d in args.dirs:
        print(f"{d} alone:\n  " + "\n  ".join(check(collect_rows(d, "size"))))
    if args.plot:
        plot_front(rows, args.plot, "size", args.title)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
