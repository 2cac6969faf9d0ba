"""``lad train vqgan`` and ``lad train diffusion``: the two training stages, one run folder; ``lad train hagan``:
the HA-GAN baseline of Table 1, a run folder of its own."""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared dataset folder (lad prepare)")
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder holding both parts (--run-dir: the same, for torchrun, whose own parser rejects --run "
                   "as an ambiguous abbreviation)")
    p.add_argument("--preset", default="demo", help="paper-abdomenct1k | paper-totalsegmentator | demo | tiny | a YAML file")
    p.add_argument("--variant", choices=["V0", "V1", "V2", "V3", "full"],
                   help="Table 2 ablation (default: the preset's, full): presets of the Locality Loss weight and the "
                   "content / structure switches, under --config and --set")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="a YAML file of config values (some keys, or a whole RUN/config.yaml) over the preset and variant")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set vqgan_train.steps=500 (repeatable; unknown keys are rejected; "
                   "wins over --preset, --variant and --config; the result is saved as RUN/config.yaml)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this part")
    p.add_argument("--overwrite", action="store_true", help="retrain this part from scratch, deleting its outputs")
    p.add_argument("--no-progress", action="store_true")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the VQ-GAN, then the conditional latent diffusion model",
                       description="Two stages into one run folder: `lad train vqgan` then `lad train diffusion`.")
    parts = p.add_subparsers(dest="part", metavar="PART")
    v = parts.add_parser("vqgan", help="VQ-GAN with the Locality Loss",
                         description="Train the VQ-GAN (paper 3.2): L1, commitment, optional perceptual loss, 2D+3D PatchGAN "
                         "with feature matching, and the Locality Loss (lambda = vqgan_train.locality_weight).")
    _common(v)
    v.add_argument("--discard-diffusion", action="store_true",
                   help="with --resume/--overwrite on a run that has a diffusion model: delete it (it was trained on the "
                   "old VQ-GAN's latents); without it such a run is refused")
    v.add_argument("--perceptual-weights", help="local VGG16 weights (torchvision layout) for the perceptual term; without it the term is off")
    v.set_defaults(func=run_vqgan)
    d = parts.add_parser("diffusion", help="conditional latent DDPM with classifier-free guidance",
                         description="Train the denoiser and the Condition Extractor on cached latents of the run's VQ-GAN.")
    _common(d)
    d.set_defaults(func=run_diffusion)
    h = parts.add_parser("hagan", help="the HA-GAN baseline of Table 1 (Sun et al., 2022), a run folder of its own",
                         description="Train HA-GAN (hierarchical amortized GAN: low-resolution whole volume + high-resolution "
                         "sub-volumes, with its two encoders) on the prepared windows; sample it with `lad sample --run RUN` "
                         "and compare with `lad evaluate --synthetic HA-GAN=FOLDER ...`. Writes RUN/hagan.yaml, RUN/hagan/, "
                         "RUN/checkpoints/hagan/, RUN/logs/hagan.jsonl, RUN/tensorboard/hagan/.")
    h.add_argument("--data", required=True, help="prepared dataset folder (lad prepare)")
    h.add_argument("--run", "--run-dir", dest="run", required=True, help="run folder for HA-GAN (not one holding a Lad model)")
    h.add_argument("--preset", default="demo", help="paper (aliases paper-abdomenct1k, paper-totalsegmentator: the Lad paper's "
                   "protocol, depth resized to 256) | paper-native | demo | tiny | a YAML file")
    h.add_argument("--config", metavar="FILE.yaml",
                   help="a YAML file of config values (some keys, or a whole RUN/hagan.yaml) over the preset")
    h.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set hagan_train.steps=500 (repeatable; unknown keys are rejected; "
                   "wins over --preset, --config and --seed; the result is saved as RUN/hagan.yaml)")
    h.add_argument("--seed", type=int)
    h.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    h.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    h.add_argument("--overwrite", action="store_true", help="retrain from scratch, deleting the HA-GAN outputs of RUN")
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(func=run_hagan)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _config(args):
    from lad.training.config import resolve_train_config

    return resolve_train_config(args.preset, args.overrides, variant=args.variant, seed=args.seed, config=args.config)


def run_vqgan(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.training.vqgan_trainer import train_vqgan
    from lad.utils.log import is_main_process

    out = train_vqgan(args.data, args.run, _config(args), resume=args.resume, overwrite=args.overwrite,
                      device=args.device, perceptual_weights=args.perceptual_weights,
                      discard_diffusion=args.discard_diffusion, progress_bar=progress_bar(args))
    if is_main_process():  # under torchrun: once
        print(f"VQ-GAN: {out}")
    return 0


def run_diffusion(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.training.diffusion_trainer import train_diffusion
    from lad.utils.log import is_main_process

    out = train_diffusion(args.data, args.run, _config(args), resume=args.resume, overwrite=args.overwrite, device=args.device,
                          progress_bar=progress_bar(args))
    if is_main_process():  # under torchrun: once
        print(f"diffusion model: {out}")
    return 0


def run_hagan(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.cli._args import check_device
    from lad.training.hagan_config import resolve_hagan_config
    from lad.training.hagan_trainer import train_hagan

    check_device(args.device)
    cfg = resolve_hagan_config(args.preset, args.overrides, seed=args.seed, config=args.config)
    out = train_hagan(args.data, args.run, cfg, resume=args.resume, overwrite=args.overwrite, device=args.device,
                      progress_bar=progress_bar(args))
    print(f"HA-GAN: {out}")
    return 0
