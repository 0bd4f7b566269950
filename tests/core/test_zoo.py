from __future__ import annotations

import pytest
import torch

from codesign.zoo import mobilenet_v2, resnet18


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_torchvision() -> None:
    assert _params(mobilenet_v2(num_classes=1000)) == 3_504_872
    assert _params(resnet18(num_classes=1000)) == 11_689_512


@pytest.mark.parametrize("factory", [mobilenet_v2, resnet18])
def test_shapes_at_64x64(factory) -> None:
    torch.manual_seed(0)
    net = factory(num_classes=10).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    one_channel = factory(num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert one_channel(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_mobilenet_width_scales_channels() -> None:
    half = mobilenet_v2(width=0.5)
    assert _params(half) < _params(mobilenet_v2()) / 2
    with torch.no_grad():
        assert half.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_training_device_defaults_and_returns_to_cpu() -> None:
    from codesign.data import load_dataset
    from codesign.train import TrainConfig, default_device, evaluate, train

    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    data = load_dataset("digits", (1, 8, 8))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    before = evaluate(net, data)
    train(net, data, TrainConfig(epochs=1, lr=0.1), progress=False, device="cpu")
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert evaluate(net, data) > max(before, 50.0)
    with pytest.raises(RuntimeError):
        train(net, data, TrainConfig(epochs=1), progress=False, device="no-such-device")
