"""benchmarks/vae.py's layout audit (the script itself runs in tests/test_benchmarks.py's smoke test)."""

import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

LATENT_SHAPE = (1, 16, 2, 4, 6)


def test_layout_audit_counts_channels_last_inputs_and_outputs():
    import vae
    from pipeline import build_vae_pair

    ours, _ = build_vae_pair("smoke", torch.device("cpu"), torch.float32)
    latents = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    default = vae.layout_audit(ours, latents)
    # the default layout: only the attention's token reshape hands back a (channels-last) permuted view
    assert {kind: count["channels_last_in"] for kind, count in default.items()} == dict.fromkeys(default, 0)
    assert default["CausalFrameAttention"] == {"calls": 1, "channels_last_in": 0, "channels_last_out": 1}

    ours.to(memory_format=torch.channels_last_3d)
    audit = vae.layout_audit(ours, latents)
    assert {kind: count["calls"] for kind, count in audit.items()} == {k: c["calls"] for k, c in default.items()}
    norms = audit["GroupNorm"]
    assert 0 < norms["channels_last_in"] == norms["channels_last_out"]  # GroupNorm keeps the layout it is given
    assert audit["Conv3d"]["channels_last_in"] > 0
