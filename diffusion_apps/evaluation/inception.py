"""torch-fidelity's InceptionV3 (the network behind FID, KID and IS) with offline-friendly weights.

The weights come from torch's hub cache (``<torch.hub.get_dir()>/checkpoints/``), downloaded there
when online, or from a local file. Offline without either, we fail at once with the file to
provide instead of hanging on a network timeout. torch_fidelity is imported inside functions:
importing the evaluation package must stay cheap.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds (DNS included:
    the probe runs in a daemon thread, since name resolution ignores socket timeouts)."""
    ok = []

    def probe() -> None:
        try:
            socket.create_connection((urlparse(url).hostname, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def inception_feature_extractor(feature_extractor_weights_path: str | None = None) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3``, frozen in eval mode.

    It takes uint8 images (B, 3, H, W) in 0..255 (see ``metrics.space_input``), resizes them to
    299 x 299 like the TensorFlow original, and returns ``(pool features (B, 2048),
    logits_unbiased (B, 1008))``: FID/KID features and Inception Score logits.

    Args:
        feature_extractor_weights_path: torch-fidelity's weights file
            (``weights-inception-2015-12-05-6726825d.pth``); default: the torch hub cache.

    Raises:
        FileNotFoundError: ``feature_extractor_weights_path`` is not a file.
        RuntimeError: no path, not in the hub cache, and the download host is unreachable; or
            the file is not that network's state dict. The message names the file and where to
            put it.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import (
        URL_INCEPTION_V3,
        FeatureExtractorInceptionV3,
    )

    name = Path(urlparse(URL_INCEPTION_V3).path).name
    if feature_extractor_weights_path is not None:
        path = Path(feature_extractor_weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"feature_extractor_weights_path={str(path)!r} does not exist; it should be "
                f"torch-fidelity's InceptionV3 weights {name} ({URL_INCEPTION_V3})"
            )
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / name
        provide = (
            f"Provide torch-fidelity's weights file {name} (from {URL_INCEPTION_V3}): put it at "
            f"{path} (torch's hub cache), or anywhere and pass its path as "
            "feature_extractor_weights_path."
        )
        if not path.is_file() and not _reachable(URL_INCEPTION_V3):
            host = urlparse(URL_INCEPTION_V3).hostname
            raise RuntimeError(
                f"InceptionV3 weights not found and {host} is unreachable. {provide}"
            )
    features = ["2048", "logits_unbiased"]
    if not path.is_file():  # online: torch-fidelity downloads into the hub cache
        try:
            return FeatureExtractorInceptionV3("inception-v3-compat", features)
        except OSError as err:  # URLError, HTTP errors, a proxy refusing
            message = f"downloading the InceptionV3 weights failed ({err}). {provide}"
            raise RuntimeError(message) from err
    try:  # torch-fidelity loads with weights_only=False: check for plain tensors first
        torch.load(path, map_location="cpu", weights_only=True)
        return FeatureExtractorInceptionV3("inception-v3-compat", features, str(path))
    except Exception as err:  # not a plain state dict, missing/unexpected keys, wrong shapes
        raise RuntimeError(
            f"{path} is not torch-fidelity's InceptionV3 state dict ({name}): {err}"
        ) from err


class _Output(nn.Module):
    """One output of the shared extractor, as the (B, d) tensor torchmetrics expects."""

    def __init__(self, extractor: nn.Module, index: int, num_features: int):
        super().__init__()
        self.extractor, self.index, self.num_features = extractor, index, num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x)[self.index]


def standard_metrics(
    feature_extractor_weights_path: str | None = None, kid_subset_size: int = 1000
) -> dict:
    """torchmetrics' ``FrechetInceptionDistance``, ``KernelInceptionDistance`` and
    ``InceptionScore`` (keys "fid", "kid", "inception_score"), all on one
    :func:`inception_feature_extractor` so that they share its weights and its TensorFlow-like
    resize. Update them with uint8 (B, 3, H, W) images (``metrics.space_input(x, "inception")``).

    Args:
        feature_extractor_weights_path: see :func:`inception_feature_extractor`.
        kid_subset_size: KID subset size; torchmetrics requires at least this many samples.
    """
    from torchmetrics.image import (
        FrechetInceptionDistance,
        InceptionScore,
        KernelInceptionDistance,
    )

    extractor = inception_feature_extractor(feature_extractor_weights_path)
    pool, logits = _Output(extractor, 0, 2048), _Output(extractor, 1, 1008)
    return {
        "fid": FrechetInceptionDistance(feature=pool),
        "kid": KernelInceptionDistance(feature=pool, subset_size=kid_subset_size),
        "inception_score": InceptionScore(feature=logits),
    }
