"""Hot ops, one public function each, several backends (see ``dispatch``)."""

from .attention import defocus_attention
from .causal_conv1d import causal_conv1d
from .gated_norm import gated_group_rms_norm
from .retention import retention
from .rope import apply_rope, rope_angles
from .selective_scan import selective_scan

__all__ = ["apply_rope", "causal_conv1d", "defocus_attention", "gated_group_rms_norm", "retention", "rope_angles",
           "selective_scan"]
