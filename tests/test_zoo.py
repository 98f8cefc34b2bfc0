"""The offline zoo: real pretrained weights from PyPI wheels, verified and converted exactly."""

import pytest
import torch
from torch import nn

from peftmm import PeftmmError, zoo

pytestmark = pytest.mark.integration


def _conv_bn_relu(inp, out, kernel=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, inp, out, stride, expand):
        super().__init__()
        hidden = inp * expand
        layers = [_conv_bn_relu(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [_conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class ReferenceMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout (same parameter names), written out independently."""

    def __init__(self):
        super().__init__()
        features, channels = [_conv_bn_relu(3, 32, stride=2)], 32
        for expand, out, repeats, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
            for i in range(repeats):
                features.append(_InvertedResidual(channels, out, stride if i == 0 else 1, expand))
                channels = out
        features.append(_conv_bn_relu(channels, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def test_converted_mobilenet_v2_matches_torchvision_layout(tmp_path):
    from transformers import MobileNetV2ForImageClassification

    raw = zoo.fetch_verified("mobilenet-v2", tmp_path)
    reference = ReferenceMobileNetV2()
    reference.load_state_dict(torch.load(next(raw.glob("*.pth")), weights_only=True))
    converted = MobileNetV2ForImageClassification.from_pretrained(zoo.resolve("mobilenet-v2"))
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, actual = reference.eval()(images), converted.eval()(pixel_values=images).logits
    assert (expected - actual).abs().max().item() < 1e-4
    assert torch.equal(expected.argmax(-1), actual.argmax(-1))


def test_zoo_text_model_is_verified_minilm():
    folder = zoo.resolve("minilm-l6")
    assert zoo.sha256_file(folder / "model.safetensors") == zoo.catalogue()["minilm-l6"]["sha256"]["model.safetensors"]


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(PeftmmError, match="unknown zoo model 'mobilenet-v3'; the zoo has: minilm-l6, mobilenet-v2"):
        zoo.resolve("mobilenet-v3")


def test_checksum_mismatch_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not the weights")
    with pytest.raises(PeftmmError, match="checksum mismatch for weights.bin"):
        zoo._verify(tmp_path, {"weights.bin": "0" * 64}, "x")
