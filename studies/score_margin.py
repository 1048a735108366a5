"""Should the image score ignore the frame's edge? (``score_margin``, issue 17: decisions.)

    python studies/score_margin.py runs/screw:screw runs/bottle:bottle runs/mt:magnetic_tile \\
        --margin 4 --margin 8

On screw a few good parts score highest at the very edge of the frame (a darker image corner
that 2 of 320 training images show, and the CNN's padding), and such a part is rejected although
nothing is wrong with the screw. For each trained bundle (the default, ``edgestad train DATA
--out B``) and each margin M, the same weights with ``score_margin=M`` and everything fitted after
training fitted again on the bundle's own validation split (``studies/refit.py``) → ``B_m{M}``;
then every bundle, the original (M = 0) included, is judged as in ``studies/promise.py``
(``edgestad evaluate``; AU-PRO, image AUROC, promised and delivered good NG, defective NG at the
bundle's own thresholds). Writes studies/results/score_margin.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from promise import OUT, one, parse_run, table  # noqa: E402
from refit import refit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="BUNDLE:CATEGORY (category: bottle, screw, magnetic_tile)")
    ap.add_argument("--margin", type=int, action="append", required=True, help="pixels (repeat)")
    ap.add_argument("--name", default="score_margin", help="results file stem (studies/results/NAME.*)")
    args = ap.parse_args()
    rows = []
    for spec in args.runs:
        bundle, category = parse_run(spec)
        base = json.loads((bundle / "manifest.json").read_text())["method_config"].get("score_margin", 0)
        for margin in [base, *(m for m in args.margin if m != base)]:
            target = bundle if margin == base else bundle.with_name(f"{bundle.name}_m{margin}")
            if not (target / "manifest.json").is_file():
                refit(bundle, target, {"score_margin": margin})
            row = one(target, category, fresh=False)
            row["score_margin"] = margin
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    lines = ["| category | training | score margin | image AUROC | defective NG | good NG (promised) | AU-PRO |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['category']} | {Path(r['bundle']).name} | {r['score_margin']} px | "
                     f"{r['image_auroc']:.3f} | {r['defective_ng']}/{r['defective_total']} | "
                     f"{r['good_ng']}/{r['good_total']} ({100 * r['promised']:.1f} %) | {r['au_pro']:.3f} |")
    command = "python studies/score_margin.py " + shlex.join(
        [*args.runs, *(a for m in args.margin for a in ("--margin", str(m)))])
    result = {"study": "score_margin", "command": command,
              "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    md = "\n".join(lines) + "\n\nIn full (as studies/promise.py):\n\n" + table(rows)
    (OUT / f"{args.name}.md").write_text(f"`{command}` ({result['date_utc']})\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
