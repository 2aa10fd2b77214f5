"""`lineguard bench train`: the learning curve on real data, as operators would label a new product.

Per seed: K references from train/good; the test images in a seeded order; the first N of them are
revealed (labelled) for each N in `labels`, and every N is evaluated on the same remaining images (those
after the largest N), so the rows differ only in what was learned. N = 0 is the references-only model.

    lineguard bench train --data ../shared/datasets/mpdd/metal_plate --shots 1 --labels 10,20,50 --json
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from inference import eval as evaluation
from inference import metrics
from training.learn import Labelled, LearnConfig, learn, score_with, verdict_report

KEYS = ("balanced_accuracy", "best_balanced_accuracy", "threshold_gap", "recall", "false_alarm_rate",
        "train_seconds")


def learning_curve(root: Path, shots: int = 1, labels: tuple[int, ...] = (10, 20, 50), seeds: int = 3,
                   encoder: str = "efficientnet-lite0", config: LearnConfig | None = None, model=None) -> dict:
    root = Path(root)
    train = evaluation.list_images(root / "train" / "good")
    tests = evaluation.test_set(root)
    images = [evaluation.read_image(t.path) for t in tests]
    truth = np.array([t.defect_type != "good" for t in tests])
    model = model or evaluation.build_model(encoder)
    product = root.name
    counts = (0, *sorted(set(labels)))
    if counts[-1] >= len(tests):
        raise ValueError(f"{counts[-1]} labels asked, {root}/test has {len(tests)} images")
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(train), shots, replace=False))
        model.set_references(product, [evaluation.read_image(train[i]) for i in chosen])
        order = rng.permutation(len(tests))
        held = order[counts[-1]:]
        for n in counts:
            started = time.perf_counter()
            revealed = [Labelled(images[i], bool(truth[i])) for i in order[:n]]
            candidate = learn(model, product, revealed, config, seed=seed)
            seconds = time.perf_counter() - started
            scores = score_with(model, product, candidate.state, [images[i] for i in held])
            report = verdict_report(truth[held], scores, candidate.state.calibration.threshold)
            runs[n].append({**report, "train_seconds": seconds, "method": candidate.method, "seed": seed,
                            "threshold": candidate.state.calibration.threshold})
    result = {"data": str(root), "product": product, "shots": shots, "seeds": seeds, "evaluated_on": len(held),
              "labels": {}}
    for n, per_seed in runs.items():
        row = {}
        for key in KEYS:
            row[key], row[f"{key}_std"] = metrics.mean_std([r[key] for r in per_seed])
        row["per_seed"] = per_seed
        result["labels"][str(n)] = row
    return result


# --- BENCHMARKS.md section "training" ----------------------------------------------------------------------

SECTION_LABELS = (10, 20, 50)


def markdown_section(root: Path | None = None, shots: int = 1, seeds: int = 3) -> str:
    """The learning curve on every development category found under `root`, as a Markdown section."""
    from bench.model import DEV_CATEGORIES, datasets_root
    from bench.report import machine

    root = Path(root) if root is not None else datasets_root()
    header = "## Learning from labels (training/learn.py)\n\n"
    found = [c for c in DEV_CATEGORIES if (root / c / "test").is_dir()]
    if not found:
        return header + f"Skipped: none of {', '.join(DEV_CATEGORIES)} under `{root}` (set `LINEGUARD_DATASETS_DIR`).\n"
    started = time.perf_counter()
    model = evaluation.build_model()
    results = {c: learning_curve(root / c, shots=shots, labels=SECTION_LABELS, seeds=seeds, model=model) for c in found}
    minutes = (time.perf_counter() - started) / 60
    rows = ["| category | labels N | balanced acc. | best balanced acc. | gap | recall | false alarms | train s |",
            "|---|---|---|---|---|---|---|---|"]
    checks = ["| target (K = 1, N = 20) | category | measured | met |", "|---|---|---|---|"]
    for category, result in results.items():
        for n, row in result["labels"].items():
            rows.append(f"| {category} | {n}{' (baseline: references only)' if n == '0' else ''} | "
                        + " | ".join(f"{row[k]:.1f} ± {row[k + '_std']:.1f}" for k in KEYS) + " |")
        base, twenty = result["labels"]["0"], result["labels"]["20"]
        checks.append(f"| threshold_gap ≤ 3 | {category} | {twenty['threshold_gap']:.1f} | "
                      f"{'yes' if twenty['threshold_gap'] <= 3 else 'no'} |")
        if base["threshold_gap"] > 10:
            gain = twenty["balanced_accuracy"] - base["balanced_accuracy"]
            checks.append(f"| gain ≥ 10 over N = 0 (gap {base['threshold_gap']:.1f} > 10) | {category} | {gain:.1f} | "
                          f"{'yes' if gain >= 10 else 'no'} |")
    labels = ",".join(map(str, SECTION_LABELS))
    return (header
            + f"Machine: {machine(threads=True)}. Whole section: {minutes:.1f} min. "
              f"Command, per category: `lineguard bench train "
              f"--data {root}/<category> --shots {shots} --labels {labels} --seeds {seeds} --json`. Each seed draws "
              f"{shots} reference(s) and an order of the test images; the first N are labelled (frames labelled good "
              "join the memory, the threshold is re-derived from the labelled scores), and every N is evaluated on "
              "the same remaining images. The baseline is N = 0, measured in the same run.\n\n"
            + "\n".join(rows) + "\n\n" + "\n".join(checks) + "\n")


# --- BENCHMARKS.md section "lvlm" ------------------------------------------------------------------------

def lvlm_benchmark(steps: int = 240, simulated: int = 320, held_out: int = 160, llm: str | None = None,
                   seed: int = 0) -> dict:
    """Train the LVLM adapters on `simulated` parts and measure, with the facts withheld, the LLM's own answers
    on `held_out` other parts before and after (training/lvlm.py)."""
    from inference.model.lvlm import AnomalyLVLM, LvlmConfig
    from inference.scorer import build_scorer
    from training.lvlm import LvlmTrainConfig, measure, simulated_samples, train_adapters

    started = time.perf_counter()
    model = build_scorer(text=False)
    lvlm = AnomalyLVLM(LvlmConfig(llm=llm), model.encoder.embed_dim, device=model.device)
    data = simulated_samples(model, simulated + held_out, seed=seed, map_size=lvlm.config.map_size)
    train_set, test_set = data[:simulated], data[simulated:]
    config = LvlmTrainConfig(steps=steps, seed=seed)
    before = measure(lvlm, test_set, config.max_new_tokens)
    trained_at = time.perf_counter()
    losses = train_adapters(lvlm, train_set, config)
    seconds = time.perf_counter() - trained_at
    after = measure(lvlm, test_set, config.max_new_tokens)
    flagged = sum(s.verdict.is_anomalous for s in test_set)
    return {"before": before, "after": after, "train_seconds": round(seconds, 1), "steps": steps,
            "batch": config.batch, "simulated": simulated, "held_out": held_out, "held_out_flagged": flagged,
            "loss_first": round(float(np.mean(losses[:10])), 3), "loss_last": round(float(np.mean(losses[-10:])), 3),
            "device": str(model.device), "minutes": round((time.perf_counter() - started) / 60, 1)}


def lvlm_section(result: dict | None = None, steps: int = 240) -> str:
    from bench.report import machine

    result = result or lvlm_benchmark(steps=steps)
    before, after = result["before"], result["after"]
    flagged, n = result["held_out_flagged"], result["held_out"]
    yes_ok = after["yes_no_accuracy"] >= 90
    pos_ok = after["position_accuracy"] >= 70
    return (
        "## LVLM adapters trained on simulated anomalies (`lineguard bench lvlm`)\n\n"
        f"Machine: {machine(threads=True)} ({result['device']}). Whole section: {result['minutes']:.1f} min. Command: "
        f"`lineguard bench lvlm --steps {result['steps']} --simulated {result['simulated']} --held-out "
        f"{result['held_out']} --json`. The image projection and the prompt learner are trained with the frozen "
        "SmolLM2-135M's cross-entropy on AnomalyGPT's answer sentence, with the verdict's facts withheld from the "
        f"prompt ({result['steps']} steps of {result['batch']} answers, half Yes). Measured on "
        f"{result['held_out']} other simulated parts ({result['held_out_flagged']} flagged by the verdict): the "
        "LLM's own greedy answers to \"Is there any anomaly in the image?\", no guard, facts withheld. The "
        "baseline is the untrained adapters, measured in the same run.\n\n"
        "| adapters | Yes/No agreement with the verdict | position accuracy (flagged frames) | training |\n"
        "|---|---|---|---|\n"
        f"| untrained (baseline) | {before['yes_no_accuracy']:.1f} % | {before['position_accuracy']:.1f} % | - |\n"
        f"| trained | {after['yes_no_accuracy']:.1f} % | {after['position_accuracy']:.1f} % | "
        f"{result['train_seconds']:.0f} s (loss {result['loss_first']:.2f} → {result['loss_last']:.2f}) |\n\n"
        f"Untrained, the LLM answers neither Yes nor No (it describes the image), hence 0 %; always answering "
        f"the majority class would agree on {100 * max(flagged, n - flagged) / n:.1f} %.\n\n"
        f"Targets: Yes/No ≥ 90 %: {'met' if yes_ok else '**missed**'}; position ≥ 70 %: "
        f"{'met' if pos_ok else '**missed**'}. Sample answers after training: "
        + "; ".join(f"\"{a}\"" for a in after["examples"]) + "\n")
