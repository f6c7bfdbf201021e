"""Shard-first FSDP2 on 2 gloo ranks: no rank ever holds more than its shards (spec 16).

One torchrun job builds the run's networks as ``sidflow distill`` does (:func:`build_run`) under each
memory lever in turn, the defaults (reshard after forward, sharded accumulation, checkpointing of
all three networks), ``reshard_after_forward=off``, ``accumulate=unsharded`` and ``cpu_offload=on``,
and checks on the local tensors, at every module entry and exit of an iteration (recomputation
included) and at each optimizer step:

* rank 1 never read the teacher's weights (its template is on ``meta``); every parameter of the
  three networks is a DTensor holding at most ``ceil(rows / 2)`` rows;
* with resharding on, at most the FSDP root's own parameters plus two blocks (the one computing and
  the one prefetched) are ever unsharded per network; off, more stays gathered between forward and
  backward, so the lever is shown to act;
* with sharded accumulation, full gradients exist only for the units in backward until their
  reduce-scatter; unsharded accumulation keeps every trainable tensor's full gradient between rounds;
* every setting ends the iteration on the weights of one unsharded process running the same
  iteration, and the generator gathered for evaluation equals it (EMA on).
"""

from __future__ import annotations

import textwrap

import pytest
from helpers import torchrun  # noqa: I001  (tests/ on the path)

from sidflow.testing import tiny_pipeline

pytestmark = pytest.mark.slow

_WORKER = textwrap.dedent("""
    import copy, math, sys
    from pathlib import Path
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.fsdp import FSDPModule
    from sidflow.cli.distill import resolve_config
    from sidflow.run.build import build_run, eval_generator
    from sidflow.run import distributed as sd
    from sidflow.trainer import SiDTrainer, generator_state_dict

    torch.set_num_threads(1)
    teacher_path, out = sys.argv[1], Path(sys.argv[2])
    ctx = sd.init_from_env()
    common = [f"teacher.path={teacher_path}", "teacher.time_scale=1000", "teacher.gradient_checkpointing=on",
        "data.resolution=32", "train.batch=4", "train.batch_gpu=1", "train.total_kimg=none", "train.max_steps=1",
        "guidance.kappa1=2", "optim.lr=1e-3", "optim.glr=1e-3", "train.ema_halflife_kimg=0.01",
        "train.sharding=fsdp2", "eval.kind=none", f"data.prompts={out / 'prompts.txt'}",
        f"data.cache_dir={out / 'cache'}"]

    def units(net):
        return [m for m in net.transformer.modules() if isinstance(m, FSDPModule)]

    def unsharded_numel(net):
        return sum(p.numel() for p in net.transformer.parameters() if not isinstance(p, DTensor))

    def check_local_shards(nets):
        for net in nets:
            for name, p in net.transformer.named_parameters():
                assert isinstance(p, DTensor), name
                rows = math.ceil(p.shape[0] / ctx.world_size)
                assert p.to_local().numel() <= rows * (p.numel() // max(p.shape[0], 1)), name

    def pending_unsharded_grads(nets):   # FSDP2 internals: gradients kept unsharded between rounds
        def pending(fp):
            unsharded = getattr(fp, "_unsharded_param", None)
            return fp.unsharded_accumulated_grad is not None or (unsharded is not None and unsharded.grad is not None)
        return sum(pending(fp) for net in nets for m in units(net)
                   for fp in m._get_fsdp_state()._fsdp_param_group.fsdp_params)

    results, results_peak, results_grads = {}, {}, {}
    for label, extra in [("default", []), ("no_reshard", ["train.reshard_after_forward=off"]),
                         ("unsharded_acc", ["train.accumulate=unsharded"]), ("offload", ["train.cpu_offload=on"])]:
        cfg = resolve_config("sd3-medium-4step", common + extra)
        run = build_run(cfg, out / f"run-{label}", ctx)
        tr = run.trainer
        nets = (tr.teacher, tr.fake, tr.generator)
        template = run.teacher.denoiser.transformer
        assert all(p.device.type == ("cpu" if ctx.rank == 0 else "meta") for p in template.parameters())
        check_local_shards(nets)
        if label == "offload":   # (trivially on CPU: this checks the setting builds and trains, not placement)
            assert all(p.to_local().device.type == "cpu" for net in nets for p in net.parameters())
        blocks = max(sum(p.numel() for p in b.parameters()) for b in tr.generator.fsdp_units())
        root_own = sum(p.numel() for n, p in tr.generator.transformer.named_parameters()
                       if not n.startswith("transformer_blocks."))
        peak = {"unsharded": 0, "grads": 0, "checks": 0}

        def observe(*_):
            peak["checks"] += 1
            for net in nets:
                peak["unsharded"] = max(peak["unsharded"], unsharded_numel(net))
            peak["grads"] = max(peak["grads"], pending_unsharded_grads(nets))

        handles = [m.register_forward_pre_hook(observe) for net in nets for m in net.transformer.modules()]
        handles += [m.register_forward_hook(observe) for net in nets for m in net.transformer.modules()]
        for opt in (tr.opt_fake, tr.opt_gen):
            handles.append(opt.register_step_pre_hook(observe))
        tr.step()
        for h in handles:
            h.remove()
        check_local_shards(nets)
        bound = root_own + 2 * blocks
        if label == "no_reshard":  # more stays gathered than with resharding
            assert peak["unsharded"] > results_peak["default"], (peak, results_peak)
        else:
            assert peak["unsharded"] <= bound, (label, peak, bound)
        unit_tensors = max(len(m._get_fsdp_state()._fsdp_param_group.fsdp_params) for n in nets for m in units(n)
                           if m._get_fsdp_state()._fsdp_param_group is not None)
        if label == "unsharded_acc":  # every trainable tensor's full gradient waits for the last round
            assert peak["grads"] > max(results_grads["default"], 2 * unit_tensors), (peak, results_grads)
        else:  # only the units in backward hold a full gradient, until their reduce-scatter
            assert peak["grads"] <= 2 * unit_tensors, (label, peak, unit_tensors)
        results_grads[label] = peak["grads"]
        gathered = eval_generator(run)
        state = sd.gather_state({"tensors": generator_state_dict(tr), "scalars": {}})["tensors"]
        if ctx.rank == 0:
            assert gathered is not None and not any(isinstance(p, DTensor) for p in gathered.parameters())
            ours = gathered.state_dict()
            assert all(torch.equal(ours[k], v) for k, v in state.items())
        else:
            assert gathered is None
        results[label], results_peak[label] = state, peak["unsharded"]
        print(label, peak, bound)

    # the same iteration in one unsharded process, on every rank
    from sidflow.run.build import load_run_teacher
    from sidflow.data.prompts import PromptSource
    cfg = resolve_config("sd3-medium-4step", [c for c in common if c != "train.sharding=fsdp2"])
    teacher = load_run_teacher(cfg, "cpu")
    source = PromptSource((out / "prompts.txt").read_text().split("\\n")[:3], teacher)
    nets = teacher.make_denoisers(gradient_checkpointing=True)
    ref = SiDTrainer(*nets, source, teacher.latent_shape(32), cfg, "cpu")
    ref.step()
    expected = generator_state_dict(ref)
    start = generator_state_dict(SiDTrainer(*teacher.make_denoisers(), source, teacher.latent_shape(32), cfg, "cpu"))
    assert any(not torch.equal(expected[k], v) for k, v in start.items())   # the iteration moved the weights
    for label, state in results.items():
        for key, value in expected.items():
            scale = float(value.abs().max()) if value.numel() else 0.0
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6 + 1e-5 * scale, msg=f"{label} {key}")
    sd.shutdown(ctx)
    (out / f"done-{ctx.rank}").write_text("ok")
""")


def _run_on_two_ranks(worker: str, tmp_path) -> None:
    """Run ``worker`` under torchrun with 2 gloo ranks on a tiny SD3 teacher; both ranks must finish."""
    teacher = tiny_pipeline("sd3", tmp_path / "pipes")
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\na green cone\n")
    script = tmp_path / "worker.py"
    script.write_text(worker)
    torchrun([str(script), str(teacher), str(tmp_path)])
    assert (tmp_path / "done-0").exists() and (tmp_path / "done-1").exists()


def test_shard_first_fsdp2_holds_only_shards_under_each_memory_lever(tmp_path):
    _run_on_two_ranks(_WORKER, tmp_path)


_LORA_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from torch.distributed.tensor import DTensor
    from sidflow.cli.distill import resolve_config
    from sidflow.run.build import build_run, eval_generator, load_run_teacher
    from sidflow.run.checkpoint import save_trainer
    from sidflow.run import distributed as sd
    from sidflow.data.prompts import PromptSource
    from sidflow.config import to_dict
    from sidflow.teachers.lora import lora_spec
    from sidflow.trainer import SiDTrainer, generator_state_dict

    torch.set_num_threads(1)
    teacher_path, out = sys.argv[1], Path(sys.argv[2])
    ctx = sd.init_from_env()
    common = [f"teacher.path={teacher_path}", "teacher.time_scale=1000", "teacher.gradient_checkpointing=on",
        "data.resolution=32", "train.batch=4", "train.batch_gpu=1", "train.total_kimg=none", "train.max_steps=2",
        "guidance.kappa1=2", "optim.lr=1e-2", "optim.glr=1e-2", "train.ema_halflife_kimg=0.01",
        "eval.kind=none", f"data.prompts={out / 'prompts.txt'}", f"data.cache_dir={out / 'cache'}",
        "lora.rank=4", "lora.alpha=8"]
    cfg = resolve_config("sd3-medium-4step", common + ["train.sharding=fsdp2"])
    run = build_run(cfg, out / "run", ctx)
    tr = run.trainer
    # one base, sharded once: the three views share it, every weight of it is a DTensor shard
    assert tr.teacher.transformer is tr.fake.transformer is tr.generator.transformer
    assert all(isinstance(p, DTensor) for p in torch.nn.Module.parameters(tr.teacher))
    base0 = sd.gather_state({"tensors": dict(tr.teacher.state_dict()), "scalars": {}})["tensors"]
    tr.step()
    save_trainer(tr, out / "run", to_dict(cfg), is_main=ctx.is_main, sharded=True)
    tr.step()
    state = sd.gather_state({"tensors": generator_state_dict(tr), "scalars": {}})["tensors"]
    base = sd.gather_state({"tensors": dict(tr.teacher.state_dict()), "scalars": {}})["tensors"]
    assert all(torch.equal(base[k], v) for k, v in base0.items())   # the base never moves
    gathered = eval_generator(run)
    if ctx.rank == 0:   # the gathered copy: the base with the (EMA) generator adapter on it
        ours = gathered.state_dict()
        assert set(ours) == set(state) and all(torch.equal(ours[k], v) for k, v in state.items())
    # resumed from the checkpoint of iteration 1 by a fresh build: the same second iteration
    resumed = build_run(cfg, out / "run", ctx)
    assert resumed.trainer.iteration == 1
    resumed.trainer.step()
    again = sd.gather_state({"tensors": generator_state_dict(resumed.trainer), "scalars": {}})["tensors"]
    assert all(torch.equal(again[k], v) for k, v in state.items())

    # the same two iterations in one unsharded process
    cfg1 = resolve_config("sd3-medium-4step", common)
    teacher = load_run_teacher(cfg1, "cpu")
    source = PromptSource((out / "prompts.txt").read_text().split("\\n")[:3], teacher)
    nets = teacher.make_denoisers(gradient_checkpointing=True, lora=lora_spec(cfg1.lora, teacher.denoiser.lora_targets),
                                  seed=cfg1.train.seed)
    ref = SiDTrainer(*nets, source, teacher.latent_shape(32), cfg1, "cpu")
    ref.step(), ref.step()
    expected = generator_state_dict(ref)
    assert set(expected) == set(state)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in expected.items() if ".lora_B." in k)
    for key, value in expected.items():  # Adam's first steps from B = 0 move by about lr * sign(grad): the
        # reduction order of two ranks shows as up to ~2e-4 of that in a few entries
        scale = float(value.abs().max()) if value.numel() else 0.0
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-3 * scale, msg=key)
    sd.shutdown(ctx)
    (out / f"done-{ctx.rank}").write_text("ok")
""")


def test_lora_shared_base_under_fsdp2_matches_one_process_and_resumes(tmp_path):
    _run_on_two_ranks(_LORA_WORKER, tmp_path)
