"""Metric sensitivity at demo sizes: FID / localized FID / MMD of a real phantom set against a second real
set and against degraded copies of it (noise, blur, HU shift, organs removed), with the in-domain
features (``lad features train --preset demo``) and with the untrained (random-init) ResNet-10.

Data made as ``lad demo`` makes it (fewer subjects: 30, the demo uses 150): phantom subjects (128 x 128 at
3 x 3 x 2.5 mm) prepared with the ``demo`` preset (16 x 64 x 64 windows), all windows split by subject
parity into two real sets; the features are trained on the prepared training split (24 windows).
Prints a Markdown table (and one JSON line per row with the machine context) and the CPU seconds per
part. Run: .venv/bin/python benchmarks/bench_metrics_sensitivity.py [--work DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _common import context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="working folder (kept; reused when it holds the data and features)")
    ap.add_argument("--subjects", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lad.data.dataset import PreparedDataset
    from lad.data.phantom import write_phantom_dataset
    from lad.data.prepare import load_prepare_config, prepare_dataset
    from lad.evaluation.crops import max_bounding_box
    from lad.evaluation.ct_features import load_feature_train_config, train_features
    from lad.evaluation.features import FeatureExtractor
    from lad.evaluation.sensitivity import sensitivity_table

    work = Path(args.work or tempfile.mkdtemp(prefix="lad-sensitivity-"))
    cpu = {}
    c0 = time.process_time()
    if not (work / "prepared" / "manifest.json").exists():
        write_phantom_dataset(work / "phantom", args.subjects, args.seed, spacing=(3.0, 3.0, 2.5), size=(128, 128), overwrite=True)
        prepare_dataset("abdomenct1k", work / "phantom", work / "prepared", load_prepare_config("demo"))
    cpu["data"] = time.process_time() - c0
    c0 = time.process_time()
    if not (work / "features" / "model" / "model.safetensors").exists():
        train_features(work / "prepared", work / "features", load_feature_train_config("demo", [f"seed={args.seed}"]), overwrite=True)
    cpu["features train"] = time.process_time() - c0
    ds = PreparedDataset(work / "prepared", split=None)
    patients = sorted({w["patient"] for w in ds.windows})
    half = [[i for i, w in enumerate(ds.windows) if patients.index(w["patient"]) % 2 == p] for p in (0, 1)]
    ref, other = ([ds[i]["image"] for i in h] for h in half)
    organs = [ds[i]["organs"][0] for i in half[1]]
    box = max_bounding_box([ds[i]["mask"][0] for i in range(len(ds))])
    tables = {}
    for name, spec in (("in-domain", str(work / "features")), ("untrained", "random-resnet10")):
        c0 = time.process_time()
        tables[name] = sensitivity_table(ref, other, organs, FeatureExtractor.from_spec(spec), box, seed=args.seed)
        cpu[f"metrics ({name})"] = time.process_time() - c0
        for r in tables[name]:
            print(json.dumps({"bench": "metrics_sensitivity", "features": name, **r, **context()}))
    n_ref, n = tables["in-domain"][0]["n_reference"], tables["in-domain"][0]["n"]
    print(f"\nreal reference N = {n_ref}, compared set N = {n} (demo windows 16 x 64 x 64)\n")
    print("| degradation | strength | FID in-domain | FID untrained | FID loc. in-domain | FID loc. untrained | MMD in-domain | MMD untrained |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b in zip(tables["in-domain"], tables["untrained"]):
        print(f"| {a['degradation']} | {a['strength']:g} | {a['fid']:.4g} | {b['fid']:.4g} | {a['fid_localized']:.4g} | "
              f"{b['fid_localized']:.4g} | {a['mmd']:.4f} | {b['mmd']:.4f} |")
    print("\nCPU seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))


if __name__ == "__main__":
    main()
