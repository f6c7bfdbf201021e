"""Typed, frozen run configuration of a SiD distillation, named presets and dotted overrides.

One :class:`SiDConfig` holds a section per concern (teacher, generator, loss, guidance, optimiser,
training loop, SiDA adversarial term); defaults follow the spec's "at a glance" column (spec
sections 3-7 and 10). Choices are string enums (``Literal`` types), never booleans. Named presets live
in :mod:`sidflow.run.presets`; the CLI applies overrides such as
``loss.alpha=1.2`` with :func:`apply_overrides`, which checks every value against the field's type
and raises a one-line :class:`~sidflow.errors.ConfigError` naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from sidflow.errors import ConfigError

__all__ = [
    "TeacherConfig",
    "GeneratorConfig",
    "LossConfig",
    "GuidanceConfig",
    "OptimConfig",
    "TrainConfig",
    "GANConfig",
    "LoraConfig",
    "DataConfig",
    "EvalConfig",
    "SiDConfig",
    "apply_overrides",
    "to_json",
    "from_json",
    "to_dict",
    "from_dict",
]

Weighting = Literal[
    "1_minus_sigma", "1_minus_sigma_squared", "1_over_sigma", "1_over_sigma2", "snr_sqrt", "snr", "sid_legacy"
]


def _validate(obj: Any) -> None:
    """Check every field of a config dataclass against its annotated type (Literal choices too)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(value):  # store the coerced value (e.g. int 3 -> 3.0)
            object.__setattr__(obj, f.name, _coerce(hints[f.name], value, f"{type(obj).__name__}.{f.name}"))


@dataclass(frozen=True)
class TeacherConfig:
    kind: str = "pipeline"  # "pipeline" (a diffusers teacher) or a plugin's runner (e.g. "gmm")
    path: str = ""  # a pipeline folder, a hub id or a registered name ("bundled"); gmm: "2d" | "image"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights of teacher/fake/generator
    # transformer time input = time_scale * t; None = read from the pipeline (SANA: 1000 x the
    # transformer's timestep_scale), else the family's
    time_scale: float | None = None
    # text tokens; None = the text tokenizer's model_max_length capped at the family's (SD3 T5 77,
    # FLUX 512, SANA 300)
    max_sequence_length: int | None = None
    # on all three networks, the frozen teacher's backward into its inputs included
    gradient_checkpointing: Literal["off", "on"] = "off"
    # text encoders' precision; auto = bf16 on CUDA, fp32 on CPUs (bf16 is ~24x slower there)
    text_encoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: str | None = None  # hub teachers: a commit, branch or tag
    variant: str | None = None  # hub teachers: a weight variant (e.g. fp16, bf16)
    # the environment variable holding the hub token (the token itself is never stored in a config)
    token_env: str = "HF_TOKEN"

    def __post_init__(self) -> None:
        _validate(self)
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ConfigError(f"teacher.max_sequence_length={self.max_sequence_length} must be >= 1 (or none)")
        if self.token_env.startswith("hf_") or not self.token_env.replace("_", "").isalnum():
            raise ConfigError(
                "teacher.token_env names the environment variable that holds the hub token, not the token; "
                "export HF_TOKEN=... and leave teacher.token_env=HF_TOKEN"
            )


@dataclass(frozen=True)
class GeneratorConfig:
    num_steps: int = 4  # K (spec 3.1)
    t_init: float = 1.0  # time of the first step (999/999)
    noise_type: Literal["fresh", "fixed", "ddim"] = "fresh"
    shift: float | None = None  # SD3 step-time warp (3.0), None = off
    # relative odds of training k = 1..K steps in an iteration; None = uniform (the paper, spec 3.3)
    k_weights: tuple[float, ...] | None = None
    # odds at the last iteration: the odds move linearly from k_weights (uniform if None) to these
    # over the run (a curriculum); None = fixed odds
    k_weights_end: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _validate(self)
        if self.num_steps < 1 or not 0 < self.t_init <= 1:
            raise ConfigError("generator.num_steps must be >= 1 and generator.t_init in (0, 1]")
        for name in ("k_weights", "k_weights_end"):
            w = getattr(self, name)
            if w is not None and (len(w) != self.num_steps or min(w) < 0 or sum(w) <= 0):
                raise ConfigError(
                    f"generator.{name}={','.join(map(str, w))} needs {self.num_steps} "
                    "non-negative values (one per k = 1..num_steps) with a positive sum, "
                    "or none for the uniform draw"
                )

    def k_odds(self, progress: float) -> tuple[float, ...] | None:
        """Relative odds of k = 1..K at ``progress`` in [0, 1] of the run; None = uniform."""
        if self.k_weights_end is None:
            return self.k_weights
        start = _normalised(self.k_weights or (1.0,) * self.num_steps)
        end = _normalised(self.k_weights_end)
        f = min(max(progress, 0.0), 1.0)
        return tuple((1.0 - f) * a + f * b for a, b in zip(start, end, strict=True))


def _normalised(weights: tuple[float, ...]) -> tuple[float, ...]:
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 1.0  # SiD alpha (1.2 in original SiD)
    # alpha of iterations that train k = 1..K steps (one value per k); None = alpha for every k
    alpha_k: tuple[float, ...] | None = None
    weighting: Weighting = "1_minus_sigma"
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    t_mean: float = math.log(2.0)  # logit-normal location
    t_std: float = 1.6  # logit-normal scale
    t_min: float = 0.0  # uniform range
    t_max: float = 1.0
    ls: float = 1.0  # fake-score loss scale
    lsg: float = 100.0  # generator loss scale

    def __post_init__(self) -> None:
        _validate(self)

    def alpha_for(self, k: int) -> float:
        """The SiD alpha of an iteration whose generator runs ``k`` steps."""
        return self.alpha if self.alpha_k is None else self.alpha_k[k - 1]


@dataclass(frozen=True)
class GuidanceConfig:
    kappa1: float = 4.5  # CFG of the fake score in its own loss
    kappa2: float = 4.5  # CFG of the fake score in the generator loss (first factor)
    kappa3: float | None = None  # ... second factor; None = kappa2
    kappa4: float = 4.5  # CFG of the teacher in the generator loss
    embedded_teacher: float | None = None  # FLUX embedded guidance for teacher and fake; None = untouched
    embedded_generator: float | None = 1.0  # FLUX embedded guidance for the generator

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def kappa3_value(self) -> float:
        return self.kappa2 if self.kappa3 is None else self.kappa3


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5  # fake score
    glr: float = 1e-5  # generator
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float | None = None  # Adam eps; None = 1e-8, or the reference's 1e-4 under train.precision=pure_bf16
    # clip-by-value of both networks' grads; None = off, or 1.0 under pure_bf16; 0 = off
    grad_clip: float | None = None
    # both learning rates fall linearly to decay_min x their value over the last decay_frac of the
    # iterations (a warmup-stable-decay tail); 0 = constant, as in the paper
    decay_frac: float = 0.0
    decay_min: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)  # betas become floats: torch 2.13's Adam rejects the integer 0
        if not (0.0 <= self.decay_frac <= 1.0 and 0.0 <= self.decay_min <= 1.0):
            raise ConfigError(
                f"optim.decay_frac={self.decay_frac} and optim.decay_min={self.decay_min} must lie in [0, 1]"
            )


@dataclass(frozen=True)
class TrainConfig:
    batch: int = 256  # global batch B
    batch_gpu: int = 8  # micro-batch b per rank and round
    max_steps: int = 1000  # iterations (ignored when total_kimg is set)
    total_kimg: float | None = None  # training length in thousands of generator images
    seed: int = 0
    log_every: int = 10  # iterations between metric logs
    ckpt_every: int = 500  # iterations between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (older ones deleted; 0 = keep all); snapshots always kept
    ema_halflife_kimg: float = 0.0  # generator EMA half-life; 0 = off
    max_nonfinite_frac: float = 0.1  # abort with NonFiniteError past this fraction of a phase's samples
    # FSDP2 fully_shard per transformer block, then per transformer (spec 16); needs torchrun with
    # > 1 process (pipeline teachers): a single process runs unsharded and says so
    sharding: Literal["none", "fsdp2"] = "none"
    # fp32: everything fp32; amp_bf16: fp32 master weights and Adam, bf16 autocast (FSDP2:
    # MixedPrecisionPolicy bf16 params, fp32 reduce), frozen teacher stored in bf16, TF32 on;
    # pure_bf16: bf16 weights, stochastic-rounding Adam; auto: amp_bf16 on CUDA, fp32 on CPUs
    precision: Literal["auto", "fp32", "amp_bf16", "pure_bf16"] = "auto"
    # FSDP2 memory levers (train.sharding=fsdp2): free each unit's gathered weights after its
    # forward (re-gathered for backward; False keeps them, faster and larger), and keep the shards,
    # their gradients and the Adam state in host memory (FSDP2 CPUOffloadPolicy; Adam steps on the CPU)
    reshard_after_forward: Literal["on", "off"] = "on"
    cpu_offload: Literal["off", "on"] = "off"
    # FSDP2 accumulation rounds: "sharded" reduce-scatters every round and accumulates sharded
    # gradients (1/world of the memory, R reduce-scatters); "unsharded" keeps full gradients until
    # the last round (FSDP1's no_sync: one reduce-scatter, a full gradient copy per rank)
    accumulate: Literal["sharded", "unsharded"] = "sharded"
    # start from a finished run's newest checkpoint (fake score, generator and its EMA; the generator
    # from its EMA weights when init_generator=ema), as the reference's SiDA stage starts from SiD; the
    # optimiser states too with init_optimizers=on. Ignored once this run has a checkpoint (resume).
    init_from: str = ""
    init_generator: Literal["ema", "raw"] = "ema"
    init_optimizers: Literal["off", "on"] = "off"

    def __post_init__(self) -> None:
        _validate(self)
        if self.batch < 1 or self.batch_gpu < 1 or self.batch % self.batch_gpu:
            raise ConfigError(f"train.batch={self.batch} must be a multiple of train.batch_gpu={self.batch_gpu}")
        # 0 is a run that only writes its starting checkpoint (e.g. one started with train.init_from);
        # a negative length would "finish" with exit code 0 having trained nothing
        if self.max_steps < 0:
            raise ConfigError(f"train.max_steps={self.max_steps} must be >= 0 (0: only the starting checkpoint)")
        if self.total_kimg is not None and self.total_kimg <= 0:
            raise ConfigError(f"train.total_kimg={self.total_kimg:g} must be > 0 (or none: train.max_steps counts)")

    def num_steps(self) -> int:
        """Iterations to run: ``ceil(total_kimg * 1000 / batch)`` or ``max_steps``."""
        if self.total_kimg is None:
            return self.max_steps
        return math.ceil(self.total_kimg * 1000 / self.batch)


@dataclass(frozen=True)
class GANConfig:
    mode: Literal["off", "sida"] = "off"  # SiDA: fake-score features as discriminator (spec 7)
    warmup_kimg: float = 20.0  # no generator update before this many images
    mix_kimg: float = 40.0  # after this, generator loss 0.5 SiD + 0.5 adversarial
    mix: float = 0.5  # weight of the adversarial term after mix_kimg
    # that weight for iterations that train k = 1..K steps (one value per k); None = mix for every k
    mix_k: tuple[float, ...] | None = None
    # the weight rises linearly from 0 over this many images after mix_kimg; 0 = a step (the reference)
    mix_ramp_kimg: float = 0.0
    lsd: float = 1.0  # discriminator loss scale
    lsg_gan: float = 1.0  # generator adversarial loss scale

    def __post_init__(self) -> None:
        _validate(self)
        if not all(0.0 <= m <= 1.0 for m in (self.mix, *(self.mix_k or ()))):
            raise ConfigError(f"gan.mix={self.mix} and gan.mix_k={self.mix_k} must lie in [0, 1]")
        if not math.isfinite(self.mix_ramp_kimg) or self.mix_ramp_kimg < 0:
            raise ConfigError(f"gan.mix_ramp_kimg={self.mix_ramp_kimg} must be >= 0 (0 = no ramp)")

    def mix_for(self, k: int, images_seen: float = math.inf) -> float:
        """The adversarial weight of an iteration whose generator runs ``k`` steps, ``images_seen``
        images into the run (past ``mix_kimg``; ``mix_ramp_kimg`` ramps it in)."""
        mix = self.mix if self.mix_k is None else self.mix_k[k - 1]
        if self.mix_ramp_kimg > 0:
            mix *= min(1.0, max(0.0, images_seen / 1000 - self.mix_kimg) / self.mix_ramp_kimg)
        return mix


@dataclass(frozen=True)
class LoraConfig:
    """LoRA mode (:mod:`sidflow.teachers.lora`): one frozen base, fake score and generator two adapters."""

    rank: int = 0  # LoRA rank; 0 = off: three full copies (the reference)
    alpha: float | None = None  # LoRA alpha (adapter scale alpha / rank); None = rank (scale 1)
    targets: tuple[str, ...] | None = None  # module-name suffixes inside the blocks; None = the family's
    # "on": one base shared by teacher, fake score and generator; "off": a LoRA generator on full copies
    share_base: Literal["on", "off"] = "on"
    # gradient checkpointing of the teacher's and fake score's passes on the shared base: "recompute"
    # (under the adapter state of their forward) or "off" (only the generator's passes are recomputed)
    critic_checkpointing: Literal["recompute", "off"] = "recompute"

    def __post_init__(self) -> None:
        _validate(self)
        if self.rank < 0:
            raise ConfigError(f"lora.rank={self.rank} must be >= 0 (0 = full copies, no LoRA)")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be > 0 (or none: alpha = rank)")


@dataclass(frozen=True)
class DataConfig:
    # prompt source: a .txt (one per line), .jsonl, .csv or .parquet file, a datasets folder saved with
    # save_to_disk ("folder::split" picks a split, default train) or "builtin:NAME" (e.g. builtin:digits)
    prompts: str = ""
    prompt_column: str | None = None  # table column of the prompts; None = "text", "prompt" or "caption"
    resolution: int = 512  # image resolution; latents are resolution / VAE factor
    cache_dir: str | None = None  # on-disk prompt-embedding cache (sharded safetensors); None = memory only
    cache_size: int = 4096  # prompts kept in the in-memory LRU
    # SiDA's real images with captions (gan.mode=sida): a folder with a captions file (metadata.jsonl /
    # captions.jsonl / .csv: file_name + caption), a captions .jsonl/.csv, a .parquet file, a datasets
    # folder, or builtin:NAME; their latents are encoded once and cached under data.cache_dir/latents
    real: str = ""
    real_caption_column: str | None = None  # None = "caption", "text" or "prompt"
    real_image_column: str | None = None  # parquet / datasets; None = "image", "img", "jpg" or "png"

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class EvalConfig:
    kind: str = "none"  # "none" or a registered evaluation (e.g. "digits", the bundled evaluator)
    every_kimg: float = 0.0  # evaluate every this many thousand training images; 0 = only at the end
    num_samples: int = 1000  # samples per figure (100 per class for "digits")
    student_steps: tuple[int, ...] = (1, 4)  # generator step counts scored at each evaluation
    teacher_grid_steps: tuple[int, ...] = (4, 32)  # teacher rows of the sample grid
    grid_size: int = 20  # images per row of the sample grids
    at_start: Literal["on", "off"] = "on"  # also score the untrained generator (the teacher's sampler)
    # which weights the run reports and exports: "final" (the last, EMA when on), "validation" (the
    # evaluated snapshot with the best validation FID over all student_steps, never measured on the
    # held-out set; spec 9) or "validation_per_steps" (the best snapshot for each step count)
    select: Literal["final", "validation", "validation_per_steps"] = "final"
    # eval.kind=t2i (any diffusers teacher; README "Evaluating real teachers"):
    prompts: str = ""  # reported prompts: a text/JSONL/CSV/parquet file, a datasets folder, or builtin:NAME
    prompt_column: str | None = None  # their column (JSONL/CSV/parquet/datasets); None = text/prompt/caption
    val_prompts: str = ""  # validation prompts for eval.select (disjoint from eval.prompts); "" = none
    val_samples: int = 500  # validation samples per figure
    # reference of the reported distances: "teacher" (its samples of the same prompts and noise: FD-T)
    # or real images (a folder, or a parquet file with an image column; COCO layout in the README)
    reference: str = "teacher"
    metrics: tuple[str, ...] = ("fd_dinov2", "clip")  # of fd_dinov2, fid ([fid] extra), clip, pickscore
    dino_model: str = "facebook/dinov2-large"  # hub id or local folder of a Dinov2Model
    clip_model: str = "openai/clip-vit-large-patch14"  # ... of a CLIPModel with its tokenizer
    pickscore_model: str = "yuvalkirstain/PickScore_v1"  # ... of PickScore (a CLIPModel)
    pickscore_tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore ships without one
    teacher_steps: int = 28  # teacher reference: Euler steps
    teacher_guidance: float | None = None  # teacher reference: CFG scale; None = guidance.kappa4
    batch: int = 16  # images per generator pass and per metric-model forward
    feature_cache: str | None = None  # reference features on disk; None = $SIDFLOW_CACHE or ~/.cache/sidflow

    def __post_init__(self) -> None:
        _validate(self)
        from sidflow.metrics.suite import METRICS

        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ConfigError(f"eval.metrics={','.join(self.metrics)!r}: choose from {', '.join(METRICS)}")
        for key in ("batch", "teacher_steps", "num_samples", "val_samples", "grid_size"):
            if getattr(self, key) < (2 if key in ("num_samples", "val_samples") else 1):
                raise ConfigError(f"eval.{key}={getattr(self, key)} is too small; it must be at least 1 (samples: 2)")
        if self.select != "final" and self.kind == "none":
            raise ConfigError(
                f"eval.select={self.select} needs an evaluation with validation FIDs "
                "(e.g. eval.kind=digits); use eval.select=final"
            )


@dataclass(frozen=True)
class SiDConfig:
    name: str = "custom"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        steps = self.generator.num_steps
        for key, values, fallback in (
            ("loss.alpha_k", self.loss.alpha_k, "loss.alpha"),
            ("gan.mix_k", self.gan.mix_k, "gan.mix"),
        ):
            if values is not None and len(values) != steps:
                raise ConfigError(
                    f"{key}={','.join(map(str, values))} needs {steps} values (one per k = "
                    f"1..generator.num_steps), or none to use {fallback} for every k"
                )


# ---- (de)serialisation and overrides ----------------------------------------------------------
def _choices(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return ", ".join(map(str, args))
    return " | ".join(getattr(a, "__name__", str(a)) for a in args) or getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` (a string from the CLI or a JSON value) to type ``tp`` or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {_choices(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} is not valid; expected {_choices(tp)}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
        parts = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(args[0], p, key) for p in parts if p != "")
    if origin is tuple:
        parts = value.split(",") if isinstance(value, str) else list(value)
        if len(parts) != len(args):
            raise ConfigError(f"{key}={value!r} needs {len(args)} comma-separated values")
        return tuple(_coerce(a, p, key) for a, p in zip(args, parts, strict=True))
    try:
        if tp is bool or isinstance(value, bool):
            raise ValueError
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return tp(value) if tp in (int, float, str) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not valid; expected {_choices(tp)}") from None


def to_dict(config: SiDConfig) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(data: dict[str, Any]) -> SiDConfig:
    """Build a config from :func:`to_dict` output; unknown keys raise ConfigError."""
    hints = typing.get_type_hints(SiDConfig)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(f"unknown config section {name!r}; valid: {', '.join(hints)}")
        if name == "name":
            sections[name] = str(value)
            continue
        sections[name] = _build_section(hints[name], value, name)
    return SiDConfig(**sections)


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}; valid: {', '.join(hints)}")
        kwargs[key] = _coerce(hints[key], value, f"{section}.{key}")
    return cls(**kwargs)


def to_json(config: SiDConfig) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=False)


def from_json(text: str) -> SiDConfig:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config JSON is malformed ({err}); fix or regenerate it with --dry-run") from None
    return from_dict(data)


def apply_overrides(config: SiDConfig, overrides: list[str]) -> SiDConfig:
    """Apply ``section.key=value`` overrides (a leading ``--`` is allowed), type-checked."""
    hints = typing.get_type_hints(SiDConfig)
    changes: dict[str, dict[str, Any]] = {}  # applied per section at the end, so that cross-field
    for item in overrides:  # checks (batch % batch_gpu) see every override at once
        text = item[2:] if item.startswith("--") else item
        key, sep, raw = text.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. loss.alpha=1.2)")
        if section not in hints or section == "name":
            raise ConfigError(
                f"unknown config section {section!r}; valid: {', '.join(h for h in hints if h != 'name')}"
            )
        current = getattr(config, section)
        sec_hints = typing.get_type_hints(type(current))
        if name not in sec_hints:
            raise ConfigError(f"unknown key {key!r}; valid keys of {section}: {', '.join(sec_hints)}")
        changes.setdefault(section, {})[name] = _coerce(sec_hints[name], raw, key)
    for section, values in changes.items():
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
    return config
