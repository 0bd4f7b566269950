"""Datasets (no downloads), seeded training, and model directories."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from codesign.data import DatasetError, load_dataset
from codesign.model_dir import ModelDir, ModelDirError, load_model, save_model
from codesign.modules import build_network
from codesign.train import TrainConfig, evaluate, train


def test_mnist5k_split_is_deterministic(tiny) -> None:
    a = load_dataset("mnist5k", tiny.input_shape, seed=0)
    b = load_dataset("mnist5k", tiny.input_shape, seed=0)
    c = load_dataset("mnist5k", tiny.input_shape, seed=1)
    assert (a.info.n_train, a.info.n_val) == (4000, 1000) and a.info.num_classes == 10
    assert torch.equal(a.y_val, b.y_val) and not torch.equal(a.y_val, c.y_val)
    x, y = next(a.batches("train", 32, shuffle=True, seed=3))
    assert x.shape == (32, 1, 28, 28) and abs(float(x.mean())) < 0.5


def test_digits_are_resized_and_channels_adapted() -> None:
    d = load_dataset("digits", (3, 32, 32))
    x, _ = next(d.batches("val", 8))
    assert x.shape == (8, 3, 32, 32) and len(d.info.mean) == 3


def test_image_folder_and_cifar_batches(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(8):
            arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    d = load_dataset(str(tmp_path / "imgs"), (1, 16, 16))
    assert d.info.classes == ("cat", "dog") and d.info.n_train + d.info.n_val == 16
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name, n in (("data_batch_1", 20), ("test_batch", 10)):
        with (cifar / name).open("wb") as fh:
            pickle.dump(
                {
                    b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                    b"labels": list(rng.integers(0, 10, n)),
                },
                fh,
            )
    d = load_dataset(str(cifar), (3, 32, 32))
    assert (d.info.n_train, d.info.n_val) == (20, 10)


def test_unknown_dataset_says_what_to_give() -> None:
    with pytest.raises(DatasetError, match="mnist5k, digits"):
        load_dataset("imagenet", (3, 224, 224))


@pytest.mark.network
def test_training_learns_and_is_seeded(tiny, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    data = load_dataset("digits", tiny.input_shape)
    arch = tiny.uniform("k3e3")
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.1, seed=1)
    nets = [build_network(tiny, arch, seed=0) for _ in range(2)]
    before = evaluate(nets[0], data)
    hist = [train(n, data, cfg, progress=False) for n in nets]
    assert hist[0][-1]["val_acc"] > max(before, 30.0)
    assert hist[0][-1]["loss"] == pytest.approx(hist[1][-1]["loss"], rel=1e-5)
    # resumable: a checkpoint at epoch 2 means nothing left to do
    ckpt = tmp_path / "ckpt.pt"
    net = build_network(tiny, arch, seed=0)
    train(net, data, cfg, checkpoint=ckpt, progress=False)
    again = train(build_network(tiny, arch, seed=9), data, cfg, checkpoint=ckpt, progress=False)
    assert again[-1]["val_acc"] == pytest.approx(evaluate(net, data))
    # another architecture on the same path starts over instead of failing to load it
    other = build_network(tiny, tiny.uniform("k5e6"), seed=0)
    hist = train(other, data, cfg, checkpoint=ckpt, progress=False)
    assert len(hist) == cfg.epochs and hist[-1]["val_acc"] == pytest.approx(evaluate(other, data))


def test_model_dir_round_trip(tiny, tmp_path: Path) -> None:
    data = load_dataset("digits", tiny.input_shape)
    arch = tiny.uniform("k5e3")
    net = build_network(tiny, arch, seed=4)
    meta = ModelDir(
        tuple(net.specs), arch=arch.encode(), space=tiny.name, dataset=data.info, accuracy=12.5
    )
    save_model(tmp_path / "m", net, meta)
    net2, meta2 = load_model(tmp_path / "m")
    assert (
        meta2.blocks == meta.blocks and meta2.dataset == data.info and meta2.arch == arch.encode()
    )
    x = torch.randn(2, *tiny.input_shape)
    assert torch.equal(net.eval()(x), net2(x))
    with pytest.raises(ModelDirError, match="model.json and weights.pt"):
        load_model(tmp_path)
