"""Loading: families detected from the folder, tiny pipelines round-trip, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sidflow.cli import main as cli_main
from sidflow.errors import TeacherLoadError
from sidflow.teachers import load_teacher
from sidflow.testing import FAMILIES, build_tiny_pipeline
from sidflow.testing import load_pipeline as load_pipe


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) < 300
    return text


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipelines_round_trip_offline(family, tiny, tmp_path):
    pipe = load_pipe(tiny(family))
    pipe.save_pretrained(tmp_path / "again")
    again = load_pipe(tmp_path / "again")
    before, after = pipe.transformer.state_dict(), again.transformer.state_dict()
    for (name, p), (_, q) in zip(before.items(), after.items(), strict=True):
        assert torch.equal(p, q), name
    assert pipe.tokenizer("a red cat").input_ids == again.tokenizer("a red cat").input_ids
    teacher = load_teacher(tiny(family))
    assert teacher.family == family.replace("sd35", "sd3")  # a local folder: the pipeline class decides
    expected = 1.0 if family in ("flux", "sana_sprint") else 1000.0
    assert teacher.denoiser.time_scale == expected


def test_unknown_tiny_family(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny_pipeline("sdxl", tmp_path)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(TeacherLoadError, match="not a diffusers pipeline folder") as err:
        load_teacher(tmp_path)
    _one_line(err)


def test_unsupported_family(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(TeacherLoadError, match="not a supported teacher family") as err:
        load_teacher(tmp_path)
    _one_line(err)
    with pytest.raises(TeacherLoadError, match="unsupported teacher family 'sdxl'") as err:
        load_teacher(tmp_path, family="sdxl")
    _one_line(err)


def test_missing_component(tiny, tmp_path):
    folder = shutil.copytree(tiny("sd3"), tmp_path / "broken")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(TeacherLoadError, match="lacks the 'text_encoder_2' component") as err:
        load_teacher(folder)
    _one_line(err)


def test_missing_path_and_unknown_offline_hub_id(tmp_path):
    with pytest.raises(TeacherLoadError, match="does not exist") as err:
        load_teacher(tmp_path / "nope")
    _one_line(err)
    with pytest.raises(TeacherLoadError, match="hub id someone/unknown-model") as err:
        load_teacher("someone/unknown-model")
    _one_line(err)


def test_sprint_with_guidance_embedder_is_refused(tiny, tmp_path):
    from diffusers import SanaTransformer2DModel

    folder = shutil.copytree(tiny("sana_sprint"), tmp_path / "sprint-guided")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")} | {"guidance_embeds": True}
    SanaTransformer2DModel.from_config(config).save_pretrained(folder / "transformer")
    with pytest.raises(TeacherLoadError, match="guidance embedder") as err:
        load_teacher(folder)
    _one_line(err)


def test_resolution_not_divisible_by_latent_patch(tiny):
    teacher = load_teacher(tiny("flux"))
    assert teacher.latent_shape(64) == (4, 32, 32)
    with pytest.raises(TeacherLoadError, match="not divisible by 4") as err:
        teacher.latent_shape(34)
    _one_line(err)


def test_cli_prints_one_line_error(tmp_path, capsys):
    assert cli_main(["info", "--teacher", str(tmp_path / "missing-model")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sidflow info: error:") and "\n" not in err


def test_known_hub_id_offline_fails_in_one_line():
    with pytest.raises(TeacherLoadError, match="cannot load 'pipeline' of black-forest-labs/FLUX") as err:
        load_teacher("black-forest-labs/FLUX.1-dev")
    _one_line(err)


def test_text_encoder_precision_is_a_setting(tiny):
    teacher = load_teacher(tiny("sd3"), text_encoder_dtype=torch.bfloat16)
    assert all(next(m.parameters()).dtype == torch.bfloat16 for m in teacher.text_encoders())
    assert next(teacher.denoiser.parameters()).dtype == torch.float32
    assert teacher.encode_prompts(["a cat"])["prompt_embeds"].dtype == torch.float32


def test_gradient_checkpointing_keeps_gradients(tiny):
    teacher = load_teacher(tiny("sd3"))
    _, fake, _ = teacher.make_denoisers()
    x_t, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.6]), teacher.encode_prompts(["a", "b"])
    x_in = x_t.clone().requires_grad_(True)
    psi = teacher.denoiser
    (plain_input_grad,) = torch.autograd.grad(psi.velocity(x_in, t, cond).square().sum(), x_in)
    psi_ckpt, fake_ckpt, gen_ckpt = teacher.make_denoisers(gradient_checkpointing=True)
    assert psi_ckpt is psi and not fake.transformer.is_gradient_checkpointing
    assert all(n.transformer.is_gradient_checkpointing for n in (psi_ckpt, fake_ckpt, gen_ckpt))
    grads = []
    for net in (fake, fake_ckpt):
        net.velocity(x_t, t, cond).square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for g, h in zip(*grads, strict=True):
        torch.testing.assert_close(g, h)
    # the frozen teacher's backward into its inputs (the SiD gradient path) is checkpointed too
    (ckpt_input_grad,) = torch.autograd.grad(psi_ckpt.velocity(x_in, t, cond).square().sum(), x_in)
    torch.testing.assert_close(ckpt_input_grad, plain_input_grad)
    teacher.make_denoisers()  # and switched off again
    assert not psi.transformer.is_gradient_checkpointing


def test_time_scale_comes_from_the_family_unless_given(tiny):
    from sidflow.teachers.families import FAMILIES

    assert (FAMILIES["sd3"].time_scale, FAMILIES["flux"].time_scale, FAMILIES["sana_sprint"].time_scale) == (
        1000.0,
        1.0,
        1.0,
    )
    assert load_teacher(tiny("sd3")).denoiser.time_scale == 1000.0
    assert load_teacher(tiny("sd3"), time_scale=7.0).denoiser.time_scale == 7.0
    assert load_teacher(tiny("sana")).denoiser.time_scale == 1000.0
    assert load_teacher(tiny("sana_sprint")).denoiser.time_scale == 1.0  # its transformer config says so


def test_sd3_without_t5(tiny):
    from sidflow.teachers.sd3 import SD3Teacher

    pipe = load_pipe(tiny("sd3"))
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    cond = SD3Teacher(pipe).encode_prompts(["a cat"])
    assert cond["prompt_embeds"].shape == (1, 154, 32)
    assert not cond["prompt_embeds"][:, 77:].any() and cond["prompt_embeds"][:, :77].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_policy(tiny):
    teacher = load_teacher(tiny("flux"), device="cuda", dtype=torch.bfloat16)
    assert all(next(m.parameters()).dtype == torch.bfloat16 for m in teacher.text_encoders())
    x_t = torch.randn(2, *teacher.latent_shape(32), device="cuda")
    v, feats = teacher.denoiser.velocity_and_features(
        x_t, torch.tensor([0.3, 0.9], device="cuda"), teacher.encode_prompts(["a", "b"])
    )
    assert v.dtype == feats.dtype == torch.float32 and torch.isfinite(v).all()
