"""Models with TSB slots, ONNX export of the TSB pattern, BN folding, Monte Carlo and training."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.func import functional_call

from nvcim.firmware_emu.contract.device import DeviceSettings
from nvcim.tools import datasets
from nvcim.tools.evaluate import (
    draw_weights,
    monte_carlo,
    quantized_params,
    split_weights,
)
from nvcim.tools.models import build, count_weights, tsb_fraction
from nvcim.tools.onnx_io import export, load_deploy
from nvcim.tools.train import TrainConfig, load_checkpoint, train_backbone

TSB_PATTERN = ["Pad", "Reshape", "Transpose", "MatMul", "Transpose", "Reshape", "Slice"]


def test_lenet3_has_the_seeds_weight_count():
    net = build("lenet3", 1, 10, image=28)
    assert count_weights(net) == (45 + 450 + 4900, 0)
    net.add_tsb(5)
    assert count_weights(net) == (5395, 25)
    assert tsb_fraction(net) == pytest.approx(25 / 5420)  # 0.46 %, as docs/methods.md states
    assert net.tsb_shapes == [(5, 28, 28), (10, 14, 14)]


@pytest.mark.parametrize("arch, width, c", [("lenet3", 1.0, 3), ("vgg8", 1 / 16, 5), ("resnet18", 1 / 16, 3)])
def test_identity_tsb_changes_nothing_and_exports_once(tmp_path, arch, width, c):
    torch.manual_seed(0)
    net = build(arch, 1, 10, width=width).eval()
    x = torch.randn(3, 1, net.config["image"], net.config["image"])
    plain = net(x)
    net.add_tsb(c)
    assert torch.allclose(net(x), plain, atol=1e-6)
    with torch.no_grad():
        net.tsb.weight.add_(0.2 * torch.randn(c, c))
    path = export(net, tmp_path / "m.onnx", role="tsb")
    proto = onnx.load(str(path))
    inits = [t.name for t in proto.graph.initializer if t.name == "tsb.weight"]
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert inits == ["tsb.weight"]  # stored once ...
    # ... used everywhere
    assert len(matmuls) == len(net.tsb_shapes) and all(n.input[1] == "tsb.weight" for n in matmuls)
    assert not any(n.op_type == "Constant" for n in proto.graph.node)
    ops = [n.op_type for n in proto.graph.node]
    start = ops.index("MatMul") - 3
    assert ops[start:start + 7] == TSB_PATTERN  # channel counts not a multiple of c: padded and sliced
    y = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(y, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    back, meta = load_deploy(path)
    assert meta["tsb"] == c and torch.equal(back.tsb.weight, net.tsb.weight)


def test_bn_folding_keeps_the_function():
    torch.manual_seed(1)
    net = build("vgg8", 1, 10, width=1 / 16)
    net.train()
    for _ in range(3):  # give the BatchNorms non-trivial statistics
        net(torch.randn(8, 1, 32, 32) * 2 + 0.5)
    net.eval()
    folded = net.folded()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


def test_monte_carlo_vectorised_equals_one_chip_at_a_time():
    torch.manual_seed(2)
    net = build("lenet3", 1, 10).eval().add_tsb(5)
    x = torch.rand(20, 1, 28, 28).numpy()
    y = np.arange(20) % 10
    nm, tsb_nm = DeviceSettings(0.3), DeviceSettings(0.03)
    mc = monte_carlo(net, x, y, nm, draws=6, seed=4, tsb=tsb_nm)
    fixed, drawn = split_weights(net, nm, None, tsb_nm)
    assert set(drawn) == {"conv1.weight", "conv2.weight", "fc.weight", "tsb.weight"}
    stacked = draw_weights(net, drawn, 6, torch.Generator().manual_seed(4))
    with torch.no_grad():
        loop = [float((functional_call(net, {**fixed, **{k: v[i] for k, v in stacked.items()}}, (torch.from_numpy(x),))
                       .argmax(1).numpy() == y).mean()) for i in range(6)]
    np.testing.assert_allclose(mc.accuracies, loop)
    assert len(set(loop)) > 1  # the chips differ
    ideal = monte_carlo(net, x, y, None, draws=3)
    assert np.all(ideal.accuracies == ideal.accuracies[0])
    lo, hi = mc.ci95
    assert lo <= mc.mean <= hi


def test_training_is_reproducible_stops_early_and_checkpoints(tmp_path):
    data = datasets.load("digits", image_size=28)
    small = datasets.Split(data.x_train[:300], data.y_train[:300], data.x_test[:100], data.y_test[:100], "digits")
    cfg = TrainConfig(epochs=10, stop_fraction=0.2, val_draws=2, seed=3)
    a = train_backbone(small, cfg, checkpoint_dir=tmp_path / "ck", log=lambda s: None, progress=False)
    b = train_backbone(small, cfg, log=lambda s: None, progress=False)
    assert a.epochs_run == 2 and len(a.history) == 2
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["backbone_e001.pt", "backbone_e002.pt"]
    restored, record = load_checkpoint(tmp_path / "ck" / "backbone_e002.pt")
    assert record["info"]["epoch"] == 2
    for k, v in restored.state_dict().items():
        assert torch.equal(v, a.model.state_dict()[k]), k
    stopped = train_backbone(small, TrainConfig(epochs=30, stop_fraction=None, patience=1, val_draws=2, seed=3, lr=0.5),
                             log=lambda s: None, progress=False)
    assert stopped.epochs_run < 30 and stopped.best_epoch == stopped.epochs_run - 1
    assert quantized_params(stopped.model).keys() == {"conv1.weight", "conv2.weight", "fc.weight"}
