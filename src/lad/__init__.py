"""lad: Locality-Aware Diffusion for realistic 3D abdominal CT generation.

The package reads like the method: ``lad.data`` (CT ingestion, preprocessing, phantom)
-> ``lad.priors`` (organ masks for unlabeled CT) -> ``lad.models`` / ``lad.topology`` /
``lad.schedulers`` -> ``lad.training`` -> ``lad.sampling`` -> ``lad.evaluation`` ->
``lad.downstream``. ``lad.cli`` holds one thin entry per command-line verb.

The main objects are importable from the top (README "Use from Python")::

    import lad, torch
    ds = lad.PreparedDataset("prepared/", split="train")
    pipe = lad.LadPipeline.from_pretrained("runs/lad").to("cpu")
    volumes = pipe(masks, guidance=1.0, steps=50, generator=torch.Generator().manual_seed(0))

They are loaded on first use (a module-level ``__getattr__``), so ``import lad`` and the command line's
start-up do not pay for importing torch and MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PreparedDataset": "lad.data.dataset",
    "VQGAN": "lad.models.vqgan",
    "LatentDenoiser": "lad.models.denoiser",
    "ConditionExtractor": "lad.models.condition",
    "LatentScaler": "lad.training.latents",
    "TrainConfig": "lad.training.config",
    "resolve_train_config": "lad.training.config",
    "train_vqgan": "lad.training.vqgan_trainer",
    "train_diffusion": "lad.training.diffusion_trainer",
    "LadPipeline": "lad.sampling.pipeline",
    "SampleSettings": "lad.sampling.generate",
    "generate_samples": "lad.sampling.generate",
    "evaluate": "lad.evaluation.evaluate",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from lad.data.dataset import PreparedDataset
    from lad.evaluation.evaluate import evaluate
    from lad.models.condition import ConditionExtractor
    from lad.models.denoiser import LatentDenoiser
    from lad.models.vqgan import VQGAN
    from lad.sampling.generate import SampleSettings, generate_samples
    from lad.sampling.pipeline import LadPipeline
    from lad.training.config import TrainConfig, resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.latents import LatentScaler
    from lad.training.vqgan_trainer import train_vqgan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
