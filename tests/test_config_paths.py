"""One config path: variants are presets under --config and --set, every kind resolves the same way, unique
config class names, and the progress flag is an argument (no environment variable)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml

from lad.config import ConfigError, load_preset, preset_names, resolve_config, to_dict
from lad.training.config import VARIANTS, TrainConfig, resolve_train_config

SRC = Path(__file__).resolve().parents[1] / "src" / "lad"

# What each Table 2 variant resolved to before variants became presets (vqgan_train.locality_weight,
# condition.use_content, condition.use_structure); None = the preset's own value (1.0 in every shipped preset).
TABLE2 = {"V0": (0.0, False, False), "V1": (0.0, True, False), "V2": (0.0, False, True), "V3": (0.0, True, True),
          "full": (None, True, True)}


def _expected(preset: str, variant: str | None) -> dict:
    data = to_dict(load_preset(TrainConfig, "train", preset))
    if variant is None:
        return data
    lam, content, structure = TABLE2[variant]
    data["variant"] = variant
    if lam is not None:
        data["vqgan_train"]["locality_weight"] = lam
    data["condition"].update(use_content=content, use_structure=structure)
    return data


@pytest.mark.parametrize("preset", preset_names("train"))
def test_variants_resolve_as_before(preset):
    assert set(preset_names("train")) >= {"paper-abdomenct1k", "paper-totalsegmentator", "demo", "tiny"}
    base = load_preset(TrainConfig, "train", preset)
    assert base.variant == "full" and base.vqgan_train.locality_weight == 1.0  # so "full" keeps lambda = 1
    for v in (*VARIANTS, None):
        assert to_dict(resolve_train_config(preset, variant=v)) == _expected(preset, v), (preset, v)
    # --set variant=X is the same as --variant X; unrelated --set keys leave the variant's switches alone
    for v in VARIANTS:
        a = resolve_train_config(preset, [f"variant={v}", "vqgan_train.steps=7"])
        b = resolve_train_config(preset, ["vqgan_train.steps=7"], variant=v)
        assert to_dict(a) == to_dict(b) and a.vqgan_train.steps == 7
        assert (a.vqgan_train.locality_weight, a.condition.use_content, a.condition.use_structure) == \
            tuple(base.vqgan_train.locality_weight if x is None else x for x in TABLE2[v])


def test_set_wins_over_variant(caplog):
    # the bug: --variant full --set condition.use_structure=false trained with structure on
    cfg = resolve_train_config("tiny", ["condition.use_structure=false"], variant="full")
    assert cfg.variant == "full" and cfg.condition.use_structure is False and cfg.condition.use_content is True
    assert "condition.use_structure=False (variant full: True)" in caplog.text
    v0 = resolve_train_config("tiny", ["vqgan_train.locality_weight=0.5", "condition.use_content=true"], variant="V0")
    assert (v0.vqgan_train.locality_weight, v0.condition.use_content, v0.condition.use_structure) == (0.5, True, False)
    # --set wins over --seed too
    assert resolve_train_config("tiny", ["seed=3"], seed=5).seed == 3 and resolve_train_config("tiny", seed=5).seed == 5


def test_config_file_sits_between_variant_and_set(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"condition": {"use_content": False}, "vqgan_train": {"steps": 9, "lr": 5e-4}}), encoding="utf-8")
    cfg = resolve_train_config("tiny", ["vqgan_train.steps=11"], variant="full", config=f)
    assert cfg.condition.use_content is False and cfg.condition.use_structure is True  # file over variant, key by key
    assert cfg.vqgan_train.steps == 11 and cfg.vqgan_train.lr == 5e-4  # --set over file; other keys from the file
    assert cfg.vqgan_train.batch_size == load_preset(TrainConfig, "train", "tiny").vqgan_train.batch_size  # preset below
    # a whole RUN/config.yaml reproduces its run, whatever the preset
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(resolve_train_config("tiny", ["condition.use_structure=false"], variant="V3"))),
                     encoding="utf-8")
    again = resolve_train_config("demo", config=saved)
    assert to_dict(again) == to_dict(resolve_train_config("tiny", ["condition.use_structure=false"], variant="V3"))
    # two sources naming different variants, unknown keys and bad values are refused with their source
    with pytest.raises(ConfigError, match=r"conflicting variants: --variant V0, \S*variant-full.yaml full"):
        resolve_train_config("tiny", variant="V0", config=_variant_file(tmp_path, "full"))
    with pytest.raises(ConfigError, match="conflicting variants"):
        resolve_train_config("tiny", ["variant=V1"], variant="V2")
    bad = tmp_path / "bad.yaml"
    bad.write_text("vqgan_train: {stepz: 3}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key\(s\) \['vqgan_train.stepz'\]"):
        resolve_train_config("tiny", config=bad)
    with pytest.raises(FileNotFoundError, match="nothere.yaml: config file not found"):
        resolve_train_config("tiny", config=tmp_path / "nothere.yaml")
    with pytest.raises(ValueError, match="variant must be one of"):
        resolve_train_config("tiny", ["variant=V9"])


def _variant_file(tmp_path: Path, variant: str) -> Path:
    f = tmp_path / f"variant-{variant}.yaml"
    f.write_text(f"variant: {variant}\n", encoding="utf-8")
    return f


def test_train_cli_passes_the_resolved_config(tmp_path, monkeypatch):
    # the trainers write the config they are given as RUN/config.yaml (test_training_diffusion checks that file)
    import lad.training.diffusion_trainer
    import lad.training.vqgan_trainer
    from lad.cli import main

    got = []
    monkeypatch.setattr(lad.training.vqgan_trainer, "train_vqgan", lambda data, run, cfg, **k: got.append((cfg, k)) or run)
    monkeypatch.setattr(lad.training.diffusion_trainer, "train_diffusion", lambda data, run, cfg, **k: got.append((cfg, k)) or run)
    extra = tmp_path / "extra.yaml"
    extra.write_text("diffusion_train: {lr: 2.0e-4}\ncondition: {use_content: false}\n", encoding="utf-8")
    for part in ("vqgan", "diffusion"):
        assert main(["train", part, "--data", "d", "--run", str(tmp_path / "run"), "--preset", "tiny", "--variant", "full",
                     "--config", str(extra), "--set", "condition.use_structure=false", "--set", "vqgan_train.steps=1",
                     "--seed", "3", "--no-progress"]) == 0
    for cfg, kwargs in got:
        assert cfg.variant == "full" and cfg.condition.use_structure is False and cfg.condition.use_content is False
        assert cfg.diffusion_train.lr == 2.0e-4 and cfg.vqgan_train.steps == 1 and cfg.seed == 3
        assert cfg.vqgan_train.locality_weight == 1.0 and kwargs["progress_bar"] is False
    assert len(got) == 2


def test_every_kind_uses_the_one_resolver(tmp_path):
    from lad.data.prepare import PrepareConfig, load_prepare_config
    from lad.downstream.ssl import load_ssl_config
    from lad.downstream.supervised import load_supervised_config
    from lad.evaluation.ct_features import load_feature_train_config
    from lad.priors.train import load_segmenter_config

    # prepare: preset < explicit options < --set
    cfg = load_prepare_config("tiny", {"depth": 16, "seed": None}, ["seed=4", "depth=24"])
    tiny = load_preset(PrepareConfig, "prepare", "tiny")
    assert (cfg.depth, cfg.seed, tuple(cfg.size)) == (24, 4, tuple(tiny.size))
    assert load_prepare_config("tiny", {"depth": 16}).depth == 16
    with pytest.raises(ConfigError, match="unknown key 'dept'"):
        load_prepare_config("tiny", None, ["dept=3"])
    for fn, kind, key in ((load_ssl_config, "downstream-ssl", "seed"), (load_supervised_config, "downstream-supervised", "seed"),
                          (load_feature_train_config, "features", "seed"), (load_segmenter_config, "priors", "seed")):
        got = fn("tiny", [f"{key}=17"])
        assert got == resolve_config(type(got), kind, "tiny", overrides=[f"{key}=17"]) and getattr(got, key) == 17
        with pytest.raises(ConfigError, match="unknown key"):
            fn("tiny", ["nonsense=1"])
    # no loader applies presets its own way any more
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name != "config.py" or path.parent.name != "lad":
            assert not re.search(r"apply_overrides\(load_preset", text), path


def test_class_names_are_unique():
    seen: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):  # every class of the package, read from the source (no imports)
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                seen.setdefault(node.name, []).append(module)
    dup = {k: v for k, v in seen.items() if len(v) > 1}
    assert not dup, dup
    from lad.downstream.ssl.episodes import EpisodeAugmentConfig
    from lad.downstream.ssl.train import DataConfig, SSLTrainConfig
    from lad.sampling.augment import AugmentConfig

    assert seen["TrainConfig"] == ["lad.training.config"] and seen["AugmentConfig"] == ["lad.sampling.augment"]
    assert DataConfig().augment == EpisodeAugmentConfig() and SSLTrainConfig.__module__ == "lad.downstream.ssl.train"


def test_progress_is_an_argument_not_an_environment_variable(tmp_path, monkeypatch):
    # nothing reads or writes a progress environment variable
    for path in [*SRC.rglob("*.py"), *(SRC.parents[1] / "tests").glob("*.py")]:
        if path.name != Path(__file__).name:
            assert "LAD_NO_PROGRESS" not in path.read_text(encoding="utf-8"), path
    from lad.utils import log

    assert not hasattr(log, "set_progress_enabled")
    monkeypatch.delenv("RANK", raising=False)
    assert log.progress(range(3)).disable is False and log.progress(range(3), disable=True).disable is True
    monkeypatch.setenv("RANK", "1")  # a non-main rank never shows a bar
    assert log.progress(range(3)).disable is True
    monkeypatch.delenv("RANK")
    # every library function that draws a bar takes the argument
    import lad.data.phantom
    import lad.sampling.generate
    from lad.cli import main
    from lad.data.prepare import prepare_dataset
    from lad.evaluation.ablate import run_ablation
    from lad.evaluation.evaluate import evaluate
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    for fn in (prepare_dataset, lad.data.phantom.write_phantom_dataset, lad.sampling.generate.generate_samples, evaluate,
               run_ablation, train_vqgan, train_diffusion):
        assert inspect.signature(fn).parameters["progress_bar"].default is True, fn
    # the command line passes --no-progress down as progress_bar=False

    seen = []
    monkeypatch.setattr(lad.data.phantom, "write_phantom_dataset", lambda *a, **k: seen.append(k["progress_bar"]) or [])
    assert main(["phantom", str(tmp_path / "p"), "--n", "1", "--no-progress"]) == 0
    assert main(["phantom", str(tmp_path / "p"), "--n", "1"]) == 0
    assert seen == [False, True]
    monkeypatch.setattr(lad.sampling.generate, "generate_samples", lambda *a, **k: seen.append(k["progress_bar"]) or {})
    assert main(["sample", "--run", "r", "--masks", "m", "--n", "1", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert seen[-1] is False
    # every progress(...) call in the library is switched by its caller
    for path in SRC.rglob("*.py"):
        for call in re.findall(r"\bprogress\((?:[^()]|\([^()]*\))*\)", path.read_text(encoding="utf-8")):
            if path.name != "log.py":
                assert "disable=" in call, (path, call)
