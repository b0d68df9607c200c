"""Plain encoder configuration: every switch from the paper is a field.

No Hugging Face imports here, so the backbone is usable on its own (and from timm).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MIXERS = ("vit", "retnet", "mamba")
SWITCH = ("none", "fixed", "learnable")
CLS_POSITIONS = ("end", "start", "none")
POS_EMBEDS = ("none", "learned")


@dataclass
class EncoderConfig:
    """Architecture of a 1D (causal) vision encoder.

    mixer: "vit" (softmax attention), "retnet" (retention) or "mamba" (selective scan).
    causal: each token sees only earlier tokens (raster order). Only "vit" may be non-causal.
    decay / rope: "none" | "fixed" | "learnable". For vit/retnet, decay is the per-head
        lambda = -exp(lambda_hat) on distance and rope the rotary frequencies of q, k. For
        mamba, decay is A = -exp(A_log) (fixed = not trained, none = A = 0) and rope is the
        rotation of B and C by ``freq``.
    cls_position: "end" (the paper: the class token sees every patch), "start" or "none".
    pos_embed: "none" (RoPE is the only position signal) or "learned" absolute embedding.
    group_norm_size: mamba group RMS norm size (0 = off, the plain Mamba baseline).
    rope_tied: mamba only. False = official checkpoints (one frequency per state element);
        True = the paper's Eq. 9 (frequency and A shared inside each rotated pair).
    delta_scale_factor / rope_scale_factor: mamba resolution transfer (Delta divided by the
        first, RoPE index divided by the second).
    """

    mixer: str = "mamba"
    img_size: int = 224  # input resolution (square); other sizes are accepted at run time if divisible by patch_size
    patch_size: int = 16  # side of a square patch; tokens = (img_size / patch_size)^2 (+1 class token)
    in_chans: int = 3  # image channels (3 RGB, 1 grey)
    embed_dim: int = 384  # token width
    depth: int = 24  # number of blocks
    num_heads: int = 6  # attention / retention heads (vit, retnet)
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim (vit, retnet)
    qkv_bias: bool = True  # bias in the q, k, v projections (vit, retnet)
    causal: bool = True
    decay: str = "learnable"
    rope: str = "learnable"
    rope_base: float = 10000.0  # base of the fixed RoPE frequencies (and the learnable ones' initial values)
    cls_position: str = "end"
    pos_embed: str = "none"
    norm_eps: float | None = None  # block LayerNorm/RMSNorm eps (null: 1e-5 for mamba, 1e-6 otherwise)
    final_norm_eps: float = 1e-6  # eps of the norm after the last block
    drop_path_rate: float = 0.0  # stochastic depth rate when the caller passes none (training schedules pass their own)
    d_state: int = 16  # mamba SSM state size N
    d_conv: int = 4  # mamba causal depthwise conv width
    expand: int = 2  # mamba inner width = expand * embed_dim
    dt_rank: int = 48  # mamba rank of the Delta projection
    group_norm_size: int = 64
    rope_tied: bool = False
    delta_scale_factor: float = 1.0
    rope_scale_factor: float = 1.0
    residual_in_fp32: bool = True  # keep the residual stream in float32 under bf16 (as the official Mamba code)
    def __post_init__(self) -> None:
        self.validate()

    @property
    def block_norm_eps(self) -> float:
        if self.norm_eps is not None:
            return self.norm_eps
        return 1e-5 if self.mixer == "mamba" else 1e-6

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    def num_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Encoder tokens of a ``height x width`` image (default ``img_size``): its patches plus the class token."""
        height, width = height or self.img_size, width or self.img_size
        return (height // self.patch_size) * (width // self.patch_size) + (self.cls_position != "none")

    def validate(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

        choice("mixer", MIXERS)
        choice("decay", SWITCH)
        choice("rope", SWITCH)
        choice("cls_position", CLS_POSITIONS)
        choice("pos_embed", POS_EMBEDS)
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not self.causal and self.mixer != "vit":
            raise ValueError(f"mixer {self.mixer!r} is causal by construction; causal=False needs mixer='vit'")
        if self.mixer in ("vit", "retnet"):
            if self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
            if self.rope != "none" and (self.embed_dim // self.num_heads) % 2:
                raise ValueError(f"RoPE needs an even head dimension, got embed_dim {self.embed_dim} / "
                                 f"num_heads {self.num_heads} = {self.embed_dim // self.num_heads}")
        if self.mixer == "mamba":
            if self.d_state % 2 and self.rope != "none":
                raise ValueError(f"RoPE on B/C needs an even d_state, got {self.d_state}")
            if self.group_norm_size and self.d_inner % self.group_norm_size:
                raise ValueError(f"d_inner {self.d_inner} is not divisible by group_norm_size {self.group_norm_size}")
            if self.delta_scale_factor <= 0 or self.rope_scale_factor <= 0:
                raise ValueError("delta_scale_factor and rope_scale_factor must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict) -> EncoderConfig:
        names = cls.field_names()
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown encoder config fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in names})
