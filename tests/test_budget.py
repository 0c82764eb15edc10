"""The kept fraction of the compressed sites meets 1 - ratio (within 1%, never over) on real
architectures: timm ViT, Swin and Mixer, and a torchvision ViT (random init, reduced widths)."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import tunecomp_fx

ARCHITECTURES = {
    "timm_vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4),
    "timm_swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=112, embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4)
    ),
    "timm_mixer": lambda: timm.models.mlp_mixer.MlpMixer(img_size=64, patch_size=16, num_blocks=4, embed_dim=128),
    "torchvision_vit": lambda: torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=512
    ),
}
INPUT_SIZE = {"timm_swin": 112}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_kept_fraction_meets_the_ratio(architecture):
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().eval()
    size = INPUT_SIZE.get(architecture, 64)
    x = torch.randn(2, 3, size, size)
    for ratio in (0.2, 0.5, 0.8):
        compact = tunecomp_fx.compress(model, (x,), ratio=ratio, init="svd")
        report = tunecomp_fx.get_report(compact)
        target = 1.0 - ratio
        assert report.kept_fraction <= target + 1e-9
        assert report.kept_fraction >= target - 0.01, (ratio, report.kept_fraction)
        # The report's count is the compact model's real one.
        dense_before = sum(r.params_before for r in report.compressed_rows)
        lowrank = sum(p.numel() for n, p in compact.named_parameters() if n.startswith("lowrank."))
        dense_kept = sum(r.params_after for r in report.compressed_rows if r.rank is None)
        assert lowrank + dense_kept == pytest.approx(report.kept_fraction * dense_before)
        assert report.param_ratio < 1.0 and report.mac_ratio < 1.0
        with torch.no_grad():
            assert compact(x).shape == model(x).shape
