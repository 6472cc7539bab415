"""Tables and plots of the quality study (``python -m bench.quality``), from its runs' logs only.

Reads ``OUT/runs/TASK/VARIANT/seedN/{report.json,metrics.jsonl}``, rewrites the section between
the quality markers of bench/RESULTS.md, and draws PNGs: per task the training loss and the
validation curve of each variant, the beta / gamma schedules as logged, and the batch-size curve.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

BEGIN, END = "<!-- quality:begin (written by python -m bench.quality) -->", "<!-- quality:end -->"
REPORTED = ("ndcg@10", "recall@100", "mrr@10")
LABELS = {
    "inbatch": "1. InfoNCE, in-batch negatives only",
    "hardneg": "2. + 5 mined hard negatives",
    "peg": "3. + progressive weighting (PEG)",
    "peg_beta_only": "beta 0->2 only (gamma = 0)",
    "peg_gamma_only": "gamma 1->0 only (beta = 0)",
    "peg_beta1": "beta 0->1, gamma 1->0",
    "peg_beta4": "beta 0->4, gamma 1->0",
}


def load_runs(out: str, task: str) -> dict[str, list[dict]]:
    """{run name: [{"seed", "report", "log": [metrics rows]}, ...]} of the finished runs."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "runs", task, "*", "seed*", "report.json"))):
        folder = os.path.dirname(path)
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        log = []
        metrics_path = os.path.join(folder, "metrics.jsonl")
        if os.path.isfile(metrics_path):
            with open(metrics_path, encoding="utf-8") as f:
                log = [json.loads(line) for line in f if line.strip()]
        name = os.path.basename(os.path.dirname(folder))
        runs.setdefault(name, []).append({"seed": int(os.path.basename(folder)[4:]), "report": report, "log": log})
    return runs


def batch_of(name: str, task) -> int:
    return int(name.split("@")[1]) if "@" in name else task.batch


def summary(seeds: list[dict], split: str) -> dict:
    """Mean, sample std, min and max over seeds of each reported metric, and timing."""
    out = {"seeds": len(seeds)}
    for metric in REPORTED + ("validation/ndcg@10",):
        key = metric if "/" in metric else f"{split}/{metric}"
        values = np.array([s["report"]["after"][key] for s in seeds if key in s["report"].get("after", {})])
        if len(values):
            out[metric] = dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                               min=float(values.min()), max=float(values.max()), values=values.tolist())
    out["train_seconds"] = float(np.mean([s["report"].get("train_seconds", np.nan) for s in seeds]))
    return out


def verdict(better: dict, worse: dict, metric: str = "ndcg@10") -> str:
    """A gain counts when it is larger than the spread: the seeds' ranges do not overlap."""
    if metric not in better or metric not in worse:
        return "not run"
    gain = better[metric]["mean"] - worse[metric]["mean"]
    spread = max(better[metric]["std"], worse[metric]["std"])
    seeds = min(len(better[metric]["values"]), len(worse[metric]["values"]))
    if seeds < 3:
        word = f"**undecided**: {seeds} seed(s), 3 needed"
    elif better[metric]["min"] > worse[metric]["max"]:
        word = "**holds**: every seed above every seed of the other"
    elif worse[metric]["min"] > better[metric]["max"]:
        word = "**reversed**: every seed below every seed of the other"
    else:
        word = "**not shown**: the seeds' ranges overlap"
    return f"{gain:+.4f} (largest std {spread:.4f}): {word}"


def _cell(stats: dict, metric: str) -> str:
    if metric not in stats:
        return "-"
    s = stats[metric]
    if len(s["values"]) < 2:
        return f"{s['mean']:.4f}"  # one seed: no spread to show
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def setup_line(task) -> str:
    o = task.overrides
    if o["model.path"]:
        model = f"{o['model.path']} (pretrained)"
    else:
        model = (f"BERT from random init, {o['model.random_init.num_hidden_layers']} layers x "
                 f"{o['model.random_init.hidden_size']} hidden, bert-base-chinese vocabulary")
    lr = o["optimizer.learning_rate"]
    return (f"Setup: {model}, {o['model.pooling']} pooling, dropout {'on' if o['model.dropout'] else 'off'}; query/passage "
            f"length {o['data.query_length']}/{o['data.passage_length']}; tau {o['loss.temperature']}; AdamW peak LR "
            f"{lr['peak']:g}, {lr['warmup_fraction']:.0%} warmup, {lr['decay']} decay; every run sees "
            f"{task.queries_seen:,} training queries; validation every {task.eval_every_queries:,}; "
            f"reported split: {task.report_split}, never tuned on.")


def task_section(task, runs: dict, start: dict, plots_rel: str) -> list[str]:
    split = task.report_split
    stats = {name: summary(seeds, split) for name, seeds in runs.items()}
    lines = [f"### {task.name}", "", setup_line(task), ""]
    header = (f"| variant | batch | steps | {split} nDCG@10 | {split} Recall@100 | {split} MRR@10 | validation nDCG@10 "
              "| seeds | s / run |")
    lines += [header, "|---|---|---|---|---|---|---|---|---|"]
    if start:
        lines.append(f"| starting model (no training) | | 0 | {start.get(f'{split}/ndcg@10', float('nan')):.4f} "
                     f"| {start.get(f'{split}/recall@100', float('nan')):.4f} | {start.get(f'{split}/mrr@10', float('nan')):.4f} "
                     f"| {start.get('validation/ndcg@10', float('nan')):.4f} | | |")
    order = [n for n in LABELS if n in stats] + sorted((n for n in stats if n not in LABELS), key=lambda n: batch_of(n, task))
    for name in order:
        s = stats[name]
        batch = batch_of(name, task)
        label = LABELS.get(name.split("@")[0], name) + (f" (batch {batch})" if "@" in name else "")
        steps = max(task.queries_seen // batch, 1)
        lines.append(f"| {label} | {batch} | {steps} | {_cell(s, 'ndcg@10')} | {_cell(s, 'recall@100')} | {_cell(s, 'mrr@10')} "
                     f"| {_cell(s, 'validation/ndcg@10')} | {s['seeds']} | {s['train_seconds']:.0f} |")
    lines += ["", "Mean ± sample standard deviation over seeds (a bare figure: one seed). s / run: wall time of the training loop, its "
              "validation evaluations included, the final evaluation not.", "",
              "Claims (difference of mean nDCG@10 on the reported split):", ""]
    lines.append(f"- hard negatives help (2 vs 1): {verdict(stats.get('hardneg', {}), stats.get('inbatch', {}))}")
    lines.append(f"- progressive weighting helps beyond them (3 vs 2): {verdict(stats.get('peg', {}), stats.get('hardneg', {}))}")
    sweep = sorted((batch_of(n, task), n) for n in stats if n == "peg" or n.startswith("peg@"))
    if len(sweep) > 1:
        small, large = sweep[0], sweep[-1]
        lines.append(f"- a larger batch helps at the same epochs (batch {large[0]} vs {small[0]}): "
                     f"{verdict(stats[large[1]], stats[small[1]])}")
    lines += ["", f"![{task.name}: training loss and validation curves]({plots_rel}/curves_{task.name}.png)", ""]
    return lines


def write(out: str, tasks: list, results_path: str, plots_dir: str) -> None:
    os.makedirs(plots_dir, exist_ok=True)
    plots_rel = os.path.relpath(plots_dir, os.path.dirname(os.path.abspath(results_path)))
    lines, total, all_runs = [BEGIN, ""], 0.0, {}
    for task in tasks:
        runs = load_runs(out, task.name)
        if not runs:
            continue
        all_runs[task.name] = runs
        start_path = os.path.join(out, "runs", task.name, "start.json")
        start = {}
        if os.path.isfile(start_path):
            with open(start_path, encoding="utf-8") as f:
                start = json.load(f)
        lines += task_section(task, runs, start, plots_rel)
        total += sum(s["report"].get("wall_seconds", 0.0) for seeds in runs.values() for s in seeds)
        plot_curves(task, runs, os.path.join(plots_dir, f"curves_{task.name}.png"), start)
    if all_runs:
        plot_schedules(all_runs, os.path.join(plots_dir, "schedules.png"))
        plot_batch_sizes(tasks, all_runs, os.path.join(plots_dir, "batch_size.png"))
        lines += [f"![beta and gamma as logged]({plots_rel}/schedules.png)",
                  f"![reported nDCG@10 against the global batch size]({plots_rel}/batch_size.png)", ""]
    lines += [f"Wall time of all runs: {total / 60:.0f} min (2-core CPU, one process at a time).", "", END]
    _replace_section(results_path, "\n".join(lines))


def _replace_section(path: str, section: str) -> None:
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else "# Benchmark results\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n## Quality study\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# Plots.


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(seeds: list[dict], key: str, batch: int):
    """Queries seen and the per-seed values of ``key`` on the steps that logged it."""
    rows = [[(r["step"] * batch, r[key]) for r in s["log"] if key in r] for s in seeds]
    rows = [r for r in rows if r]
    if not rows:
        return None, None
    length = min(len(r) for r in rows)
    x = np.array([p[0] for p in rows[0][:length]])
    y = np.array([[p[1] for p in r[:length]] for r in rows])
    return x, y


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or y.shape[-1] < width:
        return y
    kernel = np.ones(width) / width
    return np.stack([np.convolve(row, kernel, mode="valid") for row in np.atleast_2d(y)])


def plot_curves(task, runs: dict, path: str, start: dict | None = None) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in LABELS if n in runs] + sorted(n for n in runs if n not in LABELS)
    for name in names:
        batch = batch_of(name, task)
        label = LABELS.get(name.split("@")[0], name) + (f" (batch {batch})" if "@" in name else "")
        x, y = _series(runs[name], "unweighted_loss", batch)
        if x is not None:
            width = max(len(x) // 20, 1)
            smooth = _smooth(y, width).mean(0)
            left.plot(x[width - 1:] if width > 1 else x, smooth, label=label)
        x, y = _series(runs[name], "validation/ndcg@10", batch)
        if x is not None:
            right.plot(x, y.mean(0), marker="o", label=label)
            if y.shape[0] > 1:
                right.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    if start and "validation/ndcg@10" in start:
        right.axhline(start["validation/ndcg@10"], color="grey", linestyle="--", label="starting model")
    left.set(title=f"{task.name}: training loss as optimised (mean of seeds, smoothed)", xlabel="training queries seen",
             ylabel="loss (beta-weighted negatives, no query weights)")
    right.set(title=f"{task.name}: validation nDCG@10 (mean, min-max band)", xlabel="training queries seen",
              ylabel="nDCG@10")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_schedules(all_runs: dict, path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for task_name, runs in all_runs.items():
        for name in ("peg", "peg_beta1", "peg_beta4"):
            if name not in runs or not runs[name][0]["log"]:
                continue
            log = [r for r in runs[name][0]["log"] if "beta" in r]
            steps = [r["step"] / log[-1]["step"] for r in log]  # fraction of the run: tasks differ in length
            axes[0].plot(steps, [r["beta"] for r in log], label=f"{task_name} {name}")
            if name == "peg":
                axes[1].plot(steps, [r["gamma"] for r in log], label=f"{task_name} {name}")
    axes[0].set(title="beta (negative re-weighting), as logged", xlabel="fraction of the run", ylabel="beta")
    axes[1].set(title="gamma (outlier query down-weighting), as logged", xlabel="fraction of the run", ylabel="gamma")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_batch_sizes(tasks: list, all_runs: dict, path: str) -> None:
    plt = _pyplot()
    shown = [t for t in tasks if t.name in all_runs]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 3.5), squeeze=False)
    for ax, task in zip(axes[0], shown):
        runs = all_runs[task.name]
        points = []
        for name in runs:
            if name == "peg" or name.startswith("peg@"):
                s = summary(runs[name], task.report_split)
                if "ndcg@10" in s:
                    points.append((batch_of(name, task), s["ndcg@10"]))
        points.sort()
        if points:
            ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["std"] for p in points],
                        marker="o", capsize=4)
            ax.set_xscale("log", base=2)
            ax.set_xticks([p[0] for p in points], [str(p[0]) for p in points])
        ax.set(title=f"{task.name}: PEG at {task.queries_seen} training queries", xlabel="global batch (queries)",
               ylabel=f"{task.report_split} nDCG@10 (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
