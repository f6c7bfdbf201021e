"""sidflow.config: typed frozen sections, presets, dotted overrides and one-line errors; distill CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sidflow.cli import distill
from sidflow.config import GuidanceConfig, OptimConfig, SiDConfig, apply_overrides, from_json, to_json
from sidflow.errors import ConfigError
from sidflow.run import registry
from sidflow.run.presets import PRESETS, get_preset, preset_names, register_preset


def test_defaults_follow_the_spec():
    c = SiDConfig()
    assert c.optim.betas == (0.0, 0.999) and all(isinstance(b, float) for b in c.optim.betas)
    assert (c.loss.alpha, c.loss.weighting, c.loss.lsg, c.loss.ls) == (1.0, "1_minus_sigma", 100.0, 1.0)
    assert (c.generator.num_steps, c.generator.t_init, c.generator.noise_type) == (4, 1.0, "fresh")
    assert c.guidance.kappa3 is None and c.guidance.kappa3_value == c.guidance.kappa2
    assert c.guidance.embedded_teacher is None and c.guidance.embedded_generator == 1.0
    assert OptimConfig(betas=(0, 0.999)).betas == (0.0, 0.999)  # ints become floats
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.loss.alpha = 2.0  # type: ignore[misc]


def test_overrides_are_typed():
    c = apply_overrides(
        SiDConfig(),
        [
            "loss.alpha=1.2",
            "--generator.noise_type=ddim",
            "guidance.kappa3=2",
            "guidance.embedded_teacher=3.5",
            "guidance.embedded_generator=none",
            "optim.betas=0.0,0.99",
            "train.total_kimg=2.5",
            "generator.shift=3",
        ],
    )
    assert c.loss.alpha == 1.2 and c.generator.noise_type == "ddim" and c.guidance.kappa3 == 2.0
    assert c.guidance.embedded_teacher == 3.5 and c.guidance.embedded_generator is None
    assert c.optim.betas == (0.0, 0.99) and c.train.total_kimg == 2.5 and c.generator.shift == 3.0
    assert c.train.num_steps() == -(-2500 // c.train.batch)


@pytest.mark.parametrize(
    "override,match",
    [
        ("loss.weighting=edm", "choose one of: 1_minus_sigma"),
        ("loss.alpah=1", "unknown key 'loss.alpah'; valid keys of loss: alpha"),
        ("losses.alpha=1", "unknown config section 'losses'"),
        ("generator.num_steps=2.5", "expected int"),
        ("generator.noise_type=sde", "fresh, fixed, ddim"),
        ("train.batch=100", "multiple of train.batch_gpu"),
        ("loss.alpha", "section.key=value"),
        ("optim.betas=0.9", "needs 2"),
    ],
)
def test_bad_overrides_give_one_line_errors(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        apply_overrides(SiDConfig(), [override])
    assert "\n" not in str(err.value)


def test_json_round_trip_and_unknown_keys():
    c = apply_overrides(SiDConfig(), ["guidance.kappa1=3", "gan.mode=sida"])
    assert from_json(to_json(c)) == c
    data = json.loads(to_json(c))
    data["loss"]["bogus"] = 1
    with pytest.raises(ConfigError, match="loss.bogus"):
        from_json(json.dumps(data))
    with pytest.raises(ConfigError, match="malformed"):
        from_json("{")


def test_presets_registry():
    assert distill.DEFAULT_PRESET in preset_names()  # registered by the digits plugin (entry point)
    assert {"gmm-2d", "sd3-medium-4step", "flux-dev-4step"} <= set(preset_names())
    register_preset("test-only", SiDConfig(guidance=GuidanceConfig(kappa1=2.0)))
    try:
        assert get_preset("test-only").name == "test-only"
        with pytest.raises(ConfigError, match="already registered"):
            register_preset("test-only", SiDConfig())
    finally:
        PRESETS.pop("test-only")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")


def test_distill_dry_run_prints_resolved_config(capsys):
    assert distill.main(["--dry-run", "loss.alpha=1.5", "--guidance.kappa4=2"]) == 0
    printed = from_json(capsys.readouterr().out)
    assert printed.loss.alpha == 1.5 and printed.guidance.kappa4 == 2.0
    assert printed.name == distill.DEFAULT_PRESET


def test_distill_unknown_runner_and_registration(tmp_path):
    with pytest.raises(ConfigError, match="teacher.kind='nothing' is not a known runner; choose one of: .*gmm"):
        distill.main(["--run-dir", str(tmp_path), "teacher.kind=nothing"])
    seen = {}
    registry.register_runner("fake-kind", lambda cfg, run_dir: seen.setdefault("m", {"ok": cfg.loss.alpha}))
    try:
        with pytest.raises(ConfigError, match="already registered"):
            registry.register_runner("fake-kind", lambda cfg, run_dir: {})
        assert distill.main(["--run-dir", str(tmp_path), "teacher.kind=fake-kind", "loss.alpha=2"]) == 0
    finally:
        registry._RUNNERS.pop("fake-kind")
    assert seen["m"] == {"ok": 2.0}
    assert from_json((tmp_path / "config.json").read_text()).loss.alpha == 2.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"ok": 2.0}


def test_unknown_eval_kind_fails_before_anything_is_loaded():
    with pytest.raises(ConfigError, match="eval.kind='digit' is not a known evaluation; choose one of: digits"):
        distill.main(["--dry-run", "eval.kind=digit", "eval.select=final"])


def test_registries_resolve_the_plugins_names(tmp_path):
    assert registry.resolve_teacher_path("bundled").endswith("digits/assets/teacher")
    assert registry.resolve_teacher_path(str(tmp_path)) == str(tmp_path)  # a folder passes through
    prompts = registry.resolve_prompts("builtin:digits")
    assert len(prompts) == 50 and len(set(prompts)) == 50
    with pytest.raises(ConfigError, match="data.prompts='builtin:nope' is not a known prompt set"):
        registry.resolve_prompts("builtin:nope")
    with pytest.raises(ConfigError, match="teacher.path is empty"):
        registry.resolve_teacher_path("")


def test_teacher_precision_and_hub_settings():
    config = apply_overrides(
        SiDConfig(), ["teacher.text_encoder_dtype=bfloat16", "teacher.revision=abc123", "teacher.variant=fp16"]
    )
    assert (config.teacher.text_encoder_dtype, config.teacher.revision, config.teacher.variant) == (
        "bfloat16",
        "abc123",
        "fp16",
    )
    assert SiDConfig().teacher.text_encoder_dtype == "auto"
    assert from_json(to_json(config)) == config
    with pytest.raises(ConfigError, match="choose one of: auto, float32, bfloat16, float16"):
        apply_overrides(SiDConfig(), ["teacher.text_encoder_dtype=fp8"])
    with pytest.raises(ConfigError, match="not the token") as err:  # a token pasted into the config
        apply_overrides(SiDConfig(), ["teacher.token_env=hf_AbCdEf123"])
    assert "hf_AbCdEf123" not in str(err.value)
    with pytest.raises(ConfigError, match="max_sequence_length=0"):
        apply_overrides(SiDConfig(), ["teacher.max_sequence_length=0"])


def test_sana_sprint_1_6b_teacher_preset():
    from sidflow.teachers.configs import shipped_config

    small, large = get_preset("sana-sprint-0.6b-teacher-4step"), get_preset("sana-sprint-1.6b-teacher-4step")
    assert large.teacher.path == "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_teacher_diffusers"
    assert large.data.resolution == 1024 and large.optim.lr == small.optim.lr == 5e-6
    spec = shipped_config(large.teacher.path)
    assert spec is not None and spec["family"] == "sana_sprint"
    # the stock SanaPipeline feeds 1000 t x timestep_scale: the Sprint teachers' configs say 0.001
    assert spec["components"]["transformer"][2]["timestep_scale"] == 0.001
