"""Central finite-difference checks for every layer and loss of the numpy engine."""

from __future__ import annotations

import numpy as np
import pytest

from models.engine import (
    MSE,
    BatchNorm1D,
    Conv1D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePool1D,
    Huber,
    Layer,
    ReLU,
    SoftmaxCrossEntropy,
)

EPS = 1e-2  # float32 engine: larger steps keep rounding error below the truncation error
RTOL, ATOL = 2e-2, 2e-3


def _numeric(f, x: np.ndarray, idx: list[tuple[int, ...]]) -> np.ndarray:
    out = []
    for i in idx:
        old = x[i]
        x[i] = old + EPS
        up = f()
        x[i] = old - EPS
        down = f()
        x[i] = old
        out.append((up - down) / (2 * EPS))
    return np.array(out)


def _sample(shape: tuple[int, ...], rng: np.random.Generator, k: int = 25) -> list[tuple[int, ...]]:
    flat = rng.choice(int(np.prod(shape)), size=min(k, int(np.prod(shape))), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def check_layer(layer: Layer, x: np.ndarray, seed: int = 0, reseed=None) -> None:
    """dx and every parameter gradient match central differences of sum(forward(x) * r)."""
    rng = np.random.default_rng(seed)
    if reseed:
        reseed()
    r = rng.standard_normal(layer.forward(x, training=True).shape).astype(np.float32)

    def f() -> float:
        if reseed:
            reseed()
        return float(np.sum(layer.forward(x, training=True).astype(np.float64) * r))

    for p in layer.params.values():
        p.grad.fill(0)
    if reseed:
        reseed()
    layer.forward(x, training=True)
    dx = layer.backward(r)
    idx = _sample(x.shape, rng)
    np.testing.assert_allclose([dx[i] for i in idx], _numeric(f, x, idx), rtol=RTOL, atol=ATOL)
    for name, p in layer.params.items():
        if not p.trainable:
            continue
        idx = _sample(p.value.shape, rng)
        analytic = [p.grad[i] for i in idx]
        np.testing.assert_allclose(analytic, _numeric(f, p.value, idx), rtol=RTOL, atol=ATOL, err_msg=name)


def _x(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_dense_gradients_match_finite_differences():
    check_layer(Dense(7, 5, np.random.default_rng(0)), _x(4, 7))


def test_relu_gradients_match_finite_differences():
    x = _x(3, 4, 9)
    x[np.abs(x) < 0.05] = 0.5  # keep away from the kink, where the derivative is undefined
    check_layer(ReLU(), x)


def test_flatten_and_pool_gradients_match_finite_differences():
    check_layer(Flatten(), _x(3, 4, 5))
    check_layer(GlobalAveragePool1D(), _x(3, 4, 5))


def test_dropout_gradients_match_finite_differences_with_a_fixed_mask():
    layer = Dropout(0.3)

    def reseed() -> None:
        layer.rng = np.random.default_rng(42)

    check_layer(layer, _x(4, 10), reseed=reseed)


def test_batchnorm_gradients_match_finite_differences():
    layer = BatchNorm1D(3)
    layer.params["gamma"].value[:] = [0.5, 1.5, -1.0]
    layer.params["beta"].value[:] = [0.1, -0.2, 0.3]
    check_layer(layer, _x(4, 3, 6) * 2 + 1)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [(1, 1, (0, 0), 1), (3, 1, (1, 1), 1), (5, 2, (1, 2), 1), (4, 3, (2, 0), 1), (3, 1, (2, 2), 2), (3, 2, (0, 0), 3)],
)
def test_conv1d_gradients_match_finite_differences(kernel, stride, padding, dilation):
    layer = Conv1D(3, 4, kernel, np.random.default_rng(0), stride=stride, padding=padding, dilation=dilation)
    layer.params["bias"].value[:] = np.random.default_rng(5).standard_normal(4)
    check_layer(layer, _x(2, 3, 17))


def test_conv1d_matches_a_direct_convolution():
    rng = np.random.default_rng(3)
    layer = Conv1D(3, 5, 4, rng, stride=2, padding=(1, 2), dilation=2)
    x = _x(2, 3, 20)
    w, b = layer.params["weight"].value, layer.params["bias"].value
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2))).astype(np.float64)
    t_out = layer.out_length(20)
    want = np.zeros((2, 5, t_out))
    for t in range(t_out):
        for j in range(4):
            want[:, :, t] += xp[:, :, t * 2 + j * 2] @ w[:, :, j].T
    want += b[None, :, None]
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-5, atol=1e-5)


def _check_loss(loss, pred: np.ndarray, target: np.ndarray) -> None:
    value, grad = loss(pred, target)
    idx = _sample(pred.shape, np.random.default_rng(0))
    numeric = _numeric(lambda: loss(pred, target)[0], pred, idx)
    np.testing.assert_allclose([grad[i] for i in idx], numeric, rtol=RTOL, atol=ATOL)
    assert np.isfinite(value)


def test_softmax_cross_entropy_gradients_match_finite_differences():
    _check_loss(SoftmaxCrossEntropy(), _x(6, 4), np.array([0, 1, 2, 3, 1, 0]))


def test_weighted_cross_entropy_gradients_match_finite_differences():
    _check_loss(SoftmaxCrossEntropy(np.array([1.0, 3.0, 0.5, 2.0])), _x(6, 4), np.array([0, 1, 2, 3, 1, 0]))


def test_mse_and_huber_gradients_match_finite_differences():
    pred, target = _x(8, 1), _x(8, 1, seed=2)
    _check_loss(MSE(), pred, target)
    _check_loss(Huber(0.5), pred, target)


def test_weighted_cross_entropy_equals_the_weighted_mean_of_per_sample_losses():
    logits, labels = _x(5, 3), np.array([0, 2, 1, 1, 2])
    weights = np.array([2.0, 1.0, 0.5])
    value, _ = SoftmaxCrossEntropy(weights)(logits, labels)
    z = logits.astype(np.float64)
    nll = np.log(np.exp(z).sum(1)) - z[np.arange(5), labels]
    w = weights[labels]
    assert value == pytest.approx((w * nll).sum() / w.sum(), rel=1e-5)


def test_batchnorm_with_fixed_statistics_gradients_match_finite_differences():
    layer = BatchNorm1D(3)
    layer.params["running_mean"].value[:] = [0.2, -0.1, 0.5]
    layer.params["running_var"].value[:] = [0.5, 2.0, 1.5]
    layer.params["gamma"].value[:] = [0.5, 1.5, -1.0]
    layer.frozen = True
    before = layer.params["running_mean"].value.copy()
    check_layer(layer, _x(4, 3, 6))
    np.testing.assert_array_equal(layer.params["running_mean"].value, before)
