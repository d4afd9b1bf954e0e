"""Loading the bundled weights (safetensors + a JSON of config and training facts) from
`fastdiff/assets/`, with no network."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
UNET_STEM = "digits_unet"
CLASSIFIER_STEM = "digits_classifier"


def _paths(stem: str, directory: Optional[str]):
    d = directory or ASSETS_DIR
    w, j = os.path.join(d, stem + ".safetensors"), os.path.join(d, stem + ".json")
    for p in (w, j):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: bundled demo asset missing (reinstall fastdiff, or train it with "
                                    f"`python -m fastdiff.demo.train --out DIR` and pass directory=DIR)")
    return w, j


def model_facts(stem: str = UNET_STEM, directory: Optional[str] = None) -> dict:
    """The JSON next to a bundled model: its config and training facts."""
    with open(_paths(stem, directory)[1]) as f:
        return json.load(f)


def _load_state(path: str, device, dtype):
    from safetensors.torch import load_file

    sd = load_file(path)
    return {k: v.to(device=device or "cpu", dtype=dtype or torch.float32) for k, v in sd.items()}


def load_digits_model(device=None, dtype: Optional[torch.dtype] = None, directory: Optional[str] = None):
    """The bundled class-conditional digits `fastdiff.nn.UNet` (eval mode): epsilon prediction,
    linear VP schedule, diffusers-style float timesteps; `class_labels` 0..9, 10 = null."""
    from fastdiff.nn import UNet, UNetConfig

    w, _ = _paths(UNET_STEM, directory)
    facts = model_facts(UNET_STEM, directory)
    model = UNet(UNetConfig.from_dict(facts["config"]))
    model.load_state_dict(_load_state(w, None, None))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_classifier(device=None, dtype: Optional[torch.dtype] = None, directory: Optional[str] = None):
    """The bundled `DigitClassifier` (eval mode); `.features(x)` are the metric features."""
    from fastdiff.demo.classifier import DigitClassifier

    w, _ = _paths(CLASSIFIER_STEM, directory)
    facts = model_facts(CLASSIFIER_STEM, directory)
    model = DigitClassifier(**facts["kwargs"])
    model.load_state_dict(_load_state(w, None, None))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
