"""The quality study's configs and its report: what a reader of bench/RESULTS.md relies on."""

import json
import os

import pytest

from bench import quality, quality_report
from pegjax import schedules, train


def _paths(tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"] * 5}) + "\n")
    return {"train": str(train_file), "validation": f"{tmp_path}:validation", "report": f"{tmp_path}:test"}


@pytest.mark.parametrize("task", sorted(quality.TASKS))
def test_variants_differ_only_in_what_they_claim(task, tmp_path):
    """Same data, model and budget; the in-batch variant has no hard negatives and no
    progressive weights, hardneg adds the negatives only, peg adds the schedules."""
    paths = _paths(tmp_path)
    configs = {v: quality.config_of(quality.Run(quality.TASKS[task], v, quality.TASKS[task].batch, 1), paths)
               for v in quality.GROUPS["core"]}
    for config in configs.values():
        train.check(config)
        assert config.seed == 1 and config.data.train_files == paths["train"]
    assert configs["inbatch"].data.hard_negatives == 0
    assert configs["hardneg"].data.hard_negatives == quality.TASKS[task].hard_negatives > 0
    steps = configs["peg"].train.steps
    for name in ("inbatch", "hardneg"):
        beta = schedules.knob(configs[name].progressive.beta, "beta")
        gamma = schedules.knob(configs[name].progressive.gamma, "gamma")
        assert float(beta(0)) == float(beta(steps)) == 0.0 and float(gamma(0)) == float(gamma(steps)) == 0.0
    beta = schedules.knob(configs["peg"].progressive.beta, "beta")
    gamma = schedules.knob(configs["peg"].progressive.gamma, "gamma")
    assert (float(beta(0)), float(beta(steps)), float(gamma(0)), float(gamma(steps))) == (0.0, 2.0, 1.0, 0.0)
    plain = {k: v for k, v in configs["peg"].to_dict().items() if k not in ("progressive",)}
    assert plain == {k: v for k, v in configs["hardneg"].to_dict().items() if k not in ("progressive",)}


def test_batch_sweep_keeps_the_epochs(tmp_path):
    task = quality.TASKS["scifact"]
    runs = [quality.Run(task, "peg", batch, 0) for batch in task.sweep]
    configs = [quality.config_of(run, _paths(tmp_path)) for run in runs]
    assert {c.train.queries_per_step * c.train.steps for c in configs} == {task.queries_seen}
    names = [run.name for run in quality.plan(["scifact"], [0], ["sweep"])]
    assert names == [f"peg@{b}" for b in task.sweep if b != task.batch]
    assert [run.name for run in quality.plan(["scifact"], [0], ["sweep"], sweep=[16, 171])] == ["peg@171"]


def _fake_run(out, task, name, seed, ndcg, split="test"):
    folder = os.path.join(out, "runs", task, name, f"seed{seed}")
    os.makedirs(folder)
    after = {f"{split}/ndcg@10": ndcg, f"{split}/recall@100": 0.9, f"{split}/mrr@10": ndcg - 0.05,
             "validation/ndcg@10": ndcg + 0.01}
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump({"after": after, "train_seconds": 10.0, "wall_seconds": 12.0}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in range(1, 21):
            row = {"step": step, "unweighted_loss": 2.0 / step, "beta": 0.1 * step, "gamma": 1 - step / 20,
                   "effective_negatives": 100.0 - step, "hard_negative_share": 0.01 * step,
                   "hard_negative_weight": 0.05, "positive_cosine": 0.8, "hardest_negative_cosine": 0.7}
            if step % 10 == 0:
                row["validation/ndcg@10"] = ndcg * step / 20
            f.write(json.dumps(row) + "\n")


def test_report_tables_verdicts_and_plots(tmp_path):
    out = str(tmp_path / "out")
    for seed, (a, b, c) in enumerate([(0.50, 0.60, 0.61), (0.52, 0.61, 0.59), (0.51, 0.62, 0.60)]):
        _fake_run(out, "scifact", "inbatch", seed, a)
        _fake_run(out, "scifact", "hardneg", seed, b)
        _fake_run(out, "scifact", "peg", seed, c)
        _fake_run(out, "scifact", "peg@8", seed, c - 0.1)
    os.makedirs(os.path.join(out, "data", "scifact"))
    with open(os.path.join(out, "data", "scifact", "false_negatives.json"), "w") as f:
        json.dump({"queries": 700, "negatives": 3500, "labelled_for_another_question": 40,
                   "of_a_near_duplicate_question": 35, "queries_with_one": 30}, f)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept text\n")
    plots = tmp_path / "plots"
    quality_report.write(out, [quality.TASKS["scifact"]], str(results), str(plots))
    page = results.read_text()
    assert page.startswith("# Benchmark results\n\nkept text\n")
    assert "| 1. InfoNCE, in-batch negatives only | 16 | 16 | 20 | 0.5100 ± 0.0100 |" in page
    assert "| 3. + progressive weighting (PEG) | 16 | 96 | 20 | 0.6000 ± 0.0100 |" in page
    assert ("hard negatives help (2 vs 1): +0.1000 (largest std 0.0100): **holds**: every seed above every seed of "
            "the other; seed by seed +0.1000, +0.0900, +0.1100 (3 of 3 above)") in page
    assert "progressive weighting helps beyond them (3 vs 2): -0.0100 (largest std 0.0100): **not shown**" in page
    assert "(batch 16 vs 8, 96 vs 48 passages a step): +0.1000" in page
    # The diagnostics: means over the second half of the logged steps (steps 11-20) and the seeds.
    assert "| 3. + progressive weighting (PEG) | 84.500 | 0.155 | 0.050 | 0.800 | 0.700 |" in page
    assert "35 of 3,500 (1.0%) are the labelled answer of another train question" in page
    for name in ("curves_scifact.png", "negatives_scifact.png", "batch_size_scifact.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG"
    quality_report.write(out, [quality.TASKS["scifact"]], str(results), str(plots))  # rewrites, never appends
    assert results.read_text() == page


def test_the_mined_negatives_audit_finds_another_questions_answer_to_the_same_question(tmp_path):
    """Two train questions with the same title: each one's answer, mined as the other's negative, is a
    likely false negative; an unrelated question's answer is not."""
    source = tmp_path / "data"
    (source / "qrels").mkdir(parents=True)
    questions = [("q1", "高血压能吃党参吗", "高血压患者能吃党参吗？"), ("q2", "血压高可以喝党参水吗", "高血压患者能吃党参吗？"),
                 ("q3", "感冒发烧怎么办", "感冒发烧怎么办？")]
    (source / "queries.jsonl").write_text("".join(
        json.dumps({"_id": q, "text": text, "metadata": {"title": title}}, ensure_ascii=False) + "\n" for q, text, title in questions))
    (source / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "title": "", "text": text}, ensure_ascii=False) + "\n"
        for d, text in (("d1", "可以吃党参"), ("d2", "党参可以降血压"), ("d3", "多喝水休息"))))
    (source / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\n")
    mined = tmp_path / "mined.jsonl"
    mined.write_text(json.dumps({"query": "高血压能吃党参吗", "pos": ["可以吃党参"], "neg": ["党参可以降血压", "多喝水休息"]},
                                ensure_ascii=False) + "\n")
    assert quality.audit_mined(str(mined), source) == {
        "queries": 1, "negatives": 2, "labelled_for_another_question": 2, "of_a_near_duplicate_question": 1,
        "queries_with_one": 1}


def test_a_study_of_one_task_leaves_the_other_tasks_sections(tmp_path):
    out = str(tmp_path / "out")
    for seed in range(3):
        _fake_run(out, "scifact", "peg", seed, 0.6 + seed / 100)
        _fake_run(out, "medical_zh", "peg", seed, 0.3 + seed / 100, split="heldout")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Quality study\n\nprose\n\n## Later section\n\ntail\n")
    plots = str(tmp_path / "plots")
    quality_report.write(out, [quality.TASKS["scifact"], quality.TASKS["medical_zh"]], str(results), plots)
    both = results.read_text()
    assert both.index("quality:scifact:end") < both.index("quality:medical_zh:begin")
    scifact = both[both.index("quality:scifact:begin"):both.index("quality:scifact:end")]
    for seed in range(3):  # scifact's runs move on; a study of medical_zh alone must not touch its section
        with open(os.path.join(out, "runs", "scifact", "peg", f"seed{seed}", "report.json"), "w") as f:
            json.dump({"after": {"test/ndcg@10": 0.1}, "train_seconds": 1.0}, f)
    quality_report.write(out, [quality.TASKS["medical_zh"]], str(results), plots)
    after = results.read_text()
    assert scifact in after and after.endswith("## Later section\n\ntail\n")
    assert after.count("quality:medical_zh:begin") == 1
