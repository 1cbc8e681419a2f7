"""driver.load / driver.open as host applications use them."""

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nvcim import driver
from nvcim.driver.cache import cache_dir


def app(session_factory, path, x):
    """Application code written against onnxruntime's API, unchanged for the chip."""
    sess = session_factory(str(path))
    name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    return sess.run(out_names, {name: x})[0]


@pytest.mark.parametrize("kind", ["emu", "pty", "tcp"])
def test_same_application_code_runs_on_onnxruntime_and_the_chip(kind, serve, mlp_path, batch):
    device = {"emu": lambda: "emu://?sigma=0",
              "pty": lambda: serve("--pty", "--sigma", "0").address,
              "tcp": lambda: serve("--tcp", "0", "--sigma", "0").address}[kind]()
    expected = app(ort.InferenceSession, mlp_path, batch)
    got = app(lambda p: driver.load(p, device=device), mlp_path, batch)
    # float weights vs 8-bit weights on the chip: within the quantisation error
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_noisy_link_gives_results_identical_to_a_clean_link(mlp_path, batch):
    clean_url = "emu://?sigma=0.3&seed=3"
    with driver.load(mlp_path, device=clean_url, policy="write-verify") as sess:
        clean = sess.run(None, {"x": batch})[0]
        clean_counters = sess.device.counters()
    noisy_url = clean_url + "&link_faults=1e-3&link_seed=5"
    with driver.load(mlp_path, device=noisy_url, policy="write-verify") as sess:
        noisy = sess.run(None, {"x": batch})[0]
        port = sess.device.link.port
        assert port.faults_to_chip.injected > 50 and port.faults_from_chip.injected > 0
        assert sess.device.link.retransmissions > 50
        assert sess.device.counters()["write_pulses"] == clean_counters["write_pulses"]
    assert np.array_equal(clean, noisy)


def test_policies_cost_what_they_should(mlp_path):
    with driver.load(mlp_path, device="emu://?seed=1") as sess:
        open_loop = sess.write_stats
        layers = sess.program.layers
    with driver.load(mlp_path, device="emu://?seed=1", policy="write-verify") as sess:
        full = sess.write_stats
    mask = {layers[1].name: np.zeros((layers[1].in_features, layers[1].out_features), bool)}
    mask[layers[1].name][:, 0] = True
    with driver.load(mlp_path, device="emu://?seed=1", policy="selective", verify_mask=mask) as sess:
        selective = sess.write_stats
    assert open_loop.write_pulses == open_loop.cells == full.cells == selective.cells
    assert full.write_pulses > 1.8 * full.cells
    extra = selective.write_pulses - selective.cells
    assert 0 < extra < 4 * 4 * layers[1].in_features  # only the 300 weights of one column were verified


def test_bad_policy_arguments(mlp_path):
    with pytest.raises(driver.InvalidArgument, match="policy 'fast'"):
        driver.load(mlp_path, policy="fast")
    with pytest.raises(driver.InvalidArgument, match="verify_mask goes with policy='selective'"):
        driver.load(mlp_path, verify_mask={})
    with pytest.raises(driver.InvalidArgument, match="verify_mask for layer .* has shape \\(2, 2\\)"):
        with driver.load(mlp_path) as sess:
            name = sess.program.layers[0].name
        driver.load(mlp_path, policy="selective", verify_mask={name: np.ones((2, 2), bool)})


def test_compiled_programs_are_cached_by_model_and_chip(mlp_path, batch, caplog):
    before = set(cache_dir().glob("*.nvcp"))
    with driver.load(mlp_path, device="emu://?sigma=0&arrays=40") as sess:
        first = sess.run(None, {"x": batch})[0]
    added = set(cache_dir().glob("*.nvcp")) - before
    assert len(added) == 1
    with caplog.at_level(logging.INFO, logger="nvcim.driver.cache"):
        with driver.load(mlp_path, device="emu://?sigma=0&arrays=40") as sess:
            assert np.array_equal(sess.run(None, {"x": batch})[0], first)
    assert "from cache" in caplog.text
    with driver.load(mlp_path, device="emu://?sigma=0&rows=128") as sess:  # another geometry, another entry
        pass
    assert len(set(cache_dir().glob("*.nvcp")) - before) == 2
    # a damaged entry is rebuilt, not trusted
    entry, = added
    entry.write_bytes(entry.read_bytes()[:100])
    with driver.load(mlp_path, device="emu://?sigma=0&arrays=40") as sess:
        assert np.array_equal(sess.run(None, {"x": batch})[0], first)


def test_a_model_seen_before_is_not_normalised_again(mlp_path, batch, tmp_path, monkeypatch):
    with driver.load(mlp_path, device="emu://?sigma=0&arrays=40", cache=False) as sess:  # lowered afresh
        first = sess.run(None, {"x": batch})[0]
        described = (sess.get_inputs(), sess.get_outputs(), sess.get_modelmeta())
    driver.load(mlp_path, device="emu://?sigma=0&arrays=40").close()  # fills the cache

    def lower_model(*args, **kwargs):
        raise AssertionError("normalised again")
    monkeypatch.setattr("nvcim.driver.session.lower_model", lower_model)
    with driver.load(mlp_path, device="emu://?sigma=0&arrays=40") as sess:
        assert (sess.get_inputs(), sess.get_outputs(), sess.get_modelmeta()) == described
        assert np.array_equal(sess.run(None, {"x": batch})[0], first)
    other = onnx.load(str(mlp_path))
    other.doc_string = "the same graph, other bytes"
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(AssertionError, match="normalised again"):
        driver.load(tmp_path / "other.onnx", device="emu://?sigma=0&arrays=40")


def test_link_timeout_is_a_clear_error(serve):
    server = serve("--pty")
    dev = driver.open(server.address, timeout=0.2)
    server.stop()
    with pytest.raises(driver.LinkError, match="IDENTIFY|REG_READ"):
        dev.read_register("CHIP_ID")
    dev.close()


def test_batches_larger_than_the_staging_buffer_are_split(mlp_path):
    x = np.random.default_rng(3).standard_normal((700, 64)).astype(np.float32)  # 179 KB of inputs
    with driver.load(mlp_path, device="emu://?sigma=0&buffer_size=65536") as small, \
            driver.load(mlp_path, device="emu://?sigma=0") as large:
        assert np.array_equal(small.run(None, {"x": x})[0], large.run(None, {"x": x})[0])
