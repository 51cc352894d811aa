"""The ladder from the 3rd try to the 4th: one change per rung, each rung trained with 3 seeds.

Every rung is a set of overrides of the airbench try (`tries.airbench.*`), so a queued
experiment retrains that try alone. `queue` puts every rung and seed in DVC's queue;
`dvc queue start` runs them; `table` reads `dvc exp show --json` and prints the table:
validation accuracy (mean ± std over seeds) and training seconds per rung.

    python -m experiments.ladder queue [--seeds 0 1 2] [--rungs 0 1 2 3 4 5 6]
    dvc queue start                    # one at a time: rungs run for minutes each, and timings stay fair
    python -m experiments.ladder table # prints a Markdown table
"""

import argparse
import json
import statistics
import subprocess
import sys
from collections import Counter

TRY = "airbench"
PREFIX = "ladder"
SEEDS = (0, 1, 2)
POST_RECIPE = {  # the 3rd try: LeNet_2, Adam, the post's augmentation; every other ingredient off
    "model": "lenet2", "widths": None, "batchnorm_momentum": None, "logit_divisor": None, "whiten_bias_epochs": None,
    "batch_size": 100, "optimizer": "adam",
    "lr": 0.001, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "norm_bias_lr": 1.0, "muon_lr": 0.0,
    "muon_momentum": 0.6, "warmup": 0.0, "lr_start": 1.0, "lr_end": 1.0, "label_smoothing": 0.0, "lookahead": 0.0,
    "augment": True, "flip": False, "translate": 0, "tta": "none",
}  # fmt: skip
# (name, what the rung adds, the keys it changes); each rung keeps the changes of the rungs before it.
RUNGS = [
    ("lenet2_aug", "the 3rd try: LeNet_2, Adam, the post's augmentation", {}),
    ("batchnorm", "+ BatchNorm after each pooled convolution", {"model": "lenet2_bn"}),
    (
        "airbench_net",
        "+ airbench's net (whitening, 2 convolutions per block, GELU)",
        {
            "model": "airbench",
            "widths": [32, 64, 128],
            "batchnorm_momentum": 0.4,
            "logit_divisor": 9,
            "whiten_bias_epochs": 3,
        },
    ),  # fmt: skip
    (
        "sgd_schedule",
        "+ airbench94's SGD-Nesterov, batch 250, warm-up then linear decay, label smoothing 0.2",
        {
            "batch_size": 250,
            "optimizer": "sgd",
            "lr": 0.3662,
            "momentum": 0.85,
            "nesterov": True,
            "weight_decay": 0.00133,
            "norm_bias_lr": 64.0,
            "warmup": 0.23,
            "lr_start": 0.2,
            "lr_end": 0.07,
            "label_smoothing": 0.2,
        },
    ),  # fmt: skip
    (
        "flip_translate",
        "+ alternating flip and 2-pixel translate instead of the post's augmentation",
        {"augment": False, "flip": "alternate", "translate": 2},
    ),  # fmt: skip
    (
        "muon",
        "+ Muon for the filters, airbench94_muon's recipe: batch 500, no warm-up, lr decays to 0",
        {
            "batch_size": 500,
            "lr": 1.656,
            "weight_decay": 0.000604,
            "norm_bias_lr": 16.0,
            "muon_lr": 0.12,
            "warmup": 0.0,
            "lr_start": 1.0,
            "lr_end": 0.0,
        },
    ),  # fmt: skip
    ("tta", "+ test-time flips and shifts (the 4th try)", {"tta": "flip_translate"}),
]


def rung_config(index):
    """The airbench try's keys at rung index: the 3rd try's, with the changes of rungs 1..index."""
    config = dict(POST_RECIPE)
    for _, _, changes in RUNGS[: index + 1]:
        config.update(changes)
    return config


def experiment_name(index, seed):
    return f"{PREFIX}-{index}-{RUNGS[index][0]}-seed{seed}"


def overrides(index, seed):
    """dvc exp run's -S arguments for one rung and seed."""
    settings = {**rung_config(index), "seed": seed}
    # ++ sets a key whether or not the try lists it yet (seed, say); null unsets one (the try then has
    # none, or inherits train's); lists go without spaces, as one argument.
    return [
        arg
        for key, value in settings.items()
        for arg in ("-S", f"++tries.{TRY}.{key}={json.dumps(value, separators=(',', ':'))}")
    ]


def queue(rungs, seeds):
    """Queues each rung and seed, but for those that DVC has queued, running or finished on this commit
    (a second `queue` after a partial run queues only what is missing). Returns the exit status."""
    known = experiment_states(json.loads(exp_show_json()))
    for index in rungs:
        for seed in seeds:
            name = experiment_name(index, seed)
            if known.get(name, "failed") != "failed":
                print(f"skipped {name}: {known[name]} in DVC's experiments (`dvc exp remove {name}` to queue it again)")
                continue
            command = ["dvc", "exp", "run", "--queue", "-n", name, *overrides(index, seed)]
            queued = subprocess.run(command, capture_output=True, text=True)
            if queued.returncode != 0:
                print(f"could not queue {name}: {(queued.stderr or queued.stdout).strip()}", file=sys.stderr)
                return 1
            print(f"queued {name}")
    return 0


def exp_show_json(all_commits=False):
    command = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def experiment_states(shown):
    """{experiment name: queued, running, failed or finished} from `dvc exp show --json` output."""
    states = {}
    for experiment in shown_experiments(shown):
        state = state_of(experiment)
        states[experiment["name"]] = "finished" if state in (None, "success") else state
    return states


def shown_experiments(shown):
    return [experiment for commit in shown for experiment in commit.get("experiments") or [] if experiment.get("name")]


def state_of(experiment):
    """queued, running, success or failed; an experiment run in the workspace has no executor, and succeeded."""
    return (experiment.get("executor") or {}).get("state", "success")


def read_experiments(shown):
    """{experiment name: metrics of the try} from `dvc exp show --json` output, finished experiments only.

    A running experiment is shown with the files of its working copy, which until it finishes are the
    baseline's metrics under the experiment's name.
    """
    found = {}
    for experiment in shown_experiments(shown):
        if state_of(experiment) != "success":
            continue
        for rev in experiment["revs"]:
            metrics = (rev.get("data") or {}).get("metrics") or {}
            result = metrics.get(f"metrics/{TRY}.json", {}).get("data")
            if rev.get("name") and result:
                found.setdefault(rev["name"], result)  # the first listed, where commits repeat a name
    return found


def ladder_rows(found, seeds=SEEDS):
    """One row per rung with every seed finished: name, what it adds, accuracies and seconds per seed."""
    rows = []
    for index, (name, adds, _) in enumerate(RUNGS):
        runs = [found.get(experiment_name(index, seed)) for seed in seeds]
        if all(runs):
            rows.append((index, name, adds, [r["val"]["acc"] for r in runs], [r["seconds"] for r in runs]))
    return rows


def format_table(rows):
    """Markdown rows. Seconds are the fastest seed's: a run can only be slowed by other work on the machine,
    never sped up, and the seeds train the same number of steps."""
    lines = [
        "| rung | change | val. accuracy (%), mean ± std | seeds | training s (fastest seed) |",
        "|---|---|---|---|---|",
    ]
    for index, _, adds, accuracies, seconds in rows:
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        lines.append(
            f"| {index} | {adds} | {statistics.mean(accuracies):.2f} ± {spread:.2f} | "
            f"{', '.join(f'{a:.2f}' for a in accuracies)} | {min(seconds):.0f} |"
        )
    return "\n".join(lines)


def table(seeds, all_commits=False):
    """Prints the table of the experiments based on the current commit, or on any commit (all_commits)."""
    shown = json.loads(exp_show_json(all_commits))
    names = Counter(experiment["name"] for experiment in shown_experiments(shown))
    repeated = sorted(name for name, count in names.items() if count > 1 and name.startswith(f"{PREFIX}-"))
    if repeated:
        print(f"on more than one commit: {', '.join(repeated)}; the table takes the first `dvc exp show` lists",
              file=sys.stderr)  # fmt: skip
    rows = ladder_rows(read_experiments(shown), seeds)
    if not rows:
        where = "any commit" if all_commits else "this commit (--all-commits looks at every commit's)"
        print(
            f"no rung has all of seeds {list(seeds)} finished among the experiments of {where}; see "
            "`dvc queue status`, and --seeds for the seeds you ran",
            file=sys.stderr,
        )
        return 1
    print(format_table(rows))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.ladder", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["queue", "table"], help="queue the rungs' experiments, or tabulate them")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds per rung (default: 0 1 2)")
    parser.add_argument("--rungs", type=int, nargs="+", default=list(range(len(RUNGS))), choices=range(len(RUNGS)),
                        help="rungs to queue (default: all)")  # fmt: skip
    parser.add_argument("--all-commits", action="store_true",
                        help="table: read the experiments of every commit, not only the current one's")  # fmt: skip
    args = parser.parse_args(argv)
    if args.action == "queue":
        return queue(args.rungs, args.seeds)
    return table(args.seeds, args.all_commits)


if __name__ == "__main__":
    sys.exit(main())
