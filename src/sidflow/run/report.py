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
from sidflow.eval.protocol import DISTANCE_KEYS, FIGURES, SCORE_KEYS, Evaluation, figures
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
    prompts = resolve_prompts(config.data.prompts, config.data.prompt_column)
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
    teacher_ref = result.get("teacher", {})
    for r in sorted(teacher_ref.get("rows", []), key=lambda r: (r["guidance"], r["steps"])):
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
    t2i = teacher_ref.get("t2i")
    if t2i:  # the teacher's own scores on the reported prompts (it is the FD reference itself)
        nfe = t2i["steps"] * (2 if t2i["guidance"] != 1 else 1)
        row = {"model": f"teacher Euler, w={t2i['guidance']:g} (reference)", "steps": t2i["steps"], "NFE": nfe}
        rows.append(row | {FIGURES[k]: v for k, v in t2i.items() if k in FIGURES})
    final = result.get("final", {})
    for steps in config.eval.student_steps:
        shown = figures(final, steps)
        if shown:
            rows.append(
                {"model": "SiD student", "steps": steps, "NFE": steps, **shown}
                | {"s/image": final.get(f"sec_per_image_{steps}step", "")}
            )
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    present = {k for r in rows for k in r}
    return ["model", "steps", "NFE", *(v for v in FIGURES.values() if v in present), "s/image"]


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
    return _value_or_by_k(lc.alpha, lc.alpha_k)


def _value_or_by_k(value: float, per_k: tuple[float, ...] | None) -> str:
    """A setting that may be given per step count k (``loss.alpha_k``, ``gan.mix_k``)."""
    return f"{value:g}" if per_k is None else "by k " + _per_k(per_k)


def _sida_line(config: SiDConfig) -> str:
    g = config.gan
    mix = _value_or_by_k(g.mix, g.mix_k)
    frozen = f"generator frozen for {g.warmup_kimg:g}k images, " if g.warmup_kimg > 0 else ""
    return (
        f"SiDA: real images `{config.data.real}`; {frozen}SiD alone "
        f"until {g.mix_kimg:g}k images, then adversarial weight {mix}"
        + (f" (reached over {g.mix_ramp_kimg:g}k images)" if g.mix_ramp_kimg > 0 else "")
    )


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
    steps = [k.removeprefix("sec_per_image_").removesuffix("step") for k in row if k.startswith("sec_per_image_")]
    return ", ".join(f"{k} step {' '.join(f'{label} {v:.4g}' for label, v in figures(row, k).items())}" for k in steps)


def _plotted(history: list[dict[str, Any]]) -> tuple[str, str]:
    """The distance and the score the metrics plot shows (the first of each that the rows carry)."""
    keys = {k.rsplit("_", 1)[0] for row in history for k in row if k.endswith("step")}
    distance = next((m for m in DISTANCE_KEYS if m in keys), DISTANCE_KEYS[0])
    return distance, next((m for m in SCORE_KEYS if m in keys), SCORE_KEYS[0])


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
    teacher_ref = result.get("teacher", {})
    # the guidance of the teacher's figures: its best on the digits protocol, the t2i reference's
    teacher_w = float(teacher_ref.get("best", teacher_ref.get("t2i", {})).get("guidance", 1.0))
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
        shown = _plotted(result["history"])
        plot_metrics(result["history"], run_dir / "metrics.png", reference=reference, marks=marks, metrics=shown)
        images[f"{FIGURES[shown[0]]} and {FIGURES[shown[1]]} against training images"] = "metrics.png"
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
        *([_sida_line(config)] if config.gan.mode == "sida" else []),
        _figures_line(config, result) + "; teacher figures from the cached baseline, same evaluator, prompts and seeds",
    ]
    if teacher_ref.get("floor_fid"):
        summary.append(f"real-vs-real FID floor: {teacher_ref['floor_fid']:.1f}")
    headline = _headline(result, config)
    tables = {"Teacher vs student": (headline, _columns(headline))} if evaluation is not None else {}
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
