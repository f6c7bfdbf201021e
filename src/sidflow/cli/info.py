"""``sidflow info --teacher ID_OR_PATH``: describe a teacher from its configs, without weights.

Prints the family, each component's parameter count, the latent shape per resolution, the bytes of
one prompt's cached embeddings and a training-memory estimate per precision mode (formula in
:mod:`sidflow.teachers.describe`). Hub ids of the supported teachers resolve to the configs shipped
with sidflow, so this works offline; a local pipeline folder is read from its own configs.
``--all`` prints the Markdown table of every shipped teacher.
"""

from __future__ import annotations

import argparse
import json

from sidflow.teachers.configs import resolve_spec

__all__ = ["main", "resolve_spec", "format_report", "markdown_table"]

GIB = 1024**3


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def format_report(info: dict) -> str:
    """Human-readable report of :func:`sidflow.teachers.describe.describe`."""
    lines = [
        f"teacher:     {info['name']}",
        f"family:      {info['family']} ({info['pipeline']}), transformer fed {info['time_scale']:g}*t",
        "parameters:",
    ]
    lines += [f"  {name:<15} {count:>15,}" for name, count in info["params"].items()]
    lines.append(f"latents (VAE /{info['vae_factor']}, token factor {info['token_factor']}):")
    for res, row in info["resolutions"].items():
        text = "not divisible" if row is None else f"{tuple(row['latent_shape'])}, {row['image_tokens']} image tokens"
        lines.append(f"  {res:>5} px: {text}")
    lines.append(
        f"per-prompt cache: {info['cache_bytes_per_prompt']:,} bytes (fp32, {info['text_tokens']} text tokens)"
    )
    lines.append("training memory, full distillation (teacher frozen; fake + generator with Adam):")
    lines.append("  fp32 AMP: networks 36*P; pure bf16: networks 18*P; activations 5*34*S*C*L bytes per sample")
    for mode, mem in info["memory"].items():
        acts = ", ".join(
            f"{res}px +{_gib(row['activations_per_sample'])}/sample"
            for res, row in info["resolutions"].items()
            if row is not None
        )
        lines.append(
            f"  {mode:<9} networks {_gib(mem['networks'])}, text encoders + VAE {_gib(mem['aux'])}; activations {acts}"
        )
    return "\n".join(lines)


def markdown_table(infos: list[dict]) -> str:
    """One row per teacher: the README table."""
    head = (
        "| teacher | family | transformer params | text encoders | VAE | latent @512 / @1024 | "
        "cache/prompt | fp32 AMP nets | bf16 nets | act./sample @1024 |"
    )
    rows = [head, "|" + "---|" * 10]
    for info in infos:
        p, res = info["params"], info["resolutions"]
        text = sum(v for k, v in p.items() if k.startswith("text_encoder"))
        lat = " / ".join("x".join(map(str, res[r]["latent_shape"])) if res.get(r) else "-" for r in (512, 1024))
        act = _gib(res[1024]["activations_per_sample"]) if res.get(1024) else "-"
        mem = info["memory"]
        cells = [
            info["name"],
            info["family"],
            f"{p['transformer']:,}",
            f"{text:,}",
            f"{p['vae']:,}",
            lat,
            f"{info['cache_bytes_per_prompt'] / 2**20:.2f} MiB",
            _gib(mem["fp32_amp"]["networks"]),
            _gib(mem["pure_bf16"]["networks"]),
            act,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidflow info", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--teacher", help="hub id (shipped config, offline) or local pipeline folder")
    group.add_argument("--all", action="store_true", help="Markdown table of every shipped teacher")
    parser.add_argument("--family", default=None, help="force the family (sd3, sd35, flux, sana, sana_sprint)")
    parser.add_argument("--time-scale", type=float, default=None, help="transformer time input scale")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    from sidflow.teachers.configs import shipped_specs
    from sidflow.teachers.describe import describe

    if args.all:
        infos = [describe(spec, (512, 1024)) for _, spec in sorted(shipped_specs().items())]
        print(json.dumps(infos, indent=1) if args.json else markdown_table(infos))
        return 0
    info = describe(resolve_spec(args.teacher, args.family, args.time_scale), tuple(args.resolutions))
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0
