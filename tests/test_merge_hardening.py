"""The merging kernels under bad input: reduced precision, non-finite values, weights that sum
to 0, degenerate slerp, integer and bool tensors, ill-typed parameters. Each case ends in a
finite tensor of the output dtype or a ``MethodError`` naming the tensor, never a raw
exception or a silent non-finite result (issue 13, items 4 and 9)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch.testing import assert_close

from netmeld.errors import MethodError, NetmeldError, RecipeError
from netmeld.io.checkpoint_merge import merge_state_dicts, merge_weights
from netmeld.ops import merge as K

F16 = torch.float16
NAN = float("nan")
INF = float("inf")


def _inputs(kernel: K.Kernel, dtype: torch.dtype = torch.float32, n: int = 2, shape=(3, 4)):
    """``(tensors, base, extra)`` for ``kernel``: small seeded tensors of ``dtype``."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g).to(dtype)
    tensors = [(base.float() + 0.1 * torch.randn(*shape, generator=g)).to(dtype) for _ in range(n)]
    extra = None
    if kernel.needs == "fisher":
        extra = [torch.rand(*shape, generator=g).to(dtype) for _ in range(n)]
    elif kernel.needs == "gram":
        extra = [(lambda x: x.T @ x)(torch.randn(6, shape[1], generator=g)).to(dtype)] * n
    return tensors, base, extra


def _merge(name: str, tensors, base=None, extra=None, **kwargs):
    return K.merge_tensor(name, tensors, base=base, extra=extra, key="fc.weight", **kwargs)


# -- precision: compute in float32, cast back --------------------------------------------------


def test_float16_task_vectors_do_not_overflow_in_between():
    # the task vector -120000 overflows float16 although the result, -60000, fits
    base = torch.tensor([60000.0], dtype=F16)
    model = torch.tensor([-60000.0], dtype=F16)
    for name in ("task-arithmetic", "ties"):
        out = _merge(name, [model], base=base, params={"density": 1.0} if name == "ties" else {})
        assert out.dtype == F16
        assert out.item() == -60000.0


def test_a_result_beyond_the_output_dtype_names_the_tensor_and_dtype():
    base = torch.tensor([60000.0], dtype=F16)
    models = [torch.tensor([65000.0], dtype=F16)] * 2  # 60000 + 2 * 5000 = 70000 > 65504
    with pytest.raises(MethodError, match=r"'fc\.weight'.*float16"):
        _merge("task-arithmetic", models, base=base)


def test_merge_tensor_casts_to_an_output_dtype_and_checks_it_fits():
    tensors = [torch.full((2,), 70000.0), torch.full((2,), 80000.0)]
    out = _merge("linear", tensors, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    with pytest.raises(MethodError, match=r"'fc\.weight'.*float16"):
        _merge("linear", tensors, out_dtype=F16)


def test_fisher_eps_does_not_round_to_zero_in_float16():
    tensors = [torch.full((3,), 1.0, dtype=F16), torch.full((3,), 3.0, dtype=F16)]
    zero = [torch.zeros(3, dtype=F16)] * 2  # no information: eps makes it the mean
    out = _merge("fisher", tensors, extra=zero)
    assert out.dtype == F16
    assert_close(out, torch.full((3,), 2.0, dtype=F16))


def test_bfloat16_dare_keeps_its_dtype_and_is_seeded():
    base = torch.zeros(1000, dtype=torch.bfloat16)
    models = [torch.ones(1000, dtype=torch.bfloat16)]
    a = _merge("dare", models, base=base, params={"seed": 3})
    b = _merge("dare", models, base=base, params={"seed": 3})
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 2.0}


# -- non-finite inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(K.KERNELS))
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_a_non_finite_model_tensor_is_refused_naming_tensor_and_model(name, value):
    kernel = K.KERNELS[name]
    tensors, base, extra = _inputs(kernel)
    tensors[1][0, 2] = value
    with pytest.raises(MethodError, match=r"'fc\.weight'.*model 1"):
        _merge(name, tensors, base=base, extra=extra)


@pytest.mark.parametrize("name", sorted(n for n, k in K.KERNELS.items() if k.needs_base))
def test_a_non_finite_base_tensor_is_refused(name):
    tensors, base, _ = _inputs(K.KERNELS[name])
    base[2, 1] = NAN
    with pytest.raises(MethodError, match=r"'fc\.weight'.*base"):
        _merge(name, tensors, base=base)


@pytest.mark.parametrize("name", ["fisher", "regmean"])
def test_non_finite_statistics_are_refused(name):
    kernel = K.KERNELS[name]
    tensors, _, extra = _inputs(kernel)
    assert extra is not None
    extra = [extra[0], extra[1].clone()]
    extra[1][0, 0] = INF
    with pytest.raises(MethodError, match=r"'fc\.weight'.*model 1's (Fisher|Gram)"):
        _merge(name, tensors, extra=extra)


# -- weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("linear", {}),
        ("ties", {}),
        ("task-arithmetic", {"normalize": True}),
        ("dare", {"normalize": True}),
        ("breadcrumbs", {"normalize": True}),
        ("fisher", {}),
    ],
)
def test_weights_summing_to_zero_are_refused_where_the_kernel_divides_by_them(name, params):
    tensors, base, extra = _inputs(K.KERNELS[name])
    with pytest.raises(MethodError, match=r"weights.*sum to 0"):
        _merge(name, tensors, base=base, extra=extra, weights=[1.0, -1.0], params=params)


def test_weights_summing_to_zero_are_fine_where_nothing_divides_by_them():
    tensors, base, _ = _inputs(K.KERNELS["task-arithmetic"])
    out = _merge("task-arithmetic", tensors, base=base, weights=[1.0, -1.0])
    assert_close(out, base + tensors[0] - tensors[1])


def test_tiny_weights_are_normalised_not_ignored():
    # the divisor used to be replaced by 1 below 1e-8, so these weights were not normalised
    tensors, base, _ = _inputs(K.KERNELS["task-arithmetic"])
    out = _merge(
        "task-arithmetic", tensors, base=base, weights=[1e-9, 1e-9], params={"normalize": True}
    )
    assert_close(out, base + (tensors[0] - base + tensors[1] - base) / 2)


@pytest.mark.parametrize("bad", [NAN, INF, "abc", None])
@pytest.mark.parametrize("name", ["linear", "ties", "fisher"])
def test_non_finite_or_non_numeric_weights_are_named(name, bad):
    tensors, base, extra = _inputs(K.KERNELS[name])
    with pytest.raises(MethodError, match="weight"):
        _merge(name, tensors, base=base, extra=extra, weights=[1.0, bad])


@pytest.mark.parametrize(
    ("name", "params", "what"),
    [
        ("slerp", {"t": "abc"}, "t must be"),
        ("slerp", {"t": NAN}, "t must be"),
        ("ties", {"density": "x"}, "density"),
        ("ties", {"density": [0.5, "x"]}, "density"),
        ("task-arithmetic", {"lambda": INF}, "lambda"),
        ("fisher", {"eps": -1.0}, "eps"),
        ("dare", {"seed": 1.5}, "seed"),
        ("linear", {"normalize": "yes"}, "normalize"),
        ("regmean", {"alpha": NAN}, "alpha"),
        ("breadcrumbs", {"gamma": "x"}, "gamma"),
    ],
)
def test_ill_typed_parameters_are_method_errors(name, params, what):
    kernel = K.KERNELS[name]
    tensors, base, extra = _inputs(kernel)
    with pytest.raises(MethodError, match=what):
        K.check_params(name, params)
    with pytest.raises(MethodError, match=what):
        _merge(name, tensors, base=base, extra=extra, params=params)


# -- slerp -------------------------------------------------------------------------------------


def test_slerp_on_nan_is_a_method_error_not_zero_division():
    a = torch.tensor([NAN, 1.0])
    with pytest.raises(MethodError, match=r"'fc\.weight'.*model 0"):
        _merge("slerp", [a, torch.ones(2)])
    with pytest.raises(MethodError, match="model 0"):
        K.slerp(a, torch.ones(2), 0.5)


@pytest.mark.parametrize("t", [0.0, 0.25, 1.0])
def test_slerp_of_a_zero_vector_is_linear_interpolation(t):
    b = torch.tensor([3.0, -4.0])
    assert_close(K.slerp(torch.zeros(2), b, t), t * b)
    assert_close(K.slerp(b, torch.zeros(2), t), (1 - t) * b)
    assert_close(K.slerp(torch.zeros(2), torch.zeros(2), t), torch.zeros(2))


def test_slerp_of_parallel_vectors_never_divides_by_zero():
    a = torch.tensor([1.0, 2.0, 3.0])
    for threshold in (1.0, 2.0):
        assert_close(K.slerp(a, a, 0.3, dot_threshold=threshold), a)
        assert_close(K.slerp(a, -a, 0.5, dot_threshold=threshold), torch.zeros(3))


# -- integer and bool tensors ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "ties", "slerp"])
@pytest.mark.parametrize(
    "values", [torch.arange(4), torch.tensor([True, False, True, True])], ids=["int64", "bool"]
)
def test_equal_integer_and_bool_tensors_are_copied(name, values):
    base = values.clone() if K.KERNELS[name].needs_base else None
    out = _merge(name, [values.clone(), values.clone()], base=base)
    assert out.dtype == values.dtype and torch.equal(out, values)


@pytest.mark.parametrize("name", ["linear", "ties", "slerp"])
@pytest.mark.parametrize(
    "values", [torch.arange(4), torch.tensor([True, False, True, True])], ids=["int64", "bool"]
)
def test_differing_integer_and_bool_tensors_are_refused(name, values):
    base = values.clone() if K.KERNELS[name].needs_base else None
    other = values.clone()
    other[0] = ~other[0] if values.dtype == torch.bool else 7
    with pytest.raises(MethodError, match=rf"'fc\.weight'.*{str(values.dtype)[6:]}"):
        _merge(name, [values, other], base=base)


def test_an_output_dtype_leaves_integer_tensors_alone():
    ids = torch.arange(5)
    out = _merge("linear", [ids, ids.clone()], out_dtype=F16)
    assert out.dtype == torch.int64 and torch.equal(out, ids)


def test_a_float_kernel_refuses_integer_tensors_itself():
    with pytest.raises(MethodError, match="int64"):
        K.linear([torch.arange(3), torch.arange(3) + 1])


def test_merge_state_dicts_copies_integer_buffers_from_the_base():
    # position_ids and num_batches_tracked are copied from the base even when models differ
    base = {"w": torch.zeros(3), "position_ids": torch.arange(4), "n": torch.tensor(5)}
    models = [
        {"w": torch.ones(3), "position_ids": torch.arange(4), "n": torch.tensor(9)},
        {"w": 3 * torch.ones(3), "position_ids": torch.arange(4), "n": torch.tensor(7)},
    ]
    out = merge_state_dicts("task-arithmetic", models, base=base, params={"lambda": 0.5})
    assert_close(out["w"], torch.full((3,), 2.0))
    assert torch.equal(out["position_ids"], base["position_ids"])
    assert out["n"].item() == 5 and out["n"].dtype == torch.int64


# -- through merge-weights ---------------------------------------------------------------------


def _two_checkpoints(tmp_path, dtype=torch.float32, value=1.0):
    for name, v in (("a", value), ("b", 2 * value)):
        save_file({"fc.weight": torch.full((4, 4), v, dtype=dtype)}, str(tmp_path / f"{name}.st"))


def _recipe(tmp_path, **fields) -> str:
    recipe = {"merge_method": "linear", "models": [{"model": "a.st"}, {"model": "b.st"}], **fields}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ((1.0, -1.0), MethodError, r"'fc\.weight'.*weight"),  # sum 0: found when merging
        ((1.0, NAN), RecipeError, r"models\[1\] \('b\.st'\): weight nan"),  # when read
    ],
)
def test_merge_weights_refuses_weights_it_cannot_use_and_writes_nothing(
    tmp_path, weights, error, message
):
    _two_checkpoints(tmp_path)
    path = _recipe(
        tmp_path,
        models=[
            {"model": "a.st", "parameters": {"weight": weights[0]}},
            {"model": "b.st", "parameters": {"weight": weights[1]}},
        ],
    )
    with pytest.raises(error, match=message):
        merge_weights(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_weights_refuses_an_output_dtype_the_result_overflows(tmp_path):
    _two_checkpoints(tmp_path, value=50000.0)  # the mean, 75000, does not fit float16
    path = _recipe(tmp_path, out_dtype="float16")
    with pytest.raises(NetmeldError, match=r"'fc\.weight'.*float16"):
        merge_weights(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- properties (hypothesis) -------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIALS = [NAN, INF, -INF, 0.0, 1e30, -1e30, 6e4, 1e-30]


@st.composite
def merge_cases(draw):
    name = draw(st.sampled_from(sorted(K.KERNELS)))
    kernel = K.KERNELS[name]
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(0, 4))
    cols = draw(st.integers(1, 5))
    shape = (
        (rows, cols) if name == "regmean" else draw(st.sampled_from([(rows, cols), (cols,), ()]))
    )
    n = 2 if name == "slerp" else draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e5]))
    g = torch.Generator().manual_seed(seed)

    def tensor(shape):
        t = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        for _ in range(draw(st.integers(0, 2))):  # inject specials, sometimes
            if t.numel():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIALS))
        return t

    tensors = [tensor(shape) for _ in range(n)]
    base = tensor(shape) if kernel.needs_base else None
    extra = None
    if kernel.needs == "fisher":
        extra = [tensor(shape).abs() for _ in range(n)]
    elif kernel.needs == "gram":
        extra = []
        for _ in range(n):
            x = tensor((3, cols)).double()
            extra.append((x.T @ x).to(dtype))
    weights = draw(
        st.none()
        | st.lists(
            st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 1.0]),
            min_size=n,
            max_size=n,
        )
    )
    params = {}
    if "density" in kernel.defaults:
        params["density"] = draw(st.floats(0.05, 1.0))
    if "lambda_" in kernel.defaults:
        params["lambda_"] = draw(st.sampled_from([1.0, 0.5, 2.0, 1e6]))
    if "t" in kernel.defaults:
        params["t"] = draw(st.floats(-0.5, 1.5))
    if "normalize" in kernel.defaults:
        params["normalize"] = draw(st.booleans())
    return name, tensors, base, extra, weights, params


@settings(max_examples=50, deadline=None)
@given(merge_cases())
def test_every_merge_ends_in_a_finite_tensor_or_a_netmeld_error(case):
    name, tensors, base, extra, weights, params = case
    try:
        out = K.merge_tensor(
            name, tensors, base=base, weights=weights, params=params, key="k", extra=extra
        )
    except NetmeldError:
        return
    reference = base if base is not None else tensors[0]
    assert out.shape == reference.shape
    assert out.dtype == reference.dtype
    assert bool(torch.isfinite(out).all())


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(DTYPES),
    st.lists(st.sampled_from([0.0, 1.0, -2.0, 3e4, NAN, INF, 1e-40]), min_size=1, max_size=6),
    st.lists(st.sampled_from([0.0, 1.0, -2.0, 3e4, NAN, INF, 1e-40]), min_size=1, max_size=6),
    st.floats(allow_nan=True, allow_infinity=True),
)
def test_slerp_ends_in_a_finite_tensor_or_a_netmeld_error(dtype, a, b, t):
    size = min(len(a), len(b))
    ta = torch.tensor(a[:size], dtype=torch.float64).to(dtype)
    tb = torch.tensor(b[:size], dtype=torch.float64).to(dtype)
    try:
        out = K.slerp(ta, tb, t)
    except NetmeldError:
        return
    assert out.dtype == dtype and out.shape == ta.shape
    assert bool(torch.isfinite(out).all())
    if math.isfinite(t) and 0 <= t <= 1 and not ta.abs().sum() and not tb.abs().sum():
        assert not out.abs().sum()
