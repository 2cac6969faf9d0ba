"""lad: Locality-Aware Diffusion for realistic 3D abdominal CT generation.

The package reads like the method: ``lad.data`` (CT ingestion, preprocessing, phantom)
-> ``lad.priors`` (organ masks for unlabeled CT) -> ``lad.models`` / ``lad.topology`` /
``lad.schedulers`` -> ``lad.training`` -> ``lad.sampling`` -> ``lad.evaluation`` ->
``lad.downstream``. ``lad.cli`` holds one thin entry per command-line verb.
"""

__version__ = "0.1.0"
