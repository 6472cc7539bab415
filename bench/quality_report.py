"""Tables and plots of the quality study (``python -m bench.quality``), from its runs' logs only.

Reads ``OUT/runs/TASK/VARIANT/seedN/{report.json,metrics.jsonl}`` and, for each task that has
runs, rewrites that task's section of bench/RESULTS.md (between its own markers, so a study of one
task leaves the others' sections as they are) and draws its PNGs: the training loss and the
validation curve of each variant, where the negatives' pull goes during training (with beta and
gamma as logged), and the batch-size curve.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

DIAGNOSTICS = ("effective_negatives", "hard_negative_share", "hard_negative_weight", "positive_cosine",
               "hardest_negative_cosine")


def markers(task_name: str) -> tuple[str, str]:
    return (f"<!-- quality:{task_name}:begin (written by python -m bench.quality) -->",
            f"<!-- quality:{task_name}:end -->")
REPORTED = ("ndcg@10", "recall@100", "mrr@10")
LABELS = {
    "inbatch": "1. InfoNCE, in-batch negatives only",
    "hardneg": "2. + mined hard negatives",
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
        having = sorted((s for s in seeds if key in s["report"].get("after", {})), key=lambda s: s["seed"])
        values = np.array([s["report"]["after"][key] for s in having])
        if len(values):
            out[metric] = dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                               min=float(values.min()), max=float(values.max()), values=values.tolist(),
                               seeds=[s["seed"] for s in having])
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
    paired = ""
    if better[metric].get("seeds") and better[metric].get("seeds") == worse[metric].get("seeds"):
        # The same seed is the same data order (and init): the difference seed by seed.
        differences = np.array(better[metric]["values"]) - np.array(worse[metric]["values"])
        paired = (f"; seed by seed {', '.join(f'{d:+.4f}' for d in differences)} "
                  f"({(differences > 0).sum()} of {len(differences)} above)")
    return f"{gain:+.4f} (largest std {spread:.4f}): {word}{paired}"


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
        model = {"minilm": "all-MiniLM-L6-v2, pretrained",
                 "e5": "multilingual-e5-small, pretrained (4-bit rounded weights; word embeddings frozen)"}.get(
            o["model.path"], f"{o['model.path']}, pretrained")
    else:
        model = (f"BERT from random init, {o['model.random_init.num_hidden_layers']} layers x "
                 f"{o['model.random_init.hidden_size']} hidden, bert-base-chinese vocabulary")
    lr = o["optimizer.learning_rate"]
    return (f"Setup: {model}, {o['model.pooling']} pooling, dropout {'on' if o['model.dropout'] else 'off'}; query/passage "
            f"length {o['data.query_length']}/{o['data.passage_length']}"
            f"{'; prompts ' + repr(o['data.query_prompt']) + ' / ' + repr(o['data.passage_prompt']) if o.get('data.query_prompt') else ''}"
            f"; {task.hard_negatives} of {task.mined} mined hard negatives per query in the variants with them"
            f"; tau {o['loss.temperature']}; AdamW peak LR "
            f"{lr['peak']:g}, {lr['warmup_fraction']:.0%} warmup, {lr['decay']} decay; every run sees "
            f"{task.queries_seen:,} training queries; validation every {task.eval_every_queries:,}; "
            f"reported split: {task.report_split}, never tuned on.")


def task_section(task, runs: dict, start: dict, plots_rel: str) -> list[str]:
    split = task.report_split
    stats = {name: summary(seeds, split) for name, seeds in runs.items()}
    lines = [f"### {task.name}", "", setup_line(task), ""]
    header = (f"| variant | batch | passages / step | steps | {split} nDCG@10 | {split} Recall@100 | {split} MRR@10 "
              "| validation nDCG@10 | seeds | s / run |")
    lines += [header, "|---|---|---|---|---|---|---|---|---|---|"]
    if start:
        lines.append(f"| starting model (no training) | | | 0 | {start.get(f'{split}/ndcg@10', float('nan')):.4f} "
                     f"| {start.get(f'{split}/recall@100', float('nan')):.4f} | {start.get(f'{split}/mrr@10', float('nan')):.4f} "
                     f"| {start.get('validation/ndcg@10', float('nan')):.4f} | | |")
    order = [n for n in LABELS if n in stats] + sorted((n for n in stats if n not in LABELS), key=lambda n: batch_of(n, task))
    for name in order:
        s = stats[name]
        batch = batch_of(name, task)
        label = LABELS.get(name.split("@")[0], name) + (f" (batch {batch})" if "@" in name else "")
        steps = max(task.queries_seen // batch, 1)
        passages = batch * (1 if name == "inbatch" else task.passages_per_query)
        lines.append(f"| {label} | {batch} | {passages:,} | {steps} | {_cell(s, 'ndcg@10')} | {_cell(s, 'recall@100')} | {_cell(s, 'mrr@10')} "
                     f"| {_cell(s, 'validation/ndcg@10')} | {s['seeds']} | {s['train_seconds']:.0f} |")
    lines += ["", "Mean ± sample standard deviation over seeds (a bare figure: one seed). s / run: wall time of the training loop, its "
              "validation evaluations included, the final evaluation not.", "",
              "Claims (difference of mean nDCG@10 on the reported split):", ""]
    for claim, better, worse in (("hard negatives help (2 vs 1)", "hardneg", "inbatch"),
                                 ("progressive weighting helps beyond them (3 vs 2)", "peg", "hardneg")):
        if better in stats and worse in stats:  # a study of the sweep alone has neither
            lines.append(f"- {claim}: {verdict(stats[better], stats[worse])}")
    sweep = sorted((batch_of(n, task), n) for n in stats if n == "peg" or n.startswith("peg@"))
    if len(sweep) > 1:
        small, large = sweep[0], sweep[-1]
        passages = [batch * task.passages_per_query for batch in (small[0], large[0])]
        lines.append(f"- a larger batch helps at the same epochs (batch {large[0]} vs {small[0]}, {passages[1]:,} vs "
                     f"{passages[0]:,} passages a step): {verdict(stats[large[1]], stats[small[1]])}")
    lines += ["", *diagnostics_table(task, runs)]
    lines += ["", f"![{task.name}: training loss and validation curves]({plots_rel}/curves_{task.name}.png)",
              f"![{task.name}: where the negatives' pull goes]({plots_rel}/negatives_{task.name}.png)"]
    if len(sweep) > 1:
        lines.append(f"![{task.name}: reported nDCG@10 against the global batch]({plots_rel}/batch_size_{task.name}.png)")
    return lines + [""]


def late_means(seeds: list[dict], key: str) -> float | None:
    """Mean over seeds of ``key`` over the second half of each run's logged steps."""
    values = []
    for s in seeds:
        rows = [r[key] for r in s["log"] if key in r]
        if rows:
            values.append(np.mean(rows[len(rows) // 2:]))
    return float(np.mean(values)) if values else None


def diagnostics_table(task, runs: dict) -> list[str]:
    """What the loss saw in the second half of training, per variant (runs that logged it)."""
    rows = []
    for name in [n for n in LABELS if n in runs] + sorted((n for n in runs if n not in LABELS), key=lambda n: batch_of(n, task)):
        means = [late_means(runs[name], key) for key in DIAGNOSTICS]
        if means[0] is None:
            continue
        batch = batch_of(name, task)
        label = LABELS.get(name.split("@")[0], name) + (f" (batch {batch})" if "@" in name else "")
        rows.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in means) + " |")
    if not rows:
        return []
    return ["What the loss saw (training log, mean over the second half of each run and over seeds): *effective "
            "negatives* = exp(entropy) of the negatives' share of the softmax denominator, i.e. how many negatives the "
            "gradient really pushes against; *hard-negative share* = the part of that pull on the query's own mined "
            "negatives; *beta's weight on them* = their share of the weights w_ij / N_i (without beta: their count "
            "over all negatives).", "",
            "| variant | effective negatives | hard-negative share | beta's weight on them | positive cosine "
            "| hardest negative cosine |", "|---|---|---|---|---|---|", *rows]


def audit_lines(audit: dict) -> list[str]:
    """The mined negatives that are likely right answers (``bench.quality.audit_mined``)."""
    if not audit.get("negatives"):
        return []
    near, total = audit["of_a_near_duplicate_question"], audit["negatives"]
    return [f"Likely false negatives among the mined ones: {near:,} of {total:,} ({near / total:.1%}) are the labelled "
            f"answer of another train question that asks nearly the same (character-bigram Jaccard >= 0.5 of the "
            f"questions' titles); {audit['queries_with_one']:,} of {audit['queries']:,} training queries "
            f"({audit['queries_with_one'] / audit['queries']:.1%}) have at least one. "
            f"({audit['labelled_for_another_question']:,} are some other question's labelled answer.)", ""]


def write(out: str, tasks: list, results_path: str, plots_dir: str) -> None:
    os.makedirs(plots_dir, exist_ok=True)
    plots_rel = os.path.relpath(plots_dir, os.path.dirname(os.path.abspath(results_path)))
    for task in tasks:
        runs = load_runs(out, task.name)
        if not runs:
            continue
        start_path = os.path.join(out, "runs", task.name, "start.json")
        start = {}
        if os.path.isfile(start_path):
            with open(start_path, encoding="utf-8") as f:
                start = json.load(f)
        audit_path = os.path.join(out, "data", task.name, "false_negatives.json")
        audit = {}
        if os.path.isfile(audit_path):
            with open(audit_path, encoding="utf-8") as f:
                audit = json.load(f)
        begin, end = markers(task.name)
        total = sum(s["report"].get("wall_seconds", 0.0) for seeds in runs.values() for s in seeds)
        lines = [begin, "", *task_section(task, runs, start, plots_rel), *audit_lines(audit),
                 f"Wall time of the {task.name} runs: {total / 60:.0f} min (2-core CPU, one process at a time).", "", end]
        plot_curves(task, runs, os.path.join(plots_dir, f"curves_{task.name}.png"), start)
        plot_negatives(task, runs, os.path.join(plots_dir, f"negatives_{task.name}.png"))
        plot_batch_sizes(task, runs, os.path.join(plots_dir, f"batch_size_{task.name}.png"))
        _replace_section(results_path, task.name, "\n".join(lines))


def _replace_section(path: str, task_name: str, section: str) -> None:
    """The task's section in place; a new one after the last task's section (or at the end, under a
    "Quality study" heading, on a page that has none)."""
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else "# Benchmark results\n"
    begin, end = markers(task_name)
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        ends = list(re.finditer(r"<!-- quality:[^:>]+:end -->", text))
        heading = re.search(r"^## Quality study.*$", text, re.M)
        if ends:
            at = ends[-1].end()
            text = text[:at] + "\n\n" + section + text[at:]
        elif heading:  # at the end of that section, before the next heading
            following = re.compile(r"^## ", re.M).search(text, heading.end())
            at = following.start() if following else len(text)
            text = text[:at].rstrip("\n") + "\n\n" + section + "\n\n" + text[at:]
            text = text.rstrip("\n") + "\n"
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


def plot_negatives(task, runs: dict, path: str) -> None:
    """Effective negatives and the hard negatives' share of the pull over training, per variant,
    and beta / gamma as logged."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    names = [n for n in LABELS if n in runs] + sorted(n for n in runs if n not in LABELS)
    for name in names:
        batch = batch_of(name, task)
        label = LABELS.get(name.split("@")[0], name) + (f" (batch {batch})" if "@" in name else "")
        for ax, key in zip(axes[:2], ("effective_negatives", "hard_negative_share")):
            x, y = _series(runs[name], key, batch)
            if x is not None:
                width = max(len(x) // 20, 1)
                ax.plot(x[width - 1:] if width > 1 else x, _smooth(y, width).mean(0), label=label)
    swept = sorted((n for n in runs if n.startswith("peg@")), key=lambda n: batch_of(n, task))
    scheduled = [n for n in ("peg", "peg_beta1", "peg_beta4") if n in runs] or swept[:1]  # the sweep alone: its first
    for name in scheduled:
        if runs[name][0]["log"]:
            log = [r for r in runs[name][0]["log"] if "beta" in r]
            seen = [r["step"] * batch_of(name, task) for r in log]
            label = LABELS.get(name.split("@")[0], name) + (f" (batch {batch_of(name, task)})" if "@" in name else "")
            axes[2].plot(seen, [r["beta"] for r in log], label=f"beta ({label})")
            if name == scheduled[0]:
                axes[2].plot(seen, [r["gamma"] for r in log], linestyle="--", label="gamma")
    axes[0].set(title=f"{task.name}: effective negatives (exp entropy)", xlabel="training queries seen", yscale="log")
    axes[1].set(title=f"{task.name}: share of the pull on the mined negatives", xlabel="training queries seen")
    axes[2].set(title="beta and gamma as logged", xlabel="training queries seen")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_batch_sizes(task, runs: dict, path: str) -> None:
    points = []
    for name in runs:
        if name == "peg" or name.startswith("peg@"):
            s = summary(runs[name], task.report_split)
            if "ndcg@10" in s:
                points.append((batch_of(name, task), s["ndcg@10"]))
    if len(points) < 2:
        return
    points.sort(key=lambda p: p[0])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["std"] for p in points],
                marker="o", capsize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks([p[0] for p in points], [f"{p[0]}\n({p[0] * task.passages_per_query:,} p.)" for p in points])
    ax.set(title=f"{task.name}: PEG at {task.queries_seen:,} training queries", xlabel="global batch (queries; passages)",
           ylabel=f"{task.report_split} nDCG@10 (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
