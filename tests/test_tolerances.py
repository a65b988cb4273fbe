"""The tolerance table and compare(): exact-ish bounds for fp32, whole-output bounds for lossy."""
import numpy as np
import pytest
import torch

from vitopt.errors import ConfigError, NumericsError
from vitopt.tolerances import PRECISIONS, TABLE, compare, require_close, tolerance


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(scale=3.0, size=(3, 7)).astype(np.float32)


def test_every_precision_has_a_default_row():
    for precision in PRECISIONS:
        assert (precision, "*") in TABLE
        assert tolerance(precision, "no-such-backend") == TABLE[(precision, "*")]


def test_fp32_torch_bound_is_the_lifting_bound():
    assert tolerance("fp32", "torch").atol == 1e-4
    assert tolerance("fp32", "openvino").atol >= tolerance("fp32", "onnxruntime").atol


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="'fp8'.*fp32"):
        tolerance("fp8", "openvino")


def test_fp32_identical_and_small_noise_pass(logits):
    assert compare(logits, logits).ok
    result = compare(logits + 5e-5, logits, "fp32", "torch")
    assert result.ok and result.max_abs == pytest.approx(5e-5, rel=1e-2)


def test_fp32_beyond_bound_fails_and_says_how(logits):
    noisy = logits.copy()
    noisy[1, 2] += 1e-2
    result = compare(noisy, logits, "fp32", "onnxruntime")
    assert not result.ok
    assert "1 of 21 values" in result.reason


def test_lossy_bound_uses_cosine_and_output_scale(logits):
    rng = np.random.default_rng(1)
    close = logits * (1 + rng.normal(scale=0.005, size=logits.shape))
    assert compare(close, logits, "bf16", "openvino").ok
    assert not compare(close, logits, "fp32", "openvino").ok
    far = logits + rng.normal(scale=2.0, size=logits.shape)
    result = compare(far, logits, "int8", "openvino")
    assert not result.ok and "cosine" in result.reason


def test_cosine_is_per_sample(logits):
    bad = logits.copy()
    bad[2] = -bad[2]  # one sample flipped: whole-tensor cosine would still be ~0.33
    assert compare(bad, logits, "int8").cos_sim == pytest.approx(-1.0)


def test_nan_and_shape_mismatch_fail(logits):
    nan = logits.copy()
    nan[0, 0] = np.nan
    assert "NaN" in compare(nan, logits, "bf16").reason
    assert "shape" in compare(logits[:2], logits).reason


def test_torch_inputs_including_bf16(logits):
    expected = torch.from_numpy(logits)
    result = compare(expected.to(torch.bfloat16), expected, "bf16", "torch")
    assert result.ok and 0 < result.max_abs < 0.1


def test_require_close_raises_numerics_error(logits):
    assert require_close(logits, logits, "fp32", "onnxruntime").ok
    with pytest.raises(NumericsError, match="stage 3 .*does not match") as info:
        require_close(logits + 1, logits, "fp32", "onnxruntime", what="stage 3 output")
    assert info.value.exit_code == 2
