"""The Inception path offline: a randomly initialised InceptionV3 saved to a temporary file proves
the plumbing (weights file → torch-fidelity network → torchmetrics / FeatureStats), not the numbers.
"""

import math

import pytest
import torch

from diffusion_apps.evaluation import FeatureStats, inception, standard_metrics
from diffusion_apps.evaluation.metrics import space_input

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp:  # build it without downloading or loading weights
        mp.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: None)
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache and no network."""
    monkeypatch.setattr(inception, "_reachable", lambda url, timeout=3.0: False)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    yield tmp_path
    torch.hub.set_dir(previous)


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1


def test_offline_without_weights_names_the_file_and_where(offline):
    with pytest.raises(RuntimeError) as err:
        inception.inception_feature_extractor()
    message = str(err.value)
    assert WEIGHTS_NAME in message and str(offline / "checkpoints" / WEIGHTS_NAME) in message
    assert "feature_extractor_weights_path" in message


def test_failed_download_names_the_file(offline, monkeypatch):
    from urllib.error import URLError

    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    def refuse(*args, **kwargs):
        raise URLError("proxy refused")

    monkeypatch.setattr(inception, "_reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", refuse)
    with pytest.raises(RuntimeError, match=f"proxy refused.*{WEIGHTS_NAME}"):
        inception.inception_feature_extractor()


def test_missing_or_wrong_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        inception.inception_feature_extractor(str(tmp_path / "nope.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(RuntimeError, match="wrong.pth is not torch-fidelity's InceptionV3"):
        inception.inception_feature_extractor(str(wrong))


def test_hub_cache_file_is_used_offline(offline, weights_file):
    (offline / "checkpoints").mkdir()
    (offline / "checkpoints" / WEIGHTS_NAME).symlink_to(weights_file)
    net = inception.inception_feature_extractor()
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.filterwarnings("ignore:Metric `.*` will save all extracted features")
def test_standard_metrics_run_on_a_local_weights_file(offline, weights_file):
    metrics = standard_metrics(weights_file, kid_subset_size=2)
    assert metrics["fid"].inception.extractor is metrics["kid"].inception.extractor  # shared
    real, fake = space_input(images(2, 0), "inception"), space_input(images(2, 1), "inception")
    for name in ("fid", "kid"):
        metrics[name].update(real, real=True)
        metrics[name].update(fake, real=False)
    metrics["inception_score"].update(fake)
    values = [
        metrics["fid"].compute(),
        *metrics["kid"].compute(),
        *metrics["inception_score"].compute(),
    ]
    assert all(math.isfinite(float(v)) for v in values)


def test_feature_stats_in_inception_space(offline, weights_file):
    path = weights_file
    stats = FeatureStats("inception", k=1, kid_subsets=5, feature_extractor_weights_path=path)
    stats.update(images(2, 0), real=True)
    stats.update(images(2, 1).expand(-1, 3, -1, -1), real=False, labels=torch.arange(2))
    out = stats.compute()
    assert set(out) == {
        "fid", "kid", "kid_std", "precision", "recall", "inception_score",
        "inception_score_std", "n_real", "n_fake",
    }  # fmt: skip
    assert (out["n_real"], out["n_fake"]) == (2, 2)
    assert all(math.isfinite(v) for v in out.values())
