"""Fusion adapters: gated cross-attention starts as the unimodal features."""

import torch

from peftmm.fusion import build_fusion, masked_mean
from peftmm.recipe import from_dict


def config(fusion):
    return from_dict({"vision": {"backbone": "mobilenet-v2"}, "text": {"backbone": "minilm-l6"},
                      "fusion": fusion}).fusion


def test_gated_cross_attention_starts_at_unimodal_features():
    torch.manual_seed(0)
    fusion = build_fusion(config({"type": "gated-cross-attention", "dim": 16, "heads": 2, "layers": 2}), 24, 12)
    fusion.eval()
    vision, text = torch.randn(3, 5, 24), torch.randn(3, 7, 12)
    vmask = torch.ones(3, 5, dtype=torch.bool)
    tmask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool()
    out = fusion(vision, vmask, text, tmask)
    t, v = masked_mean(fusion.text_proj(text), tmask), masked_mean(fusion.vision_proj(vision), vmask)
    expected = torch.cat([t, v, t * v], -1)
    assert torch.allclose(out, expected, atol=1e-6)
    # ... and the gates receive gradient, so training can open them.
    out.sum().backward()
    assert all(block.attn_gate.grad.abs().item() > 0 for block in fusion.blocks)


def test_padding_does_not_leak_into_fused_output():
    torch.manual_seed(0)
    for fusion_config in ({"type": "gated-cross-attention", "dim": 16, "heads": 2}, {"type": "concat-mlp", "dim": 16}):
        fusion = build_fusion(config(fusion_config), 8, 8).eval()
        if hasattr(fusion, "blocks"):
            for block in fusion.blocks:
                torch.nn.init.constant_(block.attn_gate, 0.5)
        vision, text = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
        padded = torch.cat([text, torch.randn(1, 2, 8)], 1)
        a = fusion(vision, torch.ones(1, 4).bool(), text, torch.ones(1, 3).bool())
        b = fusion(vision, torch.ones(1, 4).bool(), padded, torch.tensor([[1, 1, 1, 0, 0]]).bool())
        assert torch.allclose(a, b, atol=1e-5)
