"""How the toy ablation's models answer: worked solutions or bare `#### <answer>` guesses.

With `shortcut_fraction` > 0 the toy gold mixes both styles (see irpo_pl/tasks/toy.py).
For every model a sweep of benchmarks/toy_ablation.py trained (warm start, then each
method's iterations), this reads the greedy test answers its evaluation saved
(`iteration_<t>/test_completions`) and counts, per style, how many answers there are
and how many are right. Writes answer_styles.json and answer_styles.md into --out.

    python benchmarks/toy_answer_styles.py --out docs/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from datasets import load_from_disk

from toy_ablation import METHODS, summary


def methods_run(runs: Path, seed: int) -> list[str]:
    """The ablation's methods first, then any other run of this seed (a variant run by hand, say)."""
    found = {p.name.removesuffix(f"_s{seed}") for p in runs.glob(f"*_s{seed}")} - {"warm"}
    return [m for m in METHODS if m in found] + sorted(found - set(METHODS))


def answer_styles(iteration_dir: Path) -> dict:
    """The greedy test answers of one iteration's model: how many show work, and the accuracy of each style."""
    answers = load_from_disk(str(iteration_dir / "test_completions"))
    worked = [not completion.lstrip().startswith("####") for completion in answers["completion"]]
    right = [reward == 1.0 for reward in answers["reward"]]
    worked_right = sum(w and r for w, r in zip(worked, right))
    return {
        "worked_share": sum(worked) / len(answers),
        "worked_accuracy": worked_right / sum(worked) if any(worked) else None,
        "shortcut_accuracy": (sum(right) - worked_right) / (len(answers) - sum(worked)) if not all(worked) else None,
        "accuracy": sum(right) / len(answers),
    }


def percent(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{100 * statistics.mean(known):.1f}" if known else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    runs = args.out / "runs"
    seeds = sorted(int(p.name.removeprefix("warm_s")) for p in runs.glob("warm_s*"))
    if not seeds:
        parser.error(f"no warm_s* run directories under {runs}: run benchmarks/toy_ablation.py --out {args.out} first")
    styles: dict = {}
    for seed in seeds:
        warm = answer_styles(runs / f"warm_s{seed}" / "iteration_0")
        for method in methods_run(runs, seed):
            run_dir = runs / f"{method}_s{seed}"
            # The iterations the run's summary lists (after the warm start it reused), as the ablation reads them.
            per_iteration = [warm] + [answer_styles(run_dir / f"iteration_{row['iteration']}") for row in summary(run_dir)[1:]]
            styles.setdefault(method, []).append(per_iteration)
            print(f"seed {seed} {method}: worked share " + " / ".join(f"{100 * s['worked_share']:.1f}" for s in per_iteration), flush=True)
    (args.out / "answer_styles.json").write_text(json.dumps({"seeds": seeds, "styles": styles}, indent=2))
    iterations = max(len(runs_of_seed) for per_seed in styles.values() for runs_of_seed in per_seed)
    lines = [
        f"# Toy ablation: how the models answer (greedy, {summary(runs / f'warm_s{seeds[0]}')[0]['test_questions']} test questions, mean over seeds {seeds})",
        "",
        "Each cell: share of answers that show work / accuracy of those / accuracy of bare `####` answers, %.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| method | " + " | ".join("warm start" if i == 0 else f"iteration {i}" for i in range(iterations)) + " |",
        "|" + "---|" * (iterations + 1),
    ]
    for method, per_seed in styles.items():
        cells = []
        for i in range(iterations):
            rows = [runs_of_seed[i] for runs_of_seed in per_seed if i < len(runs_of_seed)]
            cells.append(" / ".join(percent([r[key] for r in rows]) for key in ("worked_share", "worked_accuracy", "shortcut_accuracy")))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (args.out / "answer_styles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
