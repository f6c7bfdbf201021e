"""``sidflow info``: shipped public configs on the meta device, local folders, the README table."""

from __future__ import annotations

import json

import pytest

from sidflow.cli.info import main as info_main
from sidflow.cli.info import resolve_spec
from sidflow.teachers.configs import count_params, meta_model, shipped_config, shipped_specs
from sidflow.teachers.families import FAMILIES

PUBLIC_TRANSFORMER_PARAMS = {
    "stabilityai/stable-diffusion-3-medium-diffusers": 2_028_328_000,
    "stabilityai/stable-diffusion-3.5-large": 8_056_627_520,
    "black-forest-labs/FLUX.1-dev": 11_901_408_320,
    "Efficient-Large-Model/Sana_600M_512px_diffusers": 591_747_872,
    "Efficient-Large-Model/Sana_1600M_512px_diffusers": 1_604_462_752,
}


@pytest.mark.parametrize("hub_id", sorted(PUBLIC_TRANSFORMER_PARAMS))
def test_shipped_transformer_parameter_counts(hub_id):
    spec = shipped_config(hub_id)
    assert count_params(meta_model(*spec["components"]["transformer"])) == PUBLIC_TRANSFORMER_PARAMS[hub_id]


def test_every_shipped_spec_names_a_known_family_and_time_scale():
    specs = shipped_specs()
    assert len(specs) >= 7
    for spec in specs.values():
        assert spec["family"] in ("sd3", "sd35", "flux", "sana", "sana_sprint")
        assert "time_scale" not in spec  # one source: sidflow.teachers.families
        assert FAMILIES[spec["family"]].time_scale == (1.0 if spec["family"] in ("flux", "sana_sprint") else 1000.0)


@pytest.mark.slow
def test_info_on_hub_id_offline(capsys):
    assert info_main(["--teacher", "stabilityai/stable-diffusion-3-medium-diffusers", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["transformer"] == 2_028_328_000
    assert info["resolutions"]["1024"]["latent_shape"] == [16, 128, 128]
    assert info["cache_bytes_per_prompt"] == 4 * (154 * 4096 + 2048)
    p = info["params"]["transformer"]
    assert info["memory"]["fp32_amp"]["networks"] == 36 * p
    assert info["memory"]["pure_bf16"]["networks"] == 18 * p


def test_info_on_local_folder(tiny, capsys):
    assert info_main(["--teacher", str(tiny("sana")), "--json", "--resolutions", "32", "48"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sana"
    assert info["resolutions"]["32"]["latent_shape"] == [4, 16, 16]
    assert info["resolutions"]["48"]["latent_shape"] == [4, 24, 24]
    assert info["cache_bytes_per_prompt"] == 4 * 300 * 16 + 8 * 300
    assert set(info["params"]) == {"transformer", "vae", "text_encoder"}
    assert resolve_spec(str(tiny("flux")))["family"] == "flux"


def test_info_text_report(capsys):
    assert info_main(["--teacher", "black-forest-labs/FLUX.1-dev", "--resolutions", "512"]) == 0
    out = capsys.readouterr().out
    assert "11,901,408,320" in out and "(16, 64, 64), 1024 image tokens" in out
