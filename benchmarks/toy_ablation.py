"""IRPO against its baselines on the toy task: SFT on gold, STaR, DPO only, IRPO; several seeds.

Per seed, one warm start (iteration 0) is trained and shared by the four methods,
which then run the same loop (`model.objective`) on the same questions per iteration
with the same number of optimizer steps (`--steps` each iteration; methods whose
data is smaller than that cycle over it). Each run is an ordinary run directory,
so a half-done sweep resumes where it stopped. Writes ablation.json, ablation.md
and ablation.png into --out.

    python benchmarks/toy_ablation.py --out docs/results [--seeds 0 1 2 3 4] [--steps 80] [-- more fit overrides]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from irpo_pl.cli import main as irpo_main

METHODS = ("sft", "star", "dpo", "irpo")
# Each method is an objective class (irpo_pl/objectives/).
OBJECTIVES = {"sft": "SFT", "star": "STaR", "dpo": "DPO", "irpo": "IRPO"}
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")


def run(args: list[str]) -> None:
    print("+ python -m irpo_pl fit " + " ".join(args), flush=True)
    irpo_main(["fit", "--config", CONFIG, "--trainer.enable_progress_bar", "false", *args])


def summary(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["iterations"]


CURVE_TAGS = ("train/logps_chosen", "train/logps_rejected", "train/rewards_chosen", "train/rewards_rejected")


def logps_curves(run_dir: Path) -> dict[str, list[float]]:
    """Per-step log-probs and rewards (beta x change in log-prob from the reference) over all iterations of a run."""
    curves: dict[str, list[float]] = {tag: [] for tag in CURVE_TAGS}
    for folder in sorted((run_dir / "tensorboard").glob("iteration_*"), key=lambda p: int(p.name.split("_")[1])):
        if folder.name == "iteration_0":
            continue
        accumulator = EventAccumulator(str(next(folder.glob("events.*"))))
        accumulator.Reload()
        for tag in curves:
            if tag in accumulator.Tags()["scalars"]:
                curves[tag] += [event.value for event in accumulator.Scalars(tag)]
    return curves


def moving_average(values: list[float], width: int = 9) -> list[float]:
    return [statistics.mean(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def mean_spread(values: list[float | None]) -> str:
    if None in values:
        return "not measured"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def write_report(results: dict, out: Path, maj_k: int, command: str) -> None:
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    iterations = len(results["greedy"]["irpo"][0])
    header = "| method | " + " | ".join("warm start" if i == 0 else f"iteration {i}" for i in range(iterations)) + " |"
    lines = [
        "# Toy ablation: greedy test accuracy, %{maj}, mean ± standard deviation over seeds".format(maj=f" (maj@{maj_k} in brackets)" if maj_k else ""),
        "",
        f"Seeds: {results['seeds']}. Test questions: {results['test_questions']}. Command: `{command}`",
        "",
        header,
        "|" + "---|" * (iterations + 1),
    ]
    names = {"sft": "SFT on gold", "star": "STaR", "dpo": "DPO only (alpha 0)", "irpo": "IRPO (alpha 1)"}
    for method in METHODS:
        cells = []
        for i in range(iterations):
            greedy = mean_spread([seed_run[i] for seed_run in results["greedy"][method]])
            maj = mean_spread([seed_run[i] for seed_run in results["maj"][method]])
            cells.append(greedy if maj == "not measured" else f"{greedy} ({maj})")
        lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, warm start → each iteration:", "", "| method | " + " | ".join(f"seed {seed}" for seed in results["seeds"]) + " |", "|" + "---|" * (len(results["seeds"]) + 1)]
    for method in METHODS:
        cells = [" → ".join(f"{100 * a:.1f}" for a in seed_run) for seed_run in results["greedy"][method]]
        lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean over all training steps of beta x (log pi - log pi_ref), chosen / rejected (seed mean ± sd):",
        "",
        "| method | chosen | rejected |",
        "|---|---|---|",
    ]
    for method in ("dpo", "irpo"):
        chosen, rejected = ([statistics.mean(c[tag]) for c in results["curves"][method]] for tag in ("train/rewards_chosen", "train/rewards_rejected"))
        lines.append(f"| {names[method]} | {statistics.mean(chosen):+.3f} ± {statistics.pstdev(chosen):.3f} | {statistics.mean(rejected):+.3f} ± {statistics.pstdev(rejected):.3f} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, logps) = plt.subplots(1, 2, figsize=(12, 4))
    for method in METHODS:
        runs = results["greedy"][method]
        means = [statistics.mean(r[i] for r in runs) for i in range(iterations)]
        accuracy.plot(range(iterations), means, marker="o", label=names[method])
    accuracy.set_xlabel("iteration (0 = warm start)"); accuracy.set_ylabel("greedy test accuracy"); accuracy.legend(); accuracy.grid(alpha=0.3)
    # Raw per-batch log-probs swing with the batch's lengths; the change from the reference does not.
    beta = results["beta"]
    for method, style in (("dpo", "--"), ("irpo", "-")):
        curves = results["curves"][method][0]
        for side, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
            change = [value / beta for value in curves[f"train/rewards_{side}"]]
            logps.plot(moving_average(change), style, color=color, label=f"{names[method]}: {side}")
    logps.axhline(0, color="black", linewidth=0.5)
    logps.set_xlabel("training step (all iterations, seed 0, moving average of 9)")
    logps.set_ylabel("log pi - log pi_ref of the batch")
    logps.legend(); logps.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "ablation.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per iteration, every method")
    parser.add_argument("--maj_k", type=int, default=8, help="samples per question for maj@k of the warm start")
    parser.add_argument("--iteration_maj_k", type=int, default=8, help="the same for every iteration; 0 measures greedy only (maj@k costs k x the sampling)")
    parser.add_argument("extra", nargs="*", help="more overrides for every run, e.g. --model.lr=5e-5")
    args = parser.parse_args()
    runs = args.out / "runs"
    results: dict = {"seeds": args.seeds, "greedy": {m: [] for m in METHODS}, "maj": {m: [] for m in METHODS}, "curves": {"dpo": [], "irpo": []}}
    total, done = len(args.seeds) * (len(METHODS) + 1), 0
    for seed in args.seeds:
        warm = runs / f"warm_s{seed}"
        # The overrides come first, so they cannot undo what makes a run the warm start or a method's run.
        run([*args.extra, "--seed_everything", str(seed), "--run_dir", str(warm), "--iterations", "0", "--data.eval.maj_k", str(args.maj_k)])
        done += 1
        print(f"[ablation] {done}/{total} runs done", flush=True)
        for method in METHODS:
            run_dir = runs / f"{method}_s{seed}"
            run([
                *args.extra, "--seed_everything", str(seed), "--run_dir", str(run_dir), "--model.policy.name_or_path", str(warm / "iteration_0" / "model"),
                "--warm_start.steps", "0", "--model.objective", OBJECTIVES[method], "--trainer.max_steps", str(args.steps),
                "--trainer.max_epochs", "1000", "--data.eval.maj_k", str(args.iteration_maj_k),
            ])
            rows = summary(warm) + summary(run_dir)[1:]
            results["greedy"][method].append([r["test_accuracy"] for r in rows])
            results["maj"][method].append([r.get(f"test_maj@{args.maj_k}") for r in rows])
            if method in results["curves"]:
                results["curves"][method].append(logps_curves(run_dir))
            done += 1
            print(f"[ablation] {done}/{total} runs done", flush=True)
    results["test_questions"] = summary(runs / f"warm_s{args.seeds[0]}")[0].get("test_questions")
    results["beta"] = yaml.safe_load((runs / f"irpo_s{args.seeds[0]}" / "config.yaml").read_text())["model"]["init_args"]["objective"]["init_args"]["beta"]
    write_report(results, args.out, args.maj_k, "python " + " ".join(sys.argv))
    print(f"wrote {args.out / 'ablation.json'}, ablation.md, ablation.png")


if __name__ == "__main__":
    main()
