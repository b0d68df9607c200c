"""Over-focus diagnostics (PAPER.md §1): receptive field, approximate attention map and gradient
map of chosen blocks, with scalar summaries, for any De-focus classifier, causal or not.

Definitions, for block ``l`` (0-based; the paper's ViT layers 3/6/9/11 of 12 and Mamba 6/12/18/22
of 24 are read as these indices):

- ``X`` is the token sequence entering block ``l`` (for ``l = 0`` the embeddings) and ``Y`` the
  sequence leaving it (before the final norm): (L, D) per image, in sequence order (patches in
  raster order, the class token where the preset puts it).
- receptive field ``r_j = || d ||Y_cls|| / d X_j ||``; ``Y_cls`` is what
  ``DefocusEncoder.pooled`` reads: the class token's row (the mean row for a model without one).
- attention map ``A_ij = || d ||Y_i|| / d X_j ||`` with ``A_ii = 0`` (removes the residual
  path); exactly lower-triangular for a causal model. All norms are L2 over channels.
- gradient map ``g_j = || d loss / d X_j ||`` for the classifier's own loss (cross-entropy of
  the class token, averaged with the auxiliary head's when it has one; no label smoothing or
  mixup) at the image's label: its dataset label when the model has as many classes as that
  dataset, else the model's top-1 prediction.

Scalar summaries per layer, averaged over images:

- ``attention_entropy``: each row of A divided by its sum, its entropy divided by the log of the
  number of keys the row can see (i for row i of a causal model, L - 1 otherwise); mean over the
  rows that see at least 2 keys. 1 = spread evenly, 0 = all on one key.
- ``attention_top5pct_share``: per row, the share of its mass on its top ceil(5 % of its keys);
  mean over the same rows.
- ``gradient_gini``: Gini coefficient of g over the patch tokens (0 = even, towards 1 = one token).
- ``erf_size``: effective receptive field, the participation ratio (sum r)^2 / sum r^2 over the
  patch tokens, in patches; ``erf_fraction`` = ``erf_size`` / number of patches.

Row i of A is one vector-Jacobian product of block ``l`` with the cotangent ``Y_i / ||Y_i||``
put at row i; one backward pass serves every image of a batch. ``rows_per_pass > 1`` vectorises
that many rows in one pass (``is_grads_batched``, i.e. ``torch.func.vmap`` over the backward). On
CPU one row per pass measured as fast for attention and several times faster for Mamba (the
vmapped chunked scan is memory-bound), so that is the default there; on CUDA, where small
backward passes are bound by kernel launches, the default is 32 rows per pass.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

TOP_FRACTION = 0.05
# The paper's layers (ViT 3/6/9/11 of 12, Mamba 6/12/18/22 of 24) as fractions of the depth.
PAPER_LAYER_FRACTIONS = (1 / 4, 1 / 2, 3 / 4, 11 / 12)
FASHION_MNIST_PREFIX = "fashion-mnist:"
METRICS = ("attention_entropy", "attention_top5pct_share", "gradient_gini", "erf_size", "erf_fraction")
# Besides the encoder fields, a preset spec may override these (``defocus_vit_tiny:img_size=28,aux_loss=none``).
_HEAD_FIELDS = ("head_type", "head_hidden_mult", "aux_loss")


# --------------------------------------------------------------------------- maps
@dataclass
class LayerMaps:
    """The three maps of one block for N images of L tokens, in sequence order."""

    attention: torch.Tensor  # (N, L, L), rows = outputs i, columns = inputs j, diagonal zero
    receptive_field: torch.Tensor  # (N, L)
    gradient: torch.Tensor  # (N, L)


def _encoder(model: nn.Module):
    from defocus_vlm import DefocusVisionForImageClassification

    if not isinstance(model, DefocusVisionForImageClassification):
        raise ValueError(f"expected a DefocusVisionForImageClassification, got {type(model).__name__}")
    return model.defocus.encoder


def _vjp(y: torch.Tensor, x: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """(K, *y.shape) cotangents -> (K, *x.shape) gradients, in one backward pass."""
    if len(cotangents) == 1:
        return torch.autograd.grad(y, x, cotangents[0], retain_graph=True)[0][None]
    with warnings.catch_warnings():  # ops without a batching rule fall back to a loop: slower, still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return torch.autograd.grad(y, x, cotangents, retain_graph=True, is_grads_batched=True)[0]


def jacobian_row_norms(
    x: torch.Tensor, y: torch.Tensor, pooled: Callable[[torch.Tensor], torch.Tensor], rows_per_pass: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``|| d ||y_i|| / d x_j ||`` for every output row i (N, L, L) and the same for the pooled
    output ``pooled(y)`` (N, L). ``y`` must have been computed from ``x`` with the graph kept."""
    if rows_per_pass < 1:
        raise ValueError(f"rows_per_pass must be >= 1, got {rows_per_pass}")
    y0 = y.detach()
    batch, length, dim = y0.shape
    unit = F.normalize(y0, dim=-1)  # d||y_i|| / dy_i
    probe = y0.clone().requires_grad_(True)
    pooled_unit = torch.autograd.grad(pooled(probe).norm(dim=-1).sum(), probe)[0]
    norms = []
    for start in range(0, length + 1, rows_per_pass):  # rows 0..L-1, then the pooled output
        stop = min(start + rows_per_pass, length + 1)
        cot = y0.new_zeros(stop - start, batch, length, dim)
        rows = torch.arange(start, min(stop, length), device=y0.device)
        cot[rows - start, :, rows] = unit[:, rows].transpose(0, 1)
        if stop == length + 1:
            cot[-1] = pooled_unit
        norms.append(_vjp(y, x, cot).norm(dim=-1))  # (K, N, L)
    norms = torch.cat(norms)
    return norms[:length].transpose(0, 1), norms[length]


def default_rows_per_pass(device: torch.device | str) -> int:
    return 32 if torch.device(device).type == "cuda" else 1


def layer_maps(
    model: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[int],
    rows_per_pass: int | None = None,
    on_layer: Callable[[], None] | None = None,
) -> dict[int, LayerMaps]:
    """The maps of ``layers`` (block indices) for a batch of images with their class ``labels``:
    one forward and backward pass of ``model`` gives g, then per layer one forward of the block and
    ceil((L + 1) / rows_per_pass) backward passes give A and r."""
    encoder = _encoder(model)
    if model.training:
        raise ValueError("the maps need the model in eval mode (model.eval()): drop path would make them random")
    if rows_per_pass is None:
        rows_per_pass = default_rows_per_pass(pixel_values.device)
    weight = encoder.patch_embed.proj.weight
    # Pixels that require grad keep every hidden state in the graph, even with frozen weights.
    pixels = pixel_values.detach().to(weight.device, weight.dtype).requires_grad_(True)
    with torch.enable_grad():
        out = model(pixel_values=pixels, labels=labels.to(weight.device), output_hidden_states=True)
        hidden = out.hidden_states
        # The loss is a mean over independent images: times the batch size, each image's X gets the
        # gradient of its own loss.
        grads = torch.autograd.grad(out.loss * len(pixels), [hidden[i] for i in layers])
        inputs = [hidden[i].detach() for i in layers]
        del out, hidden  # the whole model's graph is freed: A needs one block's at a time
        maps = {}
        for layer, grad, x in zip(layers, grads, inputs, strict=True):
            x.requires_grad_(True)
            attention, receptive = jacobian_row_norms(x, encoder.blocks[layer](x), encoder.pooled, rows_per_pass)
            diagonal = torch.eye(attention.shape[-1], dtype=torch.bool, device=attention.device)
            attention = attention.masked_fill(diagonal, 0.0)
            maps[layer] = LayerMaps(attention.cpu(), receptive.cpu(), grad.norm(dim=-1).detach().cpu())
            if on_layer is not None:
                on_layer()
    return maps


# --------------------------------------------------------------------------- metrics (pure functions)
def visible_keys(length: int, causal: bool) -> torch.Tensor:
    """How many keys row i of A can see once the diagonal is removed: i (causal) or L - 1."""
    return torch.arange(length) if causal else torch.full((length,), length - 1)


def _row_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum(-1)
    mean = torch.where(valid, values, torch.zeros_like(values)).sum(-1) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def _rows(attention: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = visible_keys(attention.shape[-1], causal).to(attention.device)
    total = attention.sum(-1)
    return keys, total, (keys >= 2) & (total > 0)


def attention_entropy(attention: torch.Tensor, causal: bool) -> torch.Tensor:
    """(..., L, L) -> (...): mean normalised entropy of the rows (see the module docstring)."""
    keys, total, valid = _rows(attention, causal)
    p = attention / total.clamp_min(torch.finfo(attention.dtype).tiny)[..., None]
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return _row_mean(entropy / keys.clamp_min(2).log(), valid)


def attention_top_share(attention: torch.Tensor, causal: bool, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """(..., L, L) -> (...): mean share of each row's mass on its top ceil(fraction * keys) keys."""
    keys, total, valid = _rows(attention, causal)
    top = torch.ceil(fraction * keys).long().clamp_min(1)
    ranked = attention.sort(-1, descending=True).values.cumsum(-1)
    mass = ranked.gather(-1, (top - 1).expand(*attention.shape[:-1])[..., None])[..., 0]
    return _row_mean(mass / total.clamp_min(torch.finfo(attention.dtype).tiny), valid)


def gini(values: torch.Tensor) -> torch.Tensor:
    """(..., n) non-negative -> (...): 0 when all equal, (n - 1) / n when one value holds everything."""
    n = values.shape[-1]
    ordered = values.sort(-1).values
    weights = 2 * torch.arange(1, n + 1, dtype=values.dtype, device=values.device) - n - 1
    return (weights * ordered).sum(-1) / (n * ordered.sum(-1))


def effective_size(values: torch.Tensor) -> torch.Tensor:
    """(..., n) non-negative -> (...): participation ratio (sum v)^2 / sum v^2, from 1 to n."""
    return values.sum(-1) ** 2 / (values**2).sum(-1)


def layer_metrics(maps: LayerMaps, patch_index: torch.Tensor, causal: bool) -> dict[str, list[float]]:
    """Per-image values of every metric in ``METRICS`` for one layer."""
    erf = effective_size(maps.receptive_field[:, patch_index].double())
    values = {
        "attention_entropy": attention_entropy(maps.attention.double(), causal),
        "attention_top5pct_share": attention_top_share(maps.attention.double(), causal),
        "gradient_gini": gini(maps.gradient[:, patch_index].double()),
        "erf_size": erf,
        "erf_fraction": erf / len(patch_index),
    }
    return {name: [float(v) for v in values[name]] for name in METRICS}


# --------------------------------------------------------------------------- layers
def default_layers(depth: int) -> list[int]:
    """The paper's layers (3/6/9/11 of 12, 6/12/18/22 of 24); the same fractions of other depths."""
    return sorted({min(depth - 1, math.floor(depth * f + 0.5)) for f in PAPER_LAYER_FRACTIONS})


def resolve_layers(layers: Sequence[int] | None, depth: int, model_name: str) -> list[int]:
    if layers is None:
        return default_layers(depth)
    if not layers:
        raise ValueError("no layers given")
    resolved = set()
    for layer in layers:
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise ValueError(
                f"layer {layer} is out of range for {model_name}, which has {depth} blocks "
                f"(use 0..{depth - 1}, or negative indices from the end)"
            )
        resolved.add(index)
    return sorted(resolved)


# --------------------------------------------------------------------------- inputs
@dataclass
class FocusModel:
    name: str
    source: str
    model: nn.Module
    processor: object  # DefocusImageProcessor


@dataclass
class FocusImage:
    spec: str
    image: Image.Image
    label: int | None = None  # the dataset's label, when the image comes from one
    num_classes: int | None = None  # how many classes that dataset has


def _processor_for(config):
    from defocus_vlm import DefocusImageProcessor

    return DefocusImageProcessor(size=config.img_size, num_channels=config.in_chans)


def _preset_overrides(spec: str, text: str) -> dict:
    from defocus_vlm.encoders import EncoderConfig

    from defocus_vlm.overrides import parse_assignment

    allowed = EncoderConfig.field_names() | set(_HEAD_FIELDS)
    overrides = {}
    for item in filter(None, text.split(",")):
        keys, value = parse_assignment(item)
        if len(keys) != 1 or keys[0] not in allowed:
            raise ValueError(
                f"model {spec!r}: cannot override {'.'.join(keys)!r}; expected PRESET:key=value,... with keys "
                f"from {', '.join(sorted(allowed))}"
            )
        overrides[keys[0]] = value
    return overrides


def random_model(spec: str) -> FocusModel:
    """``PRESET`` or ``PRESET:key=value,...`` with seeded random weights and a 10-class head (the
    Fashion-MNIST classes, so ``fashion-mnist:N`` images keep their labels)."""
    from defocus_vlm import DefocusVisionConfig, DefocusVisionForImageClassification
    from defocus_vlm.data.classification import FASHION_MNIST_CLASSES

    preset, _, tail = spec.partition(":")
    id2label = dict(enumerate(FASHION_MNIST_CLASSES))
    config = DefocusVisionConfig.from_preset(
        preset, id2label=id2label, label2id={v: k for k, v in id2label.items()}, **_preset_overrides(spec, tail)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DefocusVisionForImageClassification(config)
    return FocusModel(spec, spec, model.eval(), _processor_for(config))


def _run_name(path: Path) -> str:
    """The training export layout is ``<run>/model``: name it after the run."""
    resolved = path.resolve()
    return resolved.parent.name if resolved.name == "model" else resolved.name


def load_model(spec: str | Path | nn.Module, name: str | None = None) -> FocusModel:
    """An exported classifier directory, a preset name (random weights), or a model instance."""
    if isinstance(spec, nn.Module):
        _encoder(spec)
        label = name or getattr(spec.config, "preset", None) or type(spec).__name__
        return FocusModel(label, label, spec.eval(), _processor_for(spec.config))
    path = Path(spec)
    if path.is_dir() or len(path.parts) > 1:
        from defocus_vlm.eval.classification import _model_dirs
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        import defocus_vlm  # noqa: F401 - registers the Auto classes

        model_dir = next(iter(_model_dirs(path).values()))  # the main export (the EMA when both exist)
        model = AutoModelForImageClassification.from_pretrained(model_dir)
        _encoder(model)
        processor = AutoImageProcessor.from_pretrained(model_dir)
        return FocusModel(name or _run_name(path), str(path), model.eval(), processor)
    from defocus_vlm.encoders import get_preset

    try:
        get_preset(str(spec).partition(":")[0])
    except ValueError as err:  # names the closest presets
        raise ValueError(f"model {str(spec)!r} is not a directory, and {err}") from None
    model = random_model(str(spec))
    if name:
        model.name = name
    return model


@functools.cache
def _fashion_mnist_test():
    from defocus_vlm.data.classification import FASHION_MNIST_DIR, IdxSource

    return IdxSource(FASHION_MNIST_DIR, "val")


def load_image_spec(spec: str | Path) -> FocusImage:
    """An image file, or ``fashion-mnist:N`` (test image N of the Fashion-MNIST IDX files)."""
    from defocus_vlm.image_io import load_image

    text = str(spec)
    if not text.startswith(FASHION_MNIST_PREFIX):
        return FocusImage(text, load_image(text))
    index = text[len(FASHION_MNIST_PREFIX):]
    source = _fashion_mnist_test()
    if not index.isdigit() or int(index) >= len(source):
        raise ValueError(f"expected fashion-mnist:N with N in 0..{len(source) - 1}, got {text!r}")
    image, label = source.load(int(index))
    return FocusImage(text, image, label, len(source.classes))


def image_tag(position: int, spec: str) -> str:
    """A file-name-safe tag for the ``position``-th image."""
    stem = Path(spec).stem if not spec.startswith(FASHION_MNIST_PREFIX) else spec
    return f"{position:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)


# --------------------------------------------------------------------------- analysis
@dataclass
class ModelFocus:
    """Maps and metrics of one model over all images."""

    name: str
    source: str
    config: object
    layers: list[int]
    grid: tuple[int, int]
    patch_index: torch.Tensor  # positions of the patch tokens in the sequence (raster order)
    display: np.ndarray  # (N, H, W, C) the images as the model saw them, in [0, 1]
    labels: list[int]
    label_sources: list[str]  # "dataset" or "predicted"
    maps: dict[int, LayerMaps] = field(default_factory=dict)

    @property
    def causal(self) -> bool:
        return bool(self.config.causal)

    def token_map(self, values: torch.Tensor) -> np.ndarray:
        """(L,) per-token values -> (h, w) on the patch grid."""
        return values[self.patch_index].reshape(self.grid).numpy()

    def metrics(self) -> dict[int, dict[str, list[float]]]:
        return {layer: layer_metrics(m, self.patch_index, self.causal) for layer, m in self.maps.items()}

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer, each metric averaged over the images."""
        return {str(layer): _means(per_image) for layer, per_image in self.metrics().items()}

    def to_json(self, images: Sequence[FocusImage]) -> dict:
        names = self.config.id2label
        return {
            "source": self.source,
            "preset": self.config.preset,
            "mixer": self.config.mixer,
            "causal": self.causal,
            "depth": self.config.depth,
            "tokens": int(self.maps[self.layers[0]].attention.shape[-1]),
            "grid": list(self.grid),
            "images": [
                {"image": img.spec, "label": label, "label_name": str(names.get(label, label)), "label_source": src}
                for img, label, src in zip(images, self.labels, self.label_sources, strict=True)
            ],
            "layers": {
                str(layer): {**_means(per_image), "per_image": per_image} for layer, per_image in self.metrics().items()
            },
        }


def _means(per_image: dict[str, list[float]]) -> dict[str, float]:
    return {name: float(np.mean(values)) for name, values in per_image.items()}


def _labels(model: nn.Module, images: Sequence[FocusImage], pixels: torch.Tensor) -> tuple[list[int], list[str]]:
    """Each image's dataset label when the model has that dataset's classes, else the top-1 prediction."""
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(-1).tolist()
    classes = model.config.num_labels
    pairs = [
        (img.label, "dataset") if img.label is not None and img.num_classes == classes else (pred, "predicted")
        for img, pred in zip(images, predicted, strict=True)
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _display(processor, pixels: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(processor.image_mean, dtype=pixels.dtype)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=pixels.dtype)[:, None, None]
    return (pixels.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def analyze_model(
    focus: FocusModel,
    images: Sequence[FocusImage],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    rows_per_pass: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ModelFocus:
    from tqdm.auto import tqdm

    if batch_size < 1 or (rows_per_pass is not None and rows_per_pass < 1):
        raise ValueError(f"batch_size and rows_per_pass must be >= 1, got {batch_size} and {rows_per_pass}")
    model, config = focus.model.to(device, dtype).eval(), focus.model.config
    layer_list = resolve_layers(layers, config.depth, focus.name)
    pixels = focus.processor([img.image for img in images], return_tensors="pt")["pixel_values"].to(device, dtype)
    encoder = _encoder(model)
    length = encoder.num_tokens(*pixels.shape[-2:])
    patch_index = encoder.patch_tokens(torch.arange(length).view(1, length, 1)).flatten()
    grid = (pixels.shape[-2] // config.patch_size, pixels.shape[-1] // config.patch_size)
    result = ModelFocus(focus.name, focus.source, config, layer_list, grid, patch_index,
                        _display(focus.processor, pixels), [], [])
    batches = range(0, len(images), batch_size)
    parts: dict[int, list[LayerMaps]] = {layer: [] for layer in layer_list}
    with tqdm(total=len(batches) * len(layer_list), desc=focus.name, disable=not progress, leave=False) as bar:
        for start in batches:
            batch = slice(start, start + batch_size)
            labels, sources = _labels(model, images[batch], pixels[batch])
            result.labels += labels
            result.label_sources += sources
            maps = layer_maps(model, pixels[batch], torch.tensor(labels), layer_list, rows_per_pass,
                              on_layer=lambda: bar.update(1))
            for layer, m in maps.items():
                parts[layer].append(m)
    result.maps = {layer: _concat(chunks) for layer, chunks in parts.items()}
    return result


def _concat(batches: Sequence[LayerMaps]) -> LayerMaps:
    return LayerMaps(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(LayerMaps)})


ModelSpecs = Sequence[str | Path | nn.Module] | Mapping[str, str | Path | nn.Module]


def analyze(
    models: ModelSpecs,
    images: Sequence[str | Path],
    layers: Sequence[int] | None = None,
    **kwargs,
) -> tuple[list[ModelFocus], list[FocusImage]]:
    """Maps and metrics for every model over every image (``kwargs``: see :func:`analyze_model`).

    ``models`` are exported classifier directories, preset names (random weights; overrides as
    ``PRESET:key=value,...``) or model instances, optionally as a ``{name: model}`` mapping.
    ``layers`` are block indices (negative from the end) for every model; default: the paper's."""
    if not models:
        raise ValueError("no models given")
    if not images:
        raise ValueError("no images given")
    named = models.items() if isinstance(models, Mapping) else [(None, m) for m in models]
    loaded_images = [load_image_spec(spec) for spec in images]  # check every input before any work
    loaded = [load_model(spec, name) for name, spec in named]
    seen: dict[str, int] = {}
    for focus in loaded:
        resolve_layers(layers, focus.model.config.depth, focus.name)  # refuse bad layers before any work
        seen[focus.name] = seen.get(focus.name, 0) + 1
        if seen[focus.name] > 1:  # names label figure rows and JSON keys
            focus.name = f"{focus.name} ({seen[focus.name]})"
    return [analyze_model(f, loaded_images, layers, **kwargs) for f in loaded], loaded_images


def focus_summaries(
    models: ModelSpecs, images: Sequence[str | Path], layers: Sequence[int] | None = None, **kwargs
) -> dict[str, dict[str, dict[str, float]]]:
    """``{model name: {layer: {metric: mean over images}}}``, e.g. for a README table."""
    results, _ = analyze(models, images, layers, **kwargs)
    return {r.name: r.summary() for r in results}


def report(results: Sequence[ModelFocus], images: Sequence[FocusImage]) -> dict:
    """The metrics JSON written by ``defocus-vlm analyze``."""
    return {
        "definitions": "layer l = block index (0-based); X = tokens entering block l, Y = tokens leaving it "
        "(before the final norm); maps and metrics as in defocus_vlm.eval.focus",
        "images": [img.spec for img in images],
        "models": {r.name: r.to_json(images) for r in results},
    }
