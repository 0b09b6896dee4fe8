"""The embedded-digits classifier and the "digits" feature space (fd_digits, KID, P&R, accuracy).

The classifier lives in the package's cache ($DIFFUSION_APPS_CACHE or ~/.cache/diffusion_apps):
the first session trains it (about 30 s), later ones load it, like every other user of it.
"""

import pytest
import torch
from torchmetrics.utilities import dim_zero_cat

from diffusion_apps.evaluation import (
    DigitClassifier,
    FeatureStats,
    digit_classifier,
    mean_cov,
    real_floor,
    reference_features,
)
from diffusion_apps.evaluation import digits as digits_module
from diffusion_apps.evaluation.digits import Recipe, cache_key, embedded_split, resolve_cache_dir


@pytest.fixture(scope="session")
def classifier() -> DigitClassifier:
    return digit_classifier(progress=False)


@pytest.fixture(scope="session")
def floor(classifier) -> dict:
    return real_floor()


def no_training(*args, **kwargs):
    raise AssertionError("the classifier was retrained")


def test_classifier_reaches_97_percent_on_val(classifier):
    images, labels = embedded_split("val")
    assert classifier.val_accuracy >= 0.97
    assert digits_module.accuracy(classifier, images, labels) == classifier.val_accuracy
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    assert classifier.features(images[:5]).shape == (5, 128)
    assert classifier(images[:5]).shape == (5, 10)


def test_cache_hit_loads_without_retraining(classifier, monkeypatch):
    monkeypatch.setattr(digits_module, "train_digit_classifier", no_training)
    loaded = digit_classifier(progress=False)
    assert loaded.val_accuracy == classifier.val_accuracy
    for (name, a), b in zip(
        classifier.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_cache_file_is_a_plain_dict_loadable_with_weights_only(classifier):
    path = resolve_cache_dir() / f"digit_classifier-{cache_key()}.pt"
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"state_dict", "val_accuracy", "recipe"}
    assert saved["recipe"] == repr(digits_module.RECIPE)


def test_missing_cache_trains_once_then_loads(tmp_path, monkeypatch):
    calls = []

    def fake_training(recipe, progress):
        calls.append(recipe)
        model = DigitClassifier().eval()
        model.val_accuracy = 0.5
        return model

    monkeypatch.setattr(digits_module, "train_digit_classifier", fake_training)
    first = digit_classifier(tmp_path, progress=False)
    second = digit_classifier(tmp_path, progress=False)
    assert len(calls) == 1 and second.val_accuracy == first.val_accuracy == 0.5
    assert [p.name for p in tmp_path.iterdir()] == [f"digit_classifier-{cache_key()}.pt"]


def test_cache_key_depends_on_the_recipe():
    assert cache_key(Recipe(epochs=1)) != cache_key() == cache_key(Recipe())


def test_training_is_deterministic_and_leaves_the_callers_rng_alone():
    rng = torch.get_rng_state()
    recipe = Recipe(epochs=1)
    a = digits_module.train_digit_classifier(recipe, progress=False)
    b = digits_module.train_digit_classifier(recipe, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_reference_features_are_cached(classifier, monkeypatch):
    first = reference_features("digits", "val", progress=False)
    monkeypatch.setattr("diffusion_apps.evaluation.reference.extract", no_training)
    assert torch.equal(reference_features("digits", "val", progress=False), first)
    assert first.shape == (500, 128)


def test_floor_real_val_vs_real_train(classifier, floor):
    assert floor["n_real"] == 4500 and floor["n_fake"] == 500
    assert floor["accuracy"] == classifier.val_accuracy  # val digits carry their true labels
    assert floor["precision_digits"] > 0.8 and floor["recall_digits"] > 0.8
    assert abs(floor["kid_digits"]) < 5 * floor["kid_digits_std"] + 1e-3
    assert floor["class_entropy"] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=0.03)
    assert floor["confidence"] > 0.9


def test_noise_is_far_from_the_floor(floor):
    real = reference_features("digits", "train", progress=False)
    stats = FeatureStats("digits")
    stats.set_reference(*mean_cov(real), real)
    stats.update(
        torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, False
    )
    out = stats.compute()
    assert "accuracy" not in out
    assert out["fd_digits"] > 20 * floor["fd_digits"]
    assert out["precision_digits"] < 0.05 and out["kid_digits"] > 10 * floor["kid_digits_std"]
    with pytest.raises(ValueError, match="set_reference"):
        stats.update(torch.zeros(2, 1, 32, 32), real=True)


def test_accuracy_is_agreement_with_the_classifier(classifier):
    images, _ = embedded_split("val")
    asked = torch.arange(len(images)) % 10  # labels unrelated to the images
    stats = FeatureStats("digits", kid_subset_size=100)
    stats.update(images[:250], real=True)
    stats.update(images[250:], real=False, labels=asked[250:])
    expected = (classifier(images[250:]).argmax(1) == asked[250:]).double().mean()
    assert stats.compute()["accuracy"] == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="digits 0..9"):
        stats.update(images[:2], real=False, labels=torch.tensor([3, 10]))


def test_states_are_cat_lists_and_merge_like_ddp(classifier):
    # Under DDP each rank holds part of the samples; syncing concatenates the list states.
    # merge_state does the same in one process: incoming states first, then local ones.
    train, _ = embedded_split("train")
    fake, _ = embedded_split("val")
    labels = torch.arange(400) % 10
    whole, first, second = (
        FeatureStats("digits", kid_subsets=10, kid_subset_size=100) for _ in range(3)
    )
    for name in ("real_features", "fake_features", "fake_logits", "fake_labels"):
        assert whole._defaults[name] == [] and whole._reductions[name] is dim_zero_cat
    whole.update(train[:800], True)
    whole.update(fake[:400], False, labels)
    first.update(train[:400], True)
    first.update(fake[:200], False, labels[:200])
    second.update(train[400:800], True)
    second.update(fake[200:400], False, labels[200:])
    second.merge_state(first)
    merged, expected = second.compute(), whole.compute()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
