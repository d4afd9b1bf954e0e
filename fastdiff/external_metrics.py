"""The literature's metrics with their own networks, when the package and the weights are already
on this machine (`--features inception|lpips|clip`): Inception FID, KID and IS and LPIPS
(AlexNet, to the paired many-step run) through torchmetrics; the CLIP score against "a
handwritten digit K" through transformers (torchmetrics 1.9's CLIPScore fails on transformers 5).

fastdiff never downloads: `missing(features)` names what to fetch and where it goes, and the
commands refuse with that one line. The networks see the digits upsampled (gray as RGB); their
numbers are comparable between samplers here, not with published values on other data.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

FEATURES = ("inception", "lpips", "clip")
# feature space -> (python package, file in torch.hub's checkpoints directory, where to get it)
HUB_WEIGHTS = {
    "inception": ("torch_fidelity", "weights-inception-2015-12-05-6726825d.pth",
                  "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                  "weights-inception-2015-12-05-6726825d.pth"),
    "lpips": ("torchvision", "alexnet-owt-7be5be79.pth",
              "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}
CLIP_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIP
# (result key, column name, scale, format), as fastdiff.evaluation.COLUMNS
COLUMNS = (("inception_fd", "Inception FID", 1, ".2f"), ("inception_is", "Inception IS", 1, ".2f"),
           ("inception_kid", "Inception KID x1e3", 1e3, ".2f"), ("lpips", "LPIPS", 1, ".4f"),
           ("clip_score", "CLIP score", 1, ".2f"))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def missing(features: str) -> Optional[str]:
    """None when the package and the weights of `features` are here, else one line saying what
    to install or download, and where it goes."""
    never = "fastdiff never downloads"
    if features in HUB_WEIGHTS:
        package, name, url = HUB_WEIGHTS[features]
        path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
        if not _importable(package):
            return f"--features {features}: needs the {package} package (pip install {package.replace('_', '-')}) " \
                   f"and {url} saved as {path}; {never}"
        if not os.path.isfile(path):
            return f"--features {features}: needs {url} saved as {path} (torch.hub's cache); {never}"
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    cache = constants.HF_HUB_CACHE
    if not _importable("transformers") or not isinstance(try_to_load_from_cache(CLIP_MODEL, "config.json",
                                                                                cache_dir=cache), str):
        return f"--features clip: needs the transformers package and {CLIP_MODEL} in the Hugging Face cache " \
               f"{cache} (`huggingface-cli download {CLIP_MODEL}` where there is a network, then copy that " \
               f"directory here); {never}"
    return None


def _rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) -> float (N, 3, size, size) in [0, 1], bilinear."""
    x = images.float().div(255).expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float().div(255)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def compute(features: str, images: torch.Tensor, reference: torch.Tensor, labels=None, paired=None,
            is_splits: int = 10) -> dict:
    """Point estimates (no intervals: each replicate would run the network again) of `features`'
    metrics for uint8 images against uint8 reference images / the paired run's images / labels.
    Every metric is computed here, on this process (torchmetrics' sync_on_compute=False)."""
    local = dict(sync_on_compute=False)
    if features == "inception":
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance

        fake, real = _rgb(images, 299), _rgb(reference, 299)
        fid = FrechetInceptionDistance(feature=2048, normalize=True, **local)
        kid = KernelInceptionDistance(subset_size=min(100, len(fake), len(real)), normalize=True, **local)
        score = InceptionScore(splits=min(is_splits, len(fake)), normalize=True, **local)
        for m in (fid, kid):
            m.update(real, real=True)
            m.update(fake, real=False)
        score.update(fake)
        return {"inception_fd": float(fid.compute()), "inception_kid": float(kid.compute()[0]),
                "inception_is": float(score.compute()[0])}
    if features == "lpips":
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, **local)
        lpips.update(_rgb(images, 64), _rgb(paired, 64))  # AlexNet's pooling needs more than 16x16
        return {"lpips": float(lpips.compute())}
    return {"clip_score": clip_score(images, [f"a handwritten digit {int(k)}" for k in labels])}


def clip_score(images: torch.Tensor, captions) -> float:
    """The CLIP score (Hessel et al. 2021; torchmetrics' definition: the mean of 100 max(cos, 0)
    between each image's and its caption's CLIP embeddings), computed with transformers itself:
    torchmetrics 1.9's CLIPScore fails on transformers 5 (its image features come back as an
    output object). The model and processor are read from the cache `missing` checked, never
    fetched."""
    from huggingface_hub import constants
    from transformers import CLIPModel, CLIPProcessor

    here = dict(cache_dir=constants.HF_HUB_CACHE, local_files_only=True)
    model, processor = CLIPModel.from_pretrained(CLIP_MODEL, **here).eval(), CLIPProcessor.from_pretrained(CLIP_MODEL,
                                                                                                        **here)
    pixels = (_rgb(images, 224) * 255).round().to(torch.uint8)  # the processor resizes and rescales 0..255 itself
    inputs = processor(text=list(captions), images=list(pixels), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds.double(), out.text_embeds.double())
    return float((100 * cos.clamp(min=0)).mean())
