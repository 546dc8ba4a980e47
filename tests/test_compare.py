"""The one output-against-reference rule (effbert/reference/compare.py) that the tests, ``effbert
check`` and the bench share: the relative error in float64, non-finite entries that must agree, the
2x-eager bound for low precision, and failure messages that name the worst entry."""

import pytest
import torch

from effbert.bench.case import Case, check_output
from effbert.reference.compare import assert_close, compare, relative_error


def test_relative_error_is_the_float64_norm_ratio():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    out = torch.tensor([3.0, 4.5], dtype=torch.float32)
    assert relative_error(out, ref) == pytest.approx(0.5 / 5.0, rel=1e-12)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(torch.empty(0), torch.empty(0)) == 0.0


def test_non_finite_entries_must_agree():
    ref = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64)
    assert relative_error(ref.clone(), ref) == 0.0  # NaN in, NaN out; the same infinity
    assert relative_error(torch.tensor([1.0, 0.0, float("inf")]), ref) == float("inf")  # a NaN lost
    assert relative_error(torch.tensor([1.0, float("nan"), float("-inf")]), ref) == float("inf")
    nan_for_one = torch.tensor([float("nan"), float("nan"), float("inf")])
    assert relative_error(nan_for_one, ref) == float("inf")


def test_failure_names_the_worst_index_and_both_values():
    ref = torch.zeros(3, 4, dtype=torch.float64)
    ref[:] = 1.0
    out = ref.clone().float()
    out[2, 1] = 1.5
    out[0, 3] = 1.1
    with pytest.raises(AssertionError) as info:
        assert_close(out, ref, rtol=1e-5, what="dq")
    text = str(info.value)
    assert text.startswith("dq: relative error")
    assert "worst at index [2, 1]: got 1.5, reference 1.0" in text
    nan_out = ref.clone()
    nan_out[1, 2] = float("nan")
    result = compare(nan_out, ref, rtol=1e-5)
    assert not result.ok and result.index == (1, 2) and result.error == float("inf")


def test_low_precision_bound_is_twice_the_eager_error_plus_rtol():
    torch.manual_seed(0)
    ref = torch.randn(256, dtype=torch.float64)
    eager = ref.to(torch.bfloat16)
    eager_err = relative_error(eager, ref)
    result = compare(eager, ref, rtol=1e-5, lowp_eager=eager)
    assert result.ok and result.bound == pytest.approx(2 * eager_err + 1e-5)
    worse = (ref * (1 + 3 * eager_err)).to(torch.bfloat16)
    assert not compare(worse, ref, rtol=1e-5, lowp_eager=eager).ok


def test_arguments_are_checked():
    x = torch.ones(2)
    with pytest.raises(ValueError, match="rtol"):
        compare(x, x, rtol=-1.0)
    with pytest.raises(ValueError, match="out must have the reference's shape"):
        compare(torch.ones(3), x, rtol=0.0)
    with pytest.raises(TypeError, match="ref must be a torch.Tensor"):
        relative_error(x, [1.0, 1.0])
    with pytest.raises(ValueError, match="lowp_eager"):
        compare(x, x, rtol=0.0, lowp_eager=torch.ones(3))


def _case(out, ref, **kw):
    return Case(
        op="o",
        params={"N": 2},
        dtype="float32",
        mode="forward",
        provider="p",
        fn=lambda: out,
        make_inputs=tuple,
        reference=lambda: ref,
        bytes=1,
        flops=0,
        **kw,
    )


def test_the_bench_check_uses_the_same_rule():
    """A case the tests' rule fails fails the bench check too, with the worst entry in its
    reason."""
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    fields, problem = check_output(_case(ref.float(), ref, rtol=1e-6), ())
    assert problem is None and fields == {"rel_error": 0.0}
    bad = torch.tensor([1.0, 2.1])
    fields, problem = check_output(_case(bad, ref, rtol=1e-6), ())
    assert fields["rel_error"] == pytest.approx(compare(bad, ref, rtol=1e-6).error)
    assert problem.startswith("relative error") and "worst at [1]" in problem
    _, problem = check_output(_case(torch.tensor([1.0, float("nan")]), ref, rtol=1.0), ())
    assert problem is not None  # a NaN the reference does not have fails whatever the tolerance
    with pytest.raises(TypeError, match="case must be a Case"):
        check_output("case", ())


def test_case_carries_its_params_as_data():
    case = _case(torch.ones(1), torch.ones(1))
    assert case.shape == "N=2" and case.params == {"N": 2}
    assert case.matches({"N": 2}) and not case.matches({"N": 3}) and case.matches({"pad": None})
    common = dict(
        dtype="float32",
        mode="forward",
        provider="p",
        fn=None,
        make_inputs=tuple,
        reference=None,
        bytes=1,
        flops=0,
    )
    labelled = Case(op="o", shape="B=1,real lengths", params={"B": 1}, **common)
    assert labelled.shape == "B=1,real lengths" and labelled.params == {"B": 1}
    with pytest.raises(ValueError, match="needs params or a shape"):
        Case(op="o", **common)
    with pytest.raises(TypeError, match="params must be a dict"):
        Case(op="o", params=[("N", 2)], **common)
