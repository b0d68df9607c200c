"""Contrastive losses: same numbers as open_clip on the same inputs, and the 2-process (gloo) loss
with gathered features equals the 1-process loss on the same global batch, gradients included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from defocus_vlm.contrastive import contrastive_loss

torch.set_num_threads(1)
GLOBAL, DIM, WORLD = 8, 6, 2


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(GLOBAL, DIM, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(GLOBAL, DIM, generator=g, dtype=torch.float64), dim=-1)
    texts[:2] = images[:2]  # a few easy positives so the loss is not uniform
    return images, texts, torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def _grads(kind: str, fn, images, texts, log_scale, bias):
    """Loss and gradients w.r.t. images, texts, log scale and bias (float64)."""
    leaves = [t.clone().requires_grad_() for t in (images, texts, log_scale, bias)]
    loss = fn(leaves[0], leaves[1], leaves[2].exp(), leaves[3] if kind == "siglip" else None)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def _open_clip(kind: str, rank: int = 0, world: int = 1):
    if kind == "clip":
        loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        return lambda i, t, s, b: loss(i, t, s)
    loss = SigLipLoss(rank=rank, world_size=world)
    return lambda i, t, s, b: loss(i, t, s, b)


def _ours(kind: str):
    return lambda i, t, s, b: contrastive_loss(kind, i, t, s, b)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_open_clip_single_process(kind):
    inputs = _inputs()
    ours_loss, ours_grads = _grads(kind, _ours(kind), *inputs)
    ref_loss, ref_grads = _grads(kind, _open_clip(kind), *inputs)
    assert ours_loss.dtype == torch.float32  # computed in float32 whatever the feature dtype
    torch.testing.assert_close(ours_loss, ref_loss.float())
    for ours, ref in zip(ours_grads, ref_grads):
        torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-5, atol=1e-6)


def test_clip_loss_hand_worked():
    """Two orthogonal pairs at scale 1: every row's softmax is (e, 1) / (e + 1)."""
    eye = torch.eye(2)
    expected = -math.log(math.e / (math.e + 1))
    assert contrastive_loss("clip", eye, eye, torch.tensor(1.0)).item() == pytest.approx(expected, rel=1e-6)
    # SigLIP: 2 positives at logit 1, 2 negatives at logit 0, divided by the batch of 2
    expected = -(2 * math.log(torch.sigmoid(torch.tensor(1.0)).item()) + 2 * math.log(0.5)) / 2
    assert contrastive_loss("siglip", eye, eye, torch.tensor(1.0), None).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same"):
        contrastive_loss("clip", eye, torch.eye(3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        contrastive_loss("triplet", eye, eye, torch.tensor(1.0))


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        images, texts, log_scale, bias = _inputs()
        local = slice(rank * GLOBAL // WORLD, (rank + 1) * GLOBAL // WORLD)
        results = {}
        for kind in ("clip", "siglip"):
            for name, fn in (("ours", _ours(kind)), ("open_clip", _open_clip(kind, rank, WORLD))):
                results[kind, name] = _grads(kind, fn, images[local], texts[local], log_scale, bias)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp
    from defocus_vlm.training.engine import _free_port

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for kind in ("clip", "siglip"):
        single_loss, (g_img, g_txt, g_scale, g_bias) = _grads(kind, _ours(kind), *_inputs())
        for name in ("ours", "open_clip"):
            losses = [ranks[r][kind, name][0] for r in range(WORLD)]
            grads = [ranks[r][kind, name][1] for r in range(WORLD)]
            # DeepSpeed averages over processes: the mean of the local losses is the global loss
            torch.testing.assert_close(torch.stack(losses).mean().float(), single_loss, rtol=1e-6, atol=1e-7)
            # each process receives the summed gradient of its own rows; averaged, that is the global one
            for col, expected in ((0, g_img), (1, g_txt)):
                torch.testing.assert_close(torch.cat([g[col] for g in grads]).float() / WORLD, expected.float(),
                                           rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(torch.stack([g[2] for g in grads]).mean().float(), g_scale.float(), rtol=1e-5,
                                       atol=1e-7)
            if kind == "siglip":
                torch.testing.assert_close(torch.stack([g[3] for g in grads]).mean().float(), g_bias.float(), rtol=1e-5,
                                           atol=1e-7)
