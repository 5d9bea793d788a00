"""Accuracy against training compute (Koppula et al. 2022: report accuracy in the context of total FLOPs).

Reads any set of run folders (what a training script writes to --out: log.jsonl, summary.json, and eval.json once
eval_linear.py has probed the backbone) and draws k-NN top-1 and online linear top-1 against cumulative training
FLOPs, one line per run, to a PNG; prints the same numbers as Markdown: every monitored point of every run, then
one row per run with its final numbers and, where eval.json exists, the offline linear probe and k-NN.

    python bench/plot_runs.py runs/eq/simclr runs/eq/byol runs/eq/vicreg --png docs/equal_compute.png
    python bench/plot_runs.py runs/eq/*/ --baseline "ResNet-18, random init=runs/eq/random-r18.json"

A baseline (an eval.json of eval_linear.py, e.g. `--ckpt random`) is drawn as a horizontal line at its k-NN top-1
and listed in the table. matplotlib is needed only for the PNG (`pip install matplotlib`), never by the training
scripts; --png '' prints the table alone.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each holds log.jsonl; summary.json and eval.json if there)")
    p.add_argument("--png", default="accuracy_vs_flops.png", help="the figure's path ('' for none)")
    p.add_argument("--baseline", action="append", default=[], help="LABEL=eval.json of a reference (repeatable)")
    p.add_argument("--title", default="", help="the figure's title")
    return p.parse_args(argv)


def read_run(folder):
    """{"name", "points": [(flops, knn_top1, online_top1 or None)], "summary", "network", "eval"} of a run folder."""
    log_path = os.path.join(folder, "log.jsonl")
    if not os.path.exists(log_path):
        raise common.UserError(f"{folder} is not a run folder: it has no log.jsonl")
    points = [  # the epoch records the k-NN monitor wrote
        (record["flops"], record["knn_top1"], record.get("online_top1"))
        for record in common.read_log(log_path)
        if "knn_top1" in record
    ]
    run_args = common.read_args(folder)
    width = run_args.get("width", 1.0)
    return {
        "name": os.path.basename(os.path.normpath(folder)),
        "points": points,
        "summary": common.read_json(os.path.join(folder, "summary.json")) or {},
        "network": run_args.get("arch", "-") + (f" x{width:g}" if width != 1.0 else ""),  # a narrowed ResNet says so
        "eval": common.read_json(os.path.join(folder, "eval.json")),
    }


def read_baseline(spec):
    label, sep, path = spec.rpartition("=")
    if not sep or not label:
        raise common.UserError(f"--baseline {spec!r}: expected LABEL=path/to/eval.json")
    result = common.read_json(path)
    if result is None or "knn_top1" not in result:
        raise common.UserError(f"--baseline {spec!r}: {path} is not an eval.json of eval_linear.py")
    return {"name": label, "eval": result}


def number(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def markdown(runs, baselines):
    """The plotted points, then one row per run (and per baseline) with its final and offline numbers."""
    lines = ["| run | training FLOPs | k-NN top-1 | online top-1 |", "|---|---|---|---|"]
    for run in runs:
        for flops, knn, online in run["points"]:
            lines.append(f"| {run['name']} | {flops:.3g} | {number(knn)} | {number(online)} |")
    lines += [
        "",
        "| run | method | network | steps | training FLOPs | k-NN top-1 | online top-1 | offline k-NN | offline linear |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s, e = run["summary"], run["eval"] or {}
        knn, online = (run["points"][-1][1], run["points"][-1][2]) if run["points"] else (None, None)
        lines.append(
            f"| {run['name']} | {s.get('method', '-')} | {run['network']} | {s.get('steps', '-')} | "
            f"{number(s.get('flops'), '.3g')} | {number(knn)} | {number(online)} | {number(e.get('knn_top1'))} | "
            f"{number(e.get('linear_top1'))} |"
        )
    for baseline in baselines:
        e = baseline["eval"]
        lines.append(
            f"| {baseline['name']} | - | - | - | 0 | - | - | {number(e.get('knn_top1'))} | "
            f"{number(e.get('linear_top1'))} |"
        )
    return "\n".join(lines)


def plot(runs, baselines, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise common.UserError("the figure needs matplotlib: pip install matplotlib (or --png '' for the table)")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, column, what in ((axes[0], 1, "k-NN top-1 (%)"), (axes[1], 2, "online linear top-1 (%)")):
        for run in runs:
            points = [(p[0], p[column]) for p in run["points"] if p[column] is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=run["name"])
        if column == 1:
            for i, baseline in enumerate(baselines):
                color = f"C{(len(runs) + i) % 10}"
                axis.axhline(baseline["eval"]["knn_top1"], linestyle="--", color=color, label=baseline["name"])
        axis.set_xlabel("cumulative training FLOPs")
        axis.set_ylabel(what)
        axis.tick_params(labelleft=True)  # sharey hides the right panel's labels otherwise
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as e:
        raise common.UserError(f"cannot write --png {path}: {e}") from None
    finally:
        plt.close(figure)


def main(argv=None):
    args = get_args(argv)
    runs = [read_run(folder) for folder in args.runs]
    baselines = [read_baseline(spec) for spec in args.baseline]
    print(markdown(runs, baselines))
    if args.png:
        plot(runs, baselines, args.png, args.title)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    common.run(main)
