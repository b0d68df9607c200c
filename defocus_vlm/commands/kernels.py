"""Show which backend each kernel op uses on this machine, how it was chosen, and which
optional kernel packages are usable. Override with the DEFOCUS_KERNELS environment variable
("reference", or "selective_scan=chunked,attention=sdpa")."""

from __future__ import annotations

import argparse
import json

from defocus_vlm.cli_options import add_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_device(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", action="store_true", help="print JSON")


def probe(device: str, dtype: str) -> dict:
    """Call every op on tiny inputs, without and with autograd (the automatic rule may differ:
    inference vs training), and report the backend the dispatcher picked each time."""
    import torch

    from defocus_vlm.kernels import causal_conv1d, defocus_attention, gated_group_rms_norm, retention, selective_scan
    from defocus_vlm.kernels.dispatch import record_choices
    from defocus_vlm.kernels.registry import backend_importable

    dt = getattr(torch, dtype)
    r = lambda *s: torch.randn(*s, device=device, dtype=dt)  # noqa: E731
    lam = -torch.rand(2, device=device)

    def call_all(grad: bool) -> dict:
        with torch.set_grad_enabled(grad), record_choices() as choices:
            q = r(1, 2, 8, 16).requires_grad_(grad)
            defocus_attention(q, r(1, 2, 8, 16), r(1, 2, 8, 16), lam)
            retention(q, r(1, 2, 8, 16), r(1, 2, 8, 16), lam)
            u = r(1, 4, 8).requires_grad_(grad)
            selective_scan(u, r(1, 4, 8).abs(), -torch.rand(4, 2, device=device), r(1, 2, 8), r(1, 2, 8))
            causal_conv1d(u, r(4, 4))
            gated_group_rms_norm(u, r(1, 4, 8), r(1, 4, 8), r(4), 2)
        return {op: {"backend": b, "chosen_by": how} for op, (b, how) in choices.items()}

    packages = {package: backend_importable(backend) for package, backend in {
        "mamba-ssm": "mamba_ssm", "causal-conv1d": "causal_conv1d", "fla-core": "fla", "triton": "triton",
        "flex_attention": "flex"}.items()}
    from defocus_vlm.kernels.cpu_extension import load_error

    ops, training = call_all(False), call_all(True)
    error = load_error() if device == "cpu" else None
    fused = {"built": error is None, "error": error} if device == "cpu" else None
    return {"device": device, "dtype": dtype, "ops": ops, "ops_training": training, "packages": packages,
            "fused_cpu_ops": fused,
            "note": "GPU backends (flex, fla, triton, mamba_ssm, causal_conv1d) are chosen only on CUDA"}


def run(args: argparse.Namespace) -> int:

    from defocus_vlm.inference import resolve_device

    device = str(resolve_device(args.device))
    info = probe(device, args.dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"device: {device}, dtype: {args.dtype}")
    for title, key in (("inference (no autograd)", "ops"), ("training (autograd)", "ops_training")):
        print(f"{title}:")
        for op, choice in info[key].items():
            print(f"  {op:<15} -> {choice['backend']:<10} ({choice['chosen_by']})")
    print("optional packages: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["packages"].items()))
    if info["fused_cpu_ops"] is not None:
        fused = info["fused_cpu_ops"]
        print("fused CPU ops (C++, built just in time: scan, conv, gate): "
              + ("built" if fused["built"] else f"unavailable ({fused['error']})"))
    print(info["note"])
    return 0
