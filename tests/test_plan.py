"""``sidflow plan``: the fake-tensor simulation equals the same trackers on real tensors (tiny size).

The true-size figures (FLUX.1-dev on 8 GPUs, SD3-Medium at 1024 px, ...) take minutes each and live
in ``benchmarks/plan_table.py`` and the README; here the simulation itself is checked: the same
iteration of a tiny SD3 teacher, sharded over 2 fake ranks or unsharded in one process, measured by
the same trackers with fake and with real CPU tensors, and the command's JSON and one-line errors.
"""

from __future__ import annotations

import json

import pytest

from sidflow.cli import main
from sidflow.cli.distill import resolve_config
from sidflow.errors import ConfigError
from sidflow.run.plan import CATEGORIES, plan
from sidflow.testing import tiny_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_pipeline("sd3", tmp_path_factory.mktemp("plan"))


def _config(teacher, *extra):
    return resolve_config(
        "sd3-medium-4step",
        [f"teacher.path={teacher}", "teacher.time_scale=1000", "data.resolution=32", "train.batch_gpu=2", *extra],
    )


@pytest.mark.parametrize(
    ("world_size", "extra"),
    [
        (2, ["train.sharding=fsdp2"]),
        (2, ["train.sharding=fsdp2", "train.accumulate=unsharded"]),
        (1, []),
        (1, ["lora.rank=4"]),
        (2, ["train.sharding=fsdp2", "lora.rank=4"]),
    ],
)
def test_fake_tensor_plan_agrees_with_real_tensors(teacher, world_size, extra):
    config = _config(teacher, *extra)
    fake = plan(config, world_size=world_size)
    real = plan(config, world_size=world_size, fake=False)
    assert fake["simulated"] == "fake tensors" and real["simulated"] == "real tensors"
    assert fake["tracked_peak_gib"] == pytest.approx(real["tracked_peak_gib"], rel=0.10)
    for key in CATEGORIES:
        assert fake["breakdown_gib"][key] == pytest.approx(real["breakdown_gib"][key], rel=0.10, abs=1e-6), key
    b = fake["breakdown_gib"]
    assert b["parameters"] > 0 and b["optimizer_state"] > 0 and b["activations"] > 0
    assert (b["all_gather_buffers"] > 0) == (world_size > 1)  # FSDP2 gathers; one process does not
    s = fake["setup"]
    assert s["precision"] == "amp_bf16" and s["k"] == config.generator.num_steps  # auto on a GPU; k = K
    assert s["sharding"] == ("fsdp2" if world_size > 1 else "none")
    assert s["simulated_rounds"] == (2 if "train.accumulate=unsharded" in extra else 1)
    assert fake["peak_gib_per_rank"] == pytest.approx(sum(b.values()))


def test_lora_holds_one_base_and_small_state(teacher):
    """LoRA mode on real tensors, measured by the same tracker: one base instead of three copies, and
    optimiser state and gradients of the adapters only."""
    full = plan(_config(teacher), world_size=1, fake=False)["breakdown_gib"]
    lora = plan(_config(teacher, "lora.rank=4"), world_size=1, fake=False)
    b = lora["breakdown_gib"]
    assert lora["setup"]["lora"] == {"rank": 4, "share_base": "on"}
    assert b["parameters"] < 0.5 * full["parameters"]
    assert b["optimizer_state"] < 0.2 * full["optimizer_state"]
    assert b["gradients"] < 0.2 * full["gradients"]


def test_sharding_lowers_the_per_rank_state(teacher):
    one = plan(_config(teacher), world_size=1)["breakdown_gib"]
    four = plan(_config(teacher, "train.sharding=fsdp2"), world_size=4)["breakdown_gib"]
    assert four["parameters"] < one["parameters"] and four["optimizer_state"] < one["optimizer_state"] / 3


def test_plan_command_json_fits_and_errors(teacher, capsys):
    args = ["plan", "--teacher", str(teacher), "--preset", "sd3-medium-4step", "--world-size", "2"]
    args += ["data.resolution=32", "teacher.time_scale=1000"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"peak_gib_per_rank", "fits", "breakdown_gib"} <= set(out)
    assert out["fits"] is True and out["setup"]["sharding"] == "fsdp2" and out["world_size"] == 2
    assert main([*args, "--json", "--gpu-memory-gib", "1"]) == 0  # the fixed 2 GiB overhead alone
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert main([*args]) == 0
    assert "peak per GPU" in capsys.readouterr().out
    assert main(["plan", "--teacher", "nobody/nothing", "--preset", "sd3-medium-4step", "--world-size", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no shipped config" in err[0]
    assert main([*args[:5], "--world-size", "0"]) == 1
    assert "--world-size 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a multiple"):
        plan(_config(teacher, "train.batch=6"), world_size=4)
