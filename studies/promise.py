"""Does a bundle keep its false-reject promise? Promised and delivered good-part rejection over
several trainings of the default, on bottle, screw and magnetic_tile (issue 17, item 6).

    edgestad train DATA --out runs/screw_s0                       # the default, split seed 0
    edgestad train DATA --out runs/screw_s1 --seed 1              # another split and start
    edgestad train DATA --out runs/screw_v20 --val-fraction 0.2   # twice the validation images
    python studies/promise.py runs/screw_s0:screw runs/screw_s1:screw runs/screw_v20:screw ...

For each bundle it runs ``edgestad evaluate BUNDLE DATA --out BUNDLE.eval`` (unless that report
exists; ``--fresh`` re-runs it) and reads back its ``scores.csv`` and the validation scores the
bundle stores. Per training: n validation images, the rank k the threshold sits at, the promise
k/(n+1) and the rate it stays below with 90 % confidence (Beta(k, n+1-k)); delivered: good parts
NG on the test set with its 95 % interval, defective parts NG; and whether the test goods score
like the validation goods at all (Mann-Whitney U, two-sided): if they do not, no rule fitted on
validation goods can keep a promise on them; and the chance that even a perfect rule would show
"delivered ≤ 2× promised" on so few test goods (beta-binomial). ``--include`` tabulates the runs
of an earlier result file beside these. Writes studies/results/promise.{json,md}.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_run import CATEGORIES, data_root  # noqa: E402

OUT = ROOT / "studies" / "results"


def parse_run(spec: str) -> tuple[Path, str]:
    """``BUNDLE:CATEGORY`` → (bundle folder, category); exits naming the argument when the bundle
    is not a trained one or the category is not one of ours."""
    bundle, _, category = spec.rpartition(":")
    if category not in CATEGORIES or not Path(bundle, "manifest.json").is_file():
        sys.exit(f"{spec}: expected BUNDLE:CATEGORY with a trained bundle and one of {sorted(CATEGORIES)}")
    return Path(bundle), category


def evaluate(bundle: Path, data: Path, fresh: bool) -> tuple[Path, str]:
    out = bundle.with_name(bundle.name + ".eval")
    cmd = ["edgestad", "evaluate", str(bundle), str(data), "--out", str(out)]
    if fresh or not (out / "scores.csv").is_file():
        subprocess.run([sys.executable, "-m", "edgestad.cli", *cmd[1:]], check=True,
                       stdout=subprocess.DEVNULL)
    return out, shlex.join(cmd)


def rules(val: np.ndarray, target: float = 0.05) -> dict[str, tuple[float, float]]:
    """Threshold rules from the validation good scores only → (threshold, promised rate):
    the bundle's rank rule, the old normal fit, an extreme-value fit (a generalized Pareto
    distribution on the scores above the validation median, the peaks-over-threshold method,
    extrapolated to the target) and the largest validation score."""
    from statistics import NormalDist
    from scipy.stats import genpareto
    from edgestad.thresholds import rank_threshold
    n = len(val)
    rank = rank_threshold(val, target)
    out = {f"rank@{target:g} (default)": (rank["threshold"], rank["promised"])}
    out[f"normal@{target:g}"] = (float(val.mean() + NormalDist().inv_cdf(1 - target) * val.std(ddof=1)), target)
    base = float(np.median(val))
    excess = val[val > base] - base
    shape, _, scale = genpareto.fit(excess, floc=0.0)
    tail = len(excess) / n                       # share of good scores above the median
    out[f"evt@{target:g}"] = (base + float(genpareto.ppf(1 - target / tail, shape, loc=0.0, scale=scale)), target)
    out["largest"] = (float(val.max()), 1 / (n + 1))
    return out


def one(bundle: Path, category: str, fresh: bool) -> dict:
    from scipy.stats import mannwhitneyu
    from edgestad.thresholds import promise_bound, rate_interval
    data = data_root() / CATEGORIES[category]
    out, command = evaluate(bundle, data, fresh)
    manifest = json.loads((bundle / "manifest.json").read_text())
    thr = manifest["thresholds"]
    rule = thr["rule"]
    val = np.asarray(rule["validation_scores"], np.float64)
    rows = list(csv.DictReader(open(out / "scores.csv")))
    test_good = np.array([float(r["score"]) for r in rows if r["label"] == "0"])
    defective = np.array([float(r["score"]) for r in rows if r["label"] == "1"])
    n, image = len(val), float(thr["image"])
    k = int((val >= image).sum())
    good_ng, bad_ng = int((test_good > image).sum()), int((defective > image).sum())
    metrics = json.loads((out / "metrics.json").read_text())
    lo, hi = rate_interval(good_ng, len(test_good))
    return ideal({
        "bundle": str(bundle), "category": category, "evaluate": command,
        "split": manifest["provenance"]["split"], "train_images": manifest["provenance"]["images"]["train"],
        "au_pro": metrics["au_pro"], "image_auroc": metrics["image_auroc"],
        "n": n, "k": k, "promised": k / (n + 1), "bound_90": promise_bound(k, n),
        "good_ng": good_ng, "good_total": int(len(test_good)),
        "delivered": good_ng / len(test_good), "delivered_95": [lo, hi],
        "defective_ng": bad_ng, "defective_total": int(len(defective)),
        # where the test goods sit in the validation distribution: the share above the largest
        # validation score, and a two-sided rank test of "same distribution"
        "test_good_above_val_max": float((test_good > val.max()).mean()),
        "mann_whitney_p": float(mannwhitneyu(test_good, val, alternative="two-sided").pvalue),
        "val_median": float(np.median(val)), "test_good_median": float(np.median(test_good)),
        "rules": {name: {"threshold": t, "promised": promised,
                         "delivered": float((test_good > t).mean()),
                         "defective_ng": int((defective > t).sum())}
                  for name, (t, promised) in rules(val).items()},
    })


def ideal(row: dict) -> dict:
    """What a perfect rule could show on this test set: were test and validation goods drawn
    alike, the number of the m test goods above the k-th largest of n validation scores is
    beta-binomial(m, k, n + 1 - k); adds the chance that it stays at or below twice the promise."""
    from scipy.stats import betabinom
    n, k, m = row["n"], row["k"], row["good_total"]
    allowed = np.floor(2 * k / (n + 1) * m + 1e-9)
    return {**row, "ideal_within_2x": float(betabinom(m, k, n + 1 - k).cdf(allowed)) if k else float("nan")}


def table(rows: list[dict]) -> str:
    lines = ["| category | training | n | k | promised (90 % bound) | delivered good NG (95 % interval) | "
             "≤ 2× promise by chance alone | defective NG | AU-PRO | image AUROC | "
             "test goods vs validation (Mann-Whitney p) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["delivered_95"]
        lines.append(
            f"| {r['category']} | {Path(r['bundle']).name} (seed {r['split']['seed']}, val "
            f"{r['split']['val_fraction']:g}) | {r['n']} | {r['k']} | {100 * r['promised']:.1f} % "
            f"({100 * r['bound_90']:.1f} %) | {r['good_ng']}/{r['good_total']} = "
            f"{100 * r['delivered']:.1f} % ({100 * lo:.1f}–{100 * hi:.1f} %) | "
            f"{100 * r['ideal_within_2x']:.0f} % | "
            f"{r['defective_ng']}/{r['defective_total']} | {r['au_pro']:.3f} | "
            f"{r['image_auroc']:.3f} | {r['mann_whitney_p']:.3f} |")
    return "\n".join(lines)


def rules_table(rows: list[dict]) -> str:
    names = list(rows[0]["rules"])
    lines = ["| category | training | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{100 * v['promised']:.1f} → {100 * v['delivered']:.1f} %; "
                 f"{v['defective_ng']}/{r['defective_total']}" for v in r["rules"].values()]
        lines.append(f"| {r['category']} | {Path(r['bundle']).name} | " + " | ".join(cells) + " |")
    lines += ["", "(each cell: promised → delivered good parts NG on the test goods; defective parts NG)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="BUNDLE:CATEGORY (category: bottle, screw, magnetic_tile)")
    ap.add_argument("--fresh", action="store_true", help="re-run evaluate even when its report exists")
    ap.add_argument("--name", default="promise", help="results file stem (studies/results/NAME.*)")
    ap.add_argument("--include", action="append", default=[], metavar="JSON",
                    help="also tabulate the runs of an earlier result file of this study (its bundles "
                         "need not exist any more; its command is kept)")
    args = ap.parse_args()
    rows, earlier = [], []
    for path in args.include:
        old = json.loads(Path(path).read_text())
        earlier.append({"command": old["command"], "date_utc": old["date_utc"]})
        rows += [ideal(r) for r in old["runs"]]
    if not args.runs and not args.include:
        ap.error("give at least one BUNDLE:CATEGORY or --include JSON")
    for spec in args.runs:
        bundle, category = parse_run(spec)
        rows.append(one(bundle, category, args.fresh))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    rows.sort(key=lambda r: (r["category"], r["split"]["val_fraction"], Path(r["bundle"]).name))
    md = table(rows) + "\n\nThreshold rules on the same scores, from the validation goods only:\n\n" + rules_table(rows)
    command = "python studies/promise.py " + shlex.join(
        [*args.runs, *(a for path in args.include for a in ("--include", path))])
    result = {"study": "promise", "command": command, "earlier": earlier,
              "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    made = ("; earlier runs: " + "; ".join(f"`{e['command']}` ({e['date_utc']})" for e in earlier)
            if earlier else "")
    (OUT / f"{args.name}.md").write_text(f"`{result['command']}` ({result['date_utc']}){made}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
