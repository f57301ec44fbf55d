"""The one tolerance rule (tests/conftest.py) itself: what it lets through and what it does not."""
import pytest
import torch

from tests.conftest import BASELINE_CAP_ULPS, assert_close, make


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_baseline_error_is_capped(dtype):
    """A kernel 20 ulps off fails even next to a baseline 100 ulps off (a wrong or mismatched
    baseline); uncapped, 2 x 100 ulps would have let it through. 1 ulp off passes."""
    ref = make((64, 64), torch.float32, "cpu", seed=1).clamp(-0.99, 0.99)  # output scale 1
    ulp = torch.finfo(dtype).eps
    bad_baseline = (ref + 100 * ulp).to(dtype)
    with pytest.raises(AssertionError, match=f"capped at {BASELINE_CAP_ULPS * ulp:.3g}"):
        assert_close((ref + 20 * ulp).to(dtype), ref, bad_baseline)
    assert_close((ref + ulp).to(dtype), ref, bad_baseline)
    assert_close(ref.to(dtype), ref, ref.to(dtype))  # exactly rounded, exact baseline: the floor admits it


def test_nan_and_inf_must_match():
    ref = torch.tensor([1.0, float("nan"), float("inf")])
    with pytest.raises(AssertionError, match="NaN pattern"):
        assert_close(torch.tensor([1.0, 0.0, float("inf")]), ref)
    with pytest.raises(AssertionError, match="inf pattern"):
        assert_close(torch.tensor([1.0, float("nan"), -float("inf")]), ref)
