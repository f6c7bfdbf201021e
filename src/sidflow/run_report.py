"""The end of a run: sample grids (teacher vs student, same prompts and seeds), the metric plot,
the generator exported as a stock diffusers pipeline (spec 15) and a one-page ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sidflow.config import SiDConfig
from sidflow.denoiser import Denoiser
from sidflow.evaluation import sample_student
from sidflow.report import plot_metrics, save_labelled_grids, write_report
from sidflow.rng import randn_per_sample
from sidflow.sampling import euler_sample

__all__ = ["finish_run", "export_generator", "teacher_images"]


@torch.no_grad()
def teacher_images(teacher, noise: Tensor, prompts: list[str], *, steps: int, guidance: float) -> Tensor:
    """Teacher Euler samples (decoded) from the given initial noise."""
    cond = teacher.encode_prompts(prompts)
    uncond = teacher.uncond(len(prompts)) if guidance != 1.0 else None
    sigmas = teacher.sigmas(steps, tuple(noise.shape[1:]))
    latents = euler_sample(teacher.denoiser, noise.to(teacher.device), sigmas, cond, uncond, guidance)
    return teacher.decode_latents(latents).float().cpu()


def _grid_prompts(config: SiDConfig, evaluation) -> tuple[list[str], Tensor]:
    """Grid prompts spread over the evaluation set (or the first prompts of the run) and their noise."""
    n = config.eval.grid_size
    if evaluation is not None:
        total = len(evaluation.set.prompts)
        idx = [int(i * total / n) for i in range(n)]
        return [evaluation.set.prompts[i] for i in idx], evaluation.set.noise[idx]
    from sidflow.pipeline_runner import resolve_prompts

    prompts = resolve_prompts(config.data.prompts)
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    return prompts, torch.empty(0)


def export_generator(teacher, generator: Denoiser, out: Path, config: SiDConfig) -> Path:
    """Save the generator as a stock diffusers pipeline of the teacher's class (spec 15).

    The scheduler is ``FlowMatchEulerDiscreteScheduler(shift=1)`` with ``stochastic_sampling`` for the
    ``fresh`` noise type (plain Euler for ``ddim``). Call it with ``sigmas=[1, .75, .5, .25][:k]`` and
    ``guidance_scale=1.0``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False,
                                                stochastic_sampling=config.generator.noise_type == "fresh")
    components = {**teacher.pipe.components, "transformer": generator.transformer, "scheduler": scheduler}
    pipe = type(teacher.pipe)(**components)
    pipe.save_pretrained(out)
    k_sigmas = [round(t, 6) for t in (config.generator.t_init * (1 - i / config.generator.num_steps)
                                      for i in range(config.generator.num_steps))]
    (out / "sidflow_generator.json").write_text(json.dumps({
        "sigmas": k_sigmas, "guidance_scale": 1.0, "noise_type": config.generator.noise_type,
        "usage": "pipe(prompt, sigmas=sigmas[:k], guidance_scale=1.0); fixed noise has no stock equivalent",
    }, indent=1) + "\n")
    return out


def _headline(result: dict[str, Any], config: SiDConfig) -> list[dict[str, Any]]:
    rows = []
    teacher_rows = result.get("teacher", {}).get("rows", [])
    for r in sorted(teacher_rows, key=lambda r: (r["guidance"], r["steps"])):
        rows.append({"model": f"teacher Euler, w={r['guidance']:g}", "steps": r["steps"], "NFE": r["nfe"],
                     "FID": r["fid"], "prompt acc": r["accuracy"], "s/image": r.get("seconds_per_image", "")})
    final = result.get("final", {})
    for steps in config.eval.student_steps:
        if f"fid_{steps}step" in final:
            rows.append({"model": "SiD student", "steps": steps, "NFE": steps, "FID": final[f"fid_{steps}step"],
                         "prompt acc": final[f"acc_{steps}step"],
                         "s/image": final.get(f"sec_per_image_{steps}step", "")})
    return rows


def _steps(k: int | str) -> str:
    return f"{k} step{'s' if int(k) > 1 else ''}"


def _per_k(values: tuple[float, ...] | None) -> str:
    return "uniform" if values is None else ":".join(f"{x:g}" for x in values)


def _k_odds(config: SiDConfig) -> str:
    gc = config.generator
    odds = _per_k(gc.k_weights)
    return odds if gc.k_weights_end is None else f"{odds} -> {_per_k(gc.k_weights_end)}"


def _alpha(config: SiDConfig) -> str:
    lc = config.loss
    return f"{lc.alpha:g}" if lc.alpha_k is None else "by k " + _per_k(lc.alpha_k)


def _figures_line(config: SiDConfig, result: dict[str, Any]) -> str:
    """Which weights the figures come from: the final ones, or the snapshot selected on validation."""
    ema = " (EMA)" if config.train.ema_halflife_kimg > 0 else ""
    selected = result.get("selected")
    if not selected:
        return f"figures: final weights{ema}"
    last = result.get("last")
    if "by_steps" in selected:
        where = "; ".join(f"{_steps(k)} from the snapshot at "
                          f"{v['images_seen'] / 1000:.1f}k images" for k, v in selected["by_steps"].items())
    else:
        where = (f"the snapshot at {selected['images_seen'] / 1000:.1f}k images" if last else "the final weights")
    return (f"figures: {where}{ema}, selected by {selected['rule']}; the held-out digits are never used "
            "for selection" + (f" (last weights: {_describe_row(last)})" if last else ""))


def _describe_row(row: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('fid_')} FID {row[k]:.1f}" for k in row if k.startswith("fid_"))


def finish_run(run_dir: Path, config: SiDConfig, teacher, generator: Denoiser, latent_shape, evaluation,
               result: dict[str, Any], generators: dict[int, Denoiser] | None = None) -> None:
    """Write grids, plot, exported pipeline and ``report.md`` into ``run_dir`` (updates ``result``).

    ``generator`` is exported; ``generators`` (step count -> weights, when the run selected a
    snapshot per step count) draws each student row of the grid.
    """
    prompts, noise = _grid_prompts(config, evaluation)
    if noise.numel() == 0:
        noise = randn_per_sample(tuple(latent_shape), seed=config.train.seed, iteration=0, stream="grid/z",
                                 indices=range(len(prompts)))
    teacher_w = float(result.get("teacher", {}).get("best", {}).get("guidance", 1.0))
    rows = {f"teacher {s} steps (w={teacher_w:g})": teacher_images(teacher, noise, prompts, steps=s,
                                                                    guidance=teacher_w)
            for s in config.eval.teacher_grid_steps}
    cond = teacher.encode_prompts(prompts)
    for steps in config.eval.student_steps:
        student = (generators or {}).get(steps, generator)
        latents = sample_student(student, cond, tuple(latent_shape), config, steps=steps,
                                 seed=config.train.seed, device=teacher.device, z=noise)
        rows[f"student {_steps(steps)}"] = teacher.decode_latents(
            latents.to(teacher.device)).float().cpu()
    save_labelled_grids(rows, run_dir / "samples.png", nrow=len(prompts))
    images = {"Samples (same prompts and initial noise per column)": "samples.png"}
    teacher_ref = result.get("teacher", {})
    if result.get("history"):
        reference = {}
        if teacher_ref.get("best"):
            reference["teacher best FID"] = teacher_ref["best"]["fid"]
            reference["teacher best acc"] = teacher_ref["best"]["accuracy"]
        if teacher_ref.get("floor_fid"):
            reference["real-vs-real FID"] = teacher_ref["floor_fid"]
        selected = result.get("selected")
        marks = ({f"selected ({_steps(k)})": v["images_seen"] / 1000
                  for k, v in selected["by_steps"].items()} if selected and "by_steps" in selected
                 else {"selected snapshot": selected["images_seen"] / 1000} if selected else {})
        plot_metrics(result["history"], run_dir / "metrics.png", reference=reference, marks=marks)
        images["FID and prompt accuracy against training images"] = "metrics.png"
    export_generator(teacher, generator, run_dir / "generator_pipeline", config)
    summary = [f"teacher: `{config.teacher.path}`; preset `{config.name}`",
               f"{result['iterations']} iterations, {result['images_seen']} generator images, "
               f"{result['train_seconds'] / 60:.1f} min of training "
               f"({result['wall_seconds_before_report'] / 60:.1f} min with evaluation)",
               f"generator: {config.generator.num_steps}-step schedule, noise `{config.generator.noise_type}`, "
               f"k odds {_k_odds(config)}; alpha {_alpha(config)}; "
               f"kappa1..4 = {config.guidance.kappa1:g}/{config.guidance.kappa2:g}/"
               f"{config.guidance.kappa3_value:g}/{config.guidance.kappa4:g}; lr {config.optim.lr:g}, "
               f"glr {config.optim.glr:g}, batch {config.train.batch}",
               _figures_line(config, result)
               + "; teacher figures from the cached baseline, same evaluator, prompts and seeds"]
    if teacher_ref.get("floor_fid"):
        summary.append(f"real-vs-real FID floor: {teacher_ref['floor_fid']:.1f}")
    columns = ["model", "steps", "NFE", "FID", "prompt acc", "s/image"]
    tables = {"Teacher vs student": (_headline(result, config), columns)} if evaluation is not None else {}
    links = {"config": "config.json", "metrics": "metrics.json", "training log": "log.jsonl",
             "final checkpoint": result["checkpoint"], "generator as a diffusers pipeline": "generator_pipeline",
             "TensorBoard logs": "tensorboard"}
    selected = result.get("selected")
    if selected and "by_steps" in selected:
        for k, v in selected["by_steps"].items():
            links[f"snapshot selected for {_steps(k)} (reported; used by "
                  f"`sidflow sample`{', exported' if v['path'] == selected['path'] else ''})"] = v["path"]
    elif selected:
        links["selected snapshot (reported, exported, used by `sidflow sample`)"] = selected["path"]
    write_report(run_dir / "report.md", title="sidflow distillation report", summary=summary, tables=tables,
                 images=images, links=links)
