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
                   help="run folder written by `lad train vqgan` + `lad train diffusion`, or by `lad train hagan` (the HA-GAN "
                   "baseline: no --sampler/--steps/--guidance) (--run-dir: the same, for torchrun, whose own parser rejects "
                   "--run as an ambiguous abbreviation)")
    p.add_argument("--masks", default=None, help="prepared dataset, folder of NIfTI masks, or folder of .npy masks (public release "
                   "format); required unless --inpaint")
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
    g = p.add_argument_group("tumour synthesis into real CT (instead of --masks; docs/sampling.md)")
    g.add_argument("--inpaint", metavar="CT_DIR", default=None,
                   help="place a tumour into each real window of CT_DIR (a prepared dataset, or NIfTI <id>_image + <id>_mask pairs "
                   "on the model's grid) and fill it by RePaint latent inpainting; the rest of the CT stays real")
    g.add_argument("--tumour", choices=["ellipsoid", "real"], default="ellipsoid",
                   help="ellipsoid: DiffTumor's ellipsoids of a drawn size class; real: tumour masks of CT_DIR's windows, "
                   "flipped and moved into the organ (default ellipsoid)")
    g.add_argument("--tumour-sizes", default="tiny,small,medium,large",
                   help="ellipsoid size classes drawn with equal probability: tiny (4 mm radius), small (8), medium (16), "
                   "large (32); comma-separated (default all four)")
    g.add_argument("--inpaint-cases", choices=["healthy", "all"], default="healthy",
                   help="healthy: only windows without a tumour (default); all: every window")
    g.add_argument("--inpaint-split", choices=["train", "test"], default="train",
                   help="windows of a prepared CT_DIR (default train; test windows are never used for supervised training)")
    g.add_argument("--blend-margin", type=nonneg_int, default=2,
                   help="voxels around the tumour blended linearly into the real CT; beyond them the CT is unchanged (default 2)")
    g.add_argument("--latent-dilation", type=nonneg_int, default=1,
                   help="latent cells the generated region grows by around the (blended) tumour (default 1)")
    g.add_argument("--jump", type=positive_int, default=1, help="RePaint resampling: jump length in steps (default 1)")
    g.add_argument("--resample", type=positive_int, default=1,
                   help="RePaint resampling: times each stretch of --jump steps is denoised (default 1: no resampling)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace a sample folder made with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.sampling.generate import SampleSettings, generate_samples

    if (args.masks is None) == (args.inpaint is None):
        raise ValueError("give either --masks SOURCE (synthetic windows) or --inpaint CT_DIR (tumours into real CT)")
    if args.inpaint is not None:
        return _run_inpaint(args)
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


def _run_inpaint(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.sampling.inpaint import InpaintSettings, generate_inpainted

    if args.quality_check:
        raise ValueError("--quality-check does not apply to --inpaint (every inpainted sample is kept)")
    settings = InpaintSettings(
        n=args.n, tumour=args.tumour, tumour_sizes=tuple(s.strip() for s in args.tumour_sizes.split(",") if s.strip()),
        cases=args.inpaint_cases, split=args.inpaint_split, latent_dilation=args.latent_dilation,
        blend_margin=args.blend_margin, jump=args.jump, resample=args.resample, guidance=args.guidance,
        sampler=args.sampler, steps=args.steps, seed=args.seed, format=args.format,
    )
    summary = generate_inpainted(args.run, args.inpaint, args.out, settings, shard=args.shard, batch_size=args.batch_size,
                                 device=args.device, overwrite=args.overwrite, progress_bar=progress_bar(args))
    if args.preview:
        from lad.sampling.preview import write_preview

        summary["preview"] = str(write_preview(args.out))
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
