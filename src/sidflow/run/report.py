"""The end of a run: sample grids (teacher vs student, same prompts and seeds), the metric plot,
the generator exported as a stock diffusers pipeline (spec 15) and a one-page ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from sidflow.config import SiDConfig
from sidflow.core.denoiser import Denoiser
from sidflow.core.generator import generate, generator_step_times
from sidflow.core.guidance import with_embedded_guidance
from sidflow.core.rng import randn_per_sample
from sidflow.eval.protocol import Evaluation
from sidflow.eval.report import plot_metrics, save_labelled_grids, write_report
from sidflow.run.export import LORA_DIR, export_generator, export_lora
from sidflow.run.registry import resolve_prompts

__all__ = ["finish_run"]


def _grid_prompts(
    config: SiDConfig, evaluation: Evaluation | None, latent_shape: tuple[int, ...]
) -> tuple[list[str], Tensor]:
    """Grid prompts and initial noise: the evaluation's, else the run's first prompts with keyed noise."""
    n = config.eval.grid_size
    if evaluation is not None:
        return evaluation.grid(n)
    prompts = resolve_prompts(config.data.prompts)
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    return prompts, randn_per_sample(
        latent_shape, seed=config.train.seed, iteration=0, stream="grid/z", indices=range(n)
    )


def _student_images(
    teacher: Any, generator: Denoiser, prompts: list[str], noise: Tensor, config: SiDConfig, steps: int
) -> Tensor:
    gc = config.generator
    cond = with_embedded_guidance(teacher.encode_prompts(prompts), config.guidance.embedded_generator)
    latents = generate(
        generator,
        cond,
        tuple(noise.shape[1:]),
        steps=steps,
        step_times=generator_step_times(gc.num_steps, gc.t_init, gc.shift),
        noise_type=gc.noise_type,
        seed=config.train.seed,
        z=noise,
        batch=250,
        device=teacher.device,
    )
    return teacher.decode_latents(latents).float().cpu()


def _headline(result: dict[str, Any], config: SiDConfig) -> list[dict[str, Any]]:
    rows = []
    teacher_rows = result.get("teacher", {}).get("rows", [])
    for r in sorted(teacher_rows, key=lambda r: (r["guidance"], r["steps"])):
        rows.append(
            {
                "model": f"teacher Euler, w={r['guidance']:g}",
                "steps": r["steps"],
                "NFE": r["nfe"],
                "FID": r["fid"],
                "prompt acc": r["accuracy"],
                "s/image": r.get("seconds_per_image", ""),
            }
        )
    final = result.get("final", {})
    for steps in config.eval.student_steps:
        if f"fid_{steps}step" in final:
            rows.append(
                {
                    "model": "SiD student",
                    "steps": steps,
                    "NFE": steps,
                    "FID": final[f"fid_{steps}step"],
                    "prompt acc": final[f"acc_{steps}step"],
                    "s/image": final.get(f"sec_per_image_{steps}step", ""),
                }
            )
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
        where = "; ".join(
            f"{_steps(k)} from the snapshot at {v['images_seen'] / 1000:.1f}k images"
            for k, v in selected["by_steps"].items()
        )
    else:
        where = f"the snapshot at {selected['images_seen'] / 1000:.1f}k images" if last else "the final weights"
    return (
        f"figures: {where}{ema}, selected by {selected['rule']}; the reference set of the reported "
        "figures is never used for selection" + (f" (last weights: {_describe_row(last)})" if last else "")
    )


def _describe_row(row: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('fid_')} FID {row[k]:.1f}" for k in row if k.startswith("fid_"))


def finish_run(
    run_dir: Path,
    config: SiDConfig,
    teacher: Any,
    generator: Any,
    latent_shape: tuple[int, ...],
    evaluation: Evaluation | None,
    result: dict[str, Any],
    generators: dict[int, Any] | None = None,
) -> None:
    """Write grids, plot, exported pipeline and ``report.md`` into ``run_dir`` (updates ``result``).

    ``generator`` is exported; ``generators`` (step count -> weights, when the run selected a
    snapshot per step count) draws each student row of the grid.
    """
    prompts, noise = _grid_prompts(config, evaluation, tuple(latent_shape))
    teacher_w = float(result.get("teacher", {}).get("best", {}).get("guidance", 1.0))
    rows = {
        f"teacher {s} steps (w={teacher_w:g})": teacher.decode_latents(
            teacher.sample(prompts, noise, num_steps=s, guidance_scale=teacher_w)
        )
        .float()
        .cpu()
        for s in config.eval.teacher_grid_steps
    }
    for steps in config.eval.student_steps:
        student = (generators or {}).get(steps, generator)
        rows[f"student {_steps(steps)}"] = _student_images(teacher, student, prompts, noise, config, steps)
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
        marks = (
            {f"selected ({_steps(k)})": v["images_seen"] / 1000 for k, v in selected["by_steps"].items()}
            if selected and "by_steps" in selected
            else {"selected snapshot": selected["images_seen"] / 1000}
            if selected
            else {}
        )
        plot_metrics(result["history"], run_dir / "metrics.png", reference=reference, marks=marks)
        images["FID and prompt accuracy against training images"] = "metrics.png"
    export_generator(teacher, generator, run_dir / "generator_pipeline", config)
    if config.lora.rank > 0:
        export_lora(teacher, generator, run_dir / LORA_DIR, config)
    summary = [
        f"teacher: `{config.teacher.path}`; preset `{config.name}`",
        f"{result['iterations']} iterations, {result['images_seen']} generator images, "
        f"{result['train_seconds'] / 60:.1f} min of training "
        f"({result['wall_seconds_before_report'] / 60:.1f} min with evaluation)",
        f"generator: {config.generator.num_steps}-step schedule, noise `{config.generator.noise_type}`, "
        f"k odds {_k_odds(config)}; alpha {_alpha(config)}; "
        f"kappa1..4 = {config.guidance.kappa1:g}/{config.guidance.kappa2:g}/"
        f"{config.guidance.kappa3_value:g}/{config.guidance.kappa4:g}; lr {config.optim.lr:g}, "
        f"glr {config.optim.glr:g}, batch {config.train.batch}",
        _figures_line(config, result) + "; teacher figures from the cached baseline, same evaluator, prompts and seeds",
    ]
    if teacher_ref.get("floor_fid"):
        summary.append(f"real-vs-real FID floor: {teacher_ref['floor_fid']:.1f}")
    columns = ["model", "steps", "NFE", "FID", "prompt acc", "s/image"]
    tables = {"Teacher vs student": (_headline(result, config), columns)} if evaluation is not None else {}
    links = {
        "config": "config.json",
        "metrics": "metrics.json",
        "training log": "log.jsonl",
        "final checkpoint": result["checkpoint"],
        "generator as a diffusers pipeline": "generator_pipeline",
    }
    if (run_dir / "tensorboard").is_dir():
        links["TensorBoard logs"] = "tensorboard"
    selected = result.get("selected")
    if selected and "by_steps" in selected:
        for k, v in selected["by_steps"].items():
            links[
                f"snapshot selected for {_steps(k)} (reported; used by "
                f"`sidflow sample`{', exported' if v['path'] == selected['path'] else ''})"
            ] = v["path"]
    elif selected:
        links["selected snapshot (reported, exported, used by `sidflow sample`)"] = selected["path"]
    write_report(
        run_dir / "report.md",
        title="sidflow distillation report",
        summary=summary,
        tables=tables,
        images=images,
        links=links,
    )
