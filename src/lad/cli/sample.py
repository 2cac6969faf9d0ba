"""``lad sample``: synthetic CT volumes from (augmented) masks with a trained run."""

from __future__ import annotations

import argparse

from lad.cli._args import finite_float, nonneg_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate synthetic CT volumes from masks (resumable, shardable)",
        description="Generate N synthetic CT volumes with a trained run: Locality Condition Augmentation of the "
        "masks, classifier-free guidance, NIfTI outputs in HU with the masks' geometry, manifest.jsonl. "
        "Re-running the same command resumes; --shard i/k (or torchrun) splits the work.",
    )
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder written by `lad train vqgan` + `lad train diffusion` (--run-dir: the same, for torchrun, "
                   "whose own parser rejects --run as an ambiguous abbreviation)")
    p.add_argument("--masks", required=True, help="prepared dataset, folder of NIfTI masks, or folder of .npy masks (public release format)")
    p.add_argument("--n", "--num-samples", dest="n", type=positive_int, required=True,
                   help="number of samples (--num-samples: the same, for torchrun, whose parser rejects --n as ambiguous)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--augment", choices=["paper", "none"], default="paper", help="Locality Condition Augmentation (default: paper)")
    p.add_argument("--guidance", type=finite_float(-1.0, 100.0), default=None,
                   help="classifier-free guidance weight w of eq. (4) (default: the run's, 1.0 in every preset)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp2m", "euler"], default=None,
                   help="ddpm: ancestral, the paper's; ddim: deterministic (eta 0), ours; dpmpp2m: DPM-Solver++(2M), deterministic, "
                   "ours; euler: for runs trained with diffusion_train.prediction=rectified_flow (the only sampler for them), ours. "
                   "Default: the run's sampling section (RUN/config.yaml): ddpm for the paper presets, ddim for demo and tiny")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="timesteps evenly spaced over the training steps, for every sampler; at most the training steps (more is "
                   "refused); DDPM with fewer is respaced DDPM. Default: the run's (paper presets 300, "
                   "demo and tiny 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--shard", default=None, help="i/k: this process makes samples j with j %% k == i (default: torchrun rank)")
    p.add_argument("--format", choices=["nifti", "npy"], default="nifti", help="npy writes the public release's layout")
    p.add_argument("--quality-check", action=argparse.BooleanOptionalAction, default=False,
                   help="redraw a sample whose median HU inside the organ lies outside the training data's range (not in "
                   "the paper: it selects plausible-looking samples; recorded in the manifest, rejection rate in "
                   "`lad evaluate`'s report; default off)")
    p.add_argument("--max-retries", type=nonneg_int, default=3, help="with --quality-check: redraws of a failing sample (default 3)")
    p.add_argument("--preview", action="store_true", help="also write preview.png (slices 8/16/24 with masks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace a sample folder made with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.sampling.generate import SampleSettings, generate_samples

    settings = SampleSettings(
        n=args.n, augment=args.augment, guidance=args.guidance, sampler=args.sampler, steps=args.steps,
        seed=args.seed, format=args.format, max_retries=args.max_retries, quality_check=args.quality_check,
    )
    summary = generate_samples(args.run, args.masks, args.out, settings, shard=args.shard,
                               batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
                               progress_bar=progress_bar(args))
    if args.preview:
        from lad.sampling.preview import write_preview

        path = write_preview(args.out)
        summary["preview"] = str(path)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
