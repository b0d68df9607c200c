"""Image-text contrastive losses: CLIP's InfoNCE and SigLIP's pairwise sigmoid loss.

Both follow open_clip's distributed recipe (``gather_with_grad=True, local_loss=True``): every
process gathers the other processes' features *with their gradient* and scores only its own rows
against the global batch, so the logits cost O(local x global) instead of O(global^2). Averaged
over processes (as DeepSpeed averages gradients) the loss and its gradient equal the
single-process loss on the concatenated global batch. Numbers match open_clip's ``ClipLoss`` /
``SigLipLoss`` on the same inputs (tests/test_clip_losses.py)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("clip", "siglip")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features`` of every process in rank order; the backward pass sends each
    process the gradient of its own rows (summed over the processes that used them)."""
    _, world = _rank_world()
    if world == 1:
        return features
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # deprecated in favour of a private API; kept, as open_clip does
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(features), dim=0)


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features (B, D): the mean of the image->text and
    text->image cross-entropies, the matching pair being the positive. ``logit_scale`` is the
    temperature's inverse (already exponentiated)."""
    rank, _ = _rank_world()
    all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
) -> torch.Tensor:
    """SigLIP: ``-sum log sigmoid(z_ij * (scale * <x_i, y_j> + bias)) / local batch``, z = +1 for the
    matching pair and -1 for every other image-text pair of the global batch."""
    rank, _ = _rank_world()
    local = image_features.shape[0]
    logits = logit_scale * image_features @ gather_with_grad(text_features).T
    if logit_bias is not None:
        logits = logits + logit_bias
    signs = -torch.ones_like(logits)
    own = torch.arange(local, device=logits.device)
    signs[own, own + rank * local] = 1.0
    return -F.logsigmoid(signs * logits).sum() / local


def contrastive_loss(
    kind: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kind`` "clip" or "siglip", computed in float32 (features from a bf16 model included).
    Every process must pass the same local batch size."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"expected image and text features of the same (batch, dim) shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    image_features, text_features = image_features.float(), text_features.float()
    logit_scale = logit_scale.float()
    if kind == "clip":
        return clip_loss(image_features, text_features, logit_scale)
    if kind == "siglip":
        return siglip_loss(image_features, text_features, logit_scale,
                           logit_bias.float() if logit_bias is not None else None)
    raise ValueError(f"unknown contrastive loss {kind!r}; expected one of {LOSSES}")
