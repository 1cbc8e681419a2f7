"""Same seed, same numbers under any torch thread count (the README's figures must reproduce anywhere).

Each run is a fresh interpreter that sets its thread count before anything trains, as a
user's machine would: a short backbone training (noise injection, validation Monte Carlo)
and a TSB training on fixed noisy weights, then a SHA-256 of every trained tensor and of
the loss history. Runs under 1 and 2 threads must agree bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from nvcim.tools import datasets
    from nvcim.tools.evaluate import monte_carlo, quantized_params
    from nvcim.tools.train import TrainConfig, train_backbone
    from nvcim.tools.tsb import TSBConfig, train_tsb
    from nvcim.firmware_emu.contract.device import DeviceSettings
    d = datasets.load("digits", image_size=28)
    d = datasets.Split(d.x_train[:320], d.y_train[:320], d.x_test[:200], d.y_test[:200], "digits")
    r = train_backbone(d, TrainConfig(epochs=1, stop_fraction=None, val_draws=2), log=lambda s: None, progress=False)
    model = r.model.add_tsb(5)
    gen = torch.Generator().manual_seed(3)
    fixed = {k: v + 0.05 * v.abs().max() * torch.randn(v.shape, generator=gen)
             for k, v in quantized_params(model).items() if k != "tsb.weight"}
    t = train_tsb(model, fixed, d, TSBConfig(c=5, epochs=1), log=lambda s: None, progress=False)
    mc = monte_carlo(model, d.x_test, d.y_test, DeviceSettings(0.3), draws=8, seed=1)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    h.update(repr([row["loss"] for row in r.history + t.history]).encode())
    h.update(mc.accuracies.tobytes())
    print(torch.get_num_threads(), h.hexdigest())
""")


def test_training_is_bit_identical_under_1_and_2_threads():
    runs = {t: subprocess.Popen([sys.executable, "-c", SCRIPT, str(t)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for t in (1, 2)}
    digests = {}
    for threads, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        reported_threads, digests[threads] = out.split()
        assert int(reported_threads) == threads  # the caller's own setting is restored after training
    assert digests[1] == digests[2]
