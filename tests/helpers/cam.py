"""CAM parity with an independent implementation: pytorch-grad-cam (``grad-cam`` on PyPI).

For a network whose head is global average pooling followed by one linear layer, Grad-CAM's
channel weights (spatial mean of d logit_c / d F_k) are exactly W[c, k] / (h*w), so its map
is ReLU(CAM) / (h*w): after grad-cam's min-max scaling the two must correlate ~perfectly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch_export.explain import FeatureNet, LogitsOnly
from xrwatch_training.checkpoint import load_checkpoint
from xrwatch_training.models import model_from_checkpoint


def _grad_cam(net: FeatureNet, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=LogitsOnly(net), target_layers=[net.features]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])


def assert_cam_matches_grad_cam(
    ckpt_path: Path, model: Path, images: list[Path], size: int
) -> None:
    """The ONNX ``cam`` of the predicted class vs pytorch-grad-cam's Grad-CAM on the same
    torch model and inputs: Pearson correlation >= 0.99 after resizing to the input."""
    pytest.importorskip("pytorch_grad_cam")
    import cv2

    spec = PreprocessSpec(size=size)
    x = np.stack([load_model_input(p, spec)[0][None] for p in images]).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits, cam = session.run(["logits", "cam"], {"image": x})
    predicted = [int(i) for i in logits.argmax(1)]
    net = FeatureNet(model_from_checkpoint(load_checkpoint(ckpt_path))).eval()
    reference = _grad_cam(net, torch.from_numpy(x), predicted)  # N x size x size, in [0, 1]
    for n, c in enumerate(predicted):
        ours = cv2.resize(np.maximum(cam[n, c], 0), (size, size))  # grad-cam's own resize
        assert ours.std() > 0 and reference[n].std() > 0, "a flat map proves nothing"
        r = np.corrcoef(ours.ravel(), reference[n].ravel())[0, 1]
        assert r >= 0.99, f"{model.name} image {n}: correlation {r:.4f} with grad-cam"
