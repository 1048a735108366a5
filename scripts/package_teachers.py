"""Copy pretrained teachers into the package (float16 safetensors) and write their model card.

Usage: python scripts/package_teachers.py RUN_DIR [--ablation studies/results/teacher_ablation.json]
RUN_DIR holds teacher_p17/33/65.safetensors from `edgestad pretrain-teacher` and their logs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgestad.files import atomic_write_json, sha256_file
from edgestad.methods.uninformed_students.teachers import read_teacher_file
from edgestad.methods.common.checkpoint import save_safetensors

DEST = Path(__file__).resolve().parent.parent / "edgestad" / "teachers"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    DEST.mkdir(parents=True, exist_ok=True)
    index = {}
    for p in (17, 33, 65):
        src = args.run_dir / f"teacher_p{p}.safetensors"
        state, meta = read_teacher_file(src)
        dst = DEST / src.name
        save_safetensors(dst, state, {"edgestad": json.dumps(meta)}, dtype=__import__("torch").float16)
        index[str(p)] = {"file": dst.name, "sha256": sha256_file(dst), "dtype": "float16",
                         "iterations": meta["iterations"], "config": meta["config"],
                         "pretrained_cnn": meta["pretrained_cnn"], "data": meta["data"],
                         "holdout_quality": meta["holdout_quality"],
                         "history": meta["history"]}
    atomic_write_json(DEST / "teachers.json", index)
    print(json.dumps({p: {k: v for k, v in e.items() if k != "history"} for p, e in index.items()},
                     indent=1))


if __name__ == "__main__":
    main()
