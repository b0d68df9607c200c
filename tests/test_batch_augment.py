"""The batch augmentation (training/batch_augment.py) and the decoded dataset that serves it: a batch equals
its samples augmented one by one, the crop lands where its parameters say, the random draws follow timm's
definition, and the classification stage picks this path only where it implements the recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from defocus_vlm.training.augment import mean_std
from defocus_vlm.training.batch_augment import BatchAugment, SampleParams, augment_one
from defocus_vlm.training.config import ConfigError, load_config
from PIL import Image

from defocus_vlm.data.decoded import DecodedDataset, collate_batch, decode_split

torch.set_num_threads(1)


def recipe(*extra: str):
    return load_config("fashion_recipe", ["data.verify=0", *extra], stage="classification")


def make_augment(*extra: str) -> BatchAugment:
    cfg = recipe(*extra)
    return BatchAugment(cfg.data, cfg.augment, *mean_std(cfg.data))


def images(n: int = 16, c: int = 1, size: int = 28) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_batch_equals_samples_one_by_one(mode):
    aug = make_augment(f"data.interpolation={mode}", "augment.random_erasing=0.9")
    x, seeds = images(), [7 * i + 1 for i in range(16)]
    batch = aug(x, seeds)
    one_by_one = torch.stack([augment_one(aug, img, s) for img, s in zip(x, seeds)])
    torch.testing.assert_close(batch, one_by_one, rtol=0, atol=1e-6)
    assert torch.equal(aug(x, seeds), batch)  # the seeds decide everything
    assert not torch.equal(aug(x, [s + 1 for s in seeds]), batch)


def test_crop_flip_and_erase_land_where_the_parameters_say():
    aug = make_augment("data.interpolation=nearest")
    x = images(1)
    (mean,), (std,) = mean_std(recipe().data)
    normalised = (x[0].float() / 255 - mean) / std
    full = aug.apply(x, [SampleParams(0, 0, 28, 28, False)])[0]
    torch.testing.assert_close(full, normalised)
    flipped = aug.apply(x, [SampleParams(0, 0, 28, 28, True)])[0]
    torch.testing.assert_close(flipped, normalised.flip(-1))
    # a 14 x 14 crop at (2, 3) upsampled 2x by nearest: output pixel (r, c) is source (2 + r // 2, 3 + c // 2)
    crop = aug.apply(x, [SampleParams(2, 3, 14, 14, False)])[0]
    rows, cols = 2 + torch.arange(28) // 2, 3 + torch.arange(28) // 2
    torch.testing.assert_close(crop, normalised[:, rows][:, :, cols])
    noise = torch.full((1, 5, 4), 9.0)
    erased = aug.apply(x, [SampleParams(0, 0, 28, 28, False, (10, 20, 5, 4), noise)])[0]
    assert torch.equal(erased[:, 10:15, 20:24], noise)
    erased[:, 10:15, 20:24] = normalised[:, 10:15, 20:24]
    torch.testing.assert_close(erased, normalised)


def test_random_draws_follow_timms_definition():
    aug = make_augment("augment.scale=[0.3,0.9]", "augment.hflip=0.3", "augment.random_erasing=0.4")
    params = [aug.params(s, 1, 28, 28) for s in range(3000)]
    areas = np.array([p.height * p.width / 784 for p in params])
    ratios = np.array([p.width / p.height for p in params])
    assert areas.min() >= 0.3 - 0.05 and areas.max() <= 0.9 + 0.05  # rounding to whole pixels
    assert 0.55 < areas.mean() < 0.65
    assert ratios.min() >= 0.75 * 0.85 and ratios.max() <= 4 / 3 / 0.85
    assert all(0 <= p.top <= 28 - p.height and 0 <= p.left <= 28 - p.width for p in params)
    assert abs(np.mean([p.flip for p in params]) - 0.3) < 0.04
    erased = [p for p in params if p.erase is not None]
    assert abs(len(erased) / len(params) - 0.4) < 0.04
    for p in erased:
        top, left, h, w = p.erase
        assert 0 <= top <= 28 - h and 0 <= left <= 28 - w and p.noise.shape == (1, h, w)
        assert 0.02 * 784 * 0.7 <= h * w <= 784 / 3 * 1.3
    noise = torch.cat([p.noise.flatten() for p in erased])
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05


class _Images:
    """A source of PIL images (the interface of defocus_vlm.data.classification's sources)."""

    def __init__(self, sizes):
        self.sizes, self.classes = sizes, ["a", "b"]

    def __len__(self):
        return len(self.sizes)

    def load(self, i):
        w, h = self.sizes[i]
        return Image.fromarray(np.full((h, w, 3), i * 10, np.uint8)), i % 2


def test_decode_split_and_the_decoded_dataset():
    imgs, labels = decode_split(_Images([(6, 5)] * 4), in_chans=3)
    assert imgs.shape == (4, 3, 5, 6) and imgs.dtype == torch.uint8 and labels.tolist() == [0, 1, 0, 1]
    assert int(imgs[2, 1, 4, 5]) == 20
    assert decode_split(_Images([(6, 5)] * 3), in_chans=1, limit=2)[0].shape == (2, 1, 5, 6)
    assert decode_split(_Images([(6, 5), (5, 6)]), in_chans=3) is None  # sizes differ: stays per image
    assert decode_split(_Images([(6, 5)] * 4), in_chans=3, max_bytes=100) is None
    aug = make_augment("augment.random_erasing=0.5")
    x = images(8)
    ds = DecodedDataset(x, torch.arange(8), aug, ["c"])
    items = [(5, 11), (2, 12), (5, 13)]
    batch = collate_batch(ds.__getitems__(items))
    for row, item in enumerate(items):
        pixels, label, skipped = ds[item]
        assert torch.equal(batch[0][row], pixels) and batch[1][row] == label == item[0] and skipped == 0


def test_stage_picks_the_batch_path_only_where_it_applies():
    from defocus_vlm.training.classification import ClassificationTask

    fast = ClassificationTask(recipe("data.limit_train=64", "data.limit_val=8"))
    assert isinstance(fast.build_data(), DecodedDataset) and fast.collate_fn() is collate_batch
    slow = ClassificationTask(recipe("data.limit_train=64", "data.limit_val=8", "augment.engine=pil"))
    assert not isinstance(slow.build_data(), DecodedDataset) and slow.collate_fn() is None
    jitter = ClassificationTask(recipe("data.limit_train=64", "augment.color_jitter=0.4"))
    assert not isinstance(jitter.build_data(), DecodedDataset)
    forced = ClassificationTask(recipe("augment.engine=batch", "augment.rand_augment=rand-m9-mstd0.5-inc1"))
    with pytest.raises(ConfigError, match="augment.engine=batch cannot run this recipe: augment.rand_augment"):
        forced.build_data()


def test_workers_only_when_two_cores_are_free(monkeypatch):
    import os

    from defocus_vlm.training.loop import usable_workers

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    for cores, want in ((1, 0), (2, 0), (3, 2), (8, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        assert usable_workers(4) == want, cores
    assert usable_workers(0) == 0
