"""The engine's fast paths give the same numbers as the plain ones.

Channel-major and batch-major inputs, the state kept for backward reused across
steps and released after, the network's backward without the input gradient, and
optimizers that pack their parameters into one flat buffer.
"""

from __future__ import annotations

import numpy as np
import pytest

from models import Model, activity_spec, heart_rate_spec
from models.engine import SGD, Adam, BatchNorm1D, Conv1D, Parameter, ReLU, clip_grad_norm


def _x(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _channel_major(x: np.ndarray) -> np.ndarray:
    """The same (batch, channels, time) values, stored channel by channel as the engine's layers hand them over."""
    return np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)


def _direct_conv(layer: Conv1D, x: np.ndarray) -> np.ndarray:
    """The textbook loop over output positions and taps, in float64."""
    w, b = layer.params["weight"].value.astype(np.float64), layer.params["bias"].value
    left, right = layer.padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (left, right)))
    t_out = layer.out_length(x.shape[2])
    out = np.zeros((x.shape[0], w.shape[0], t_out))
    for t in range(t_out):
        for j in range(w.shape[2]):
            out[:, :, t] += xp[:, :, t * layer.stride + j * layer.dilation] @ w[:, :, j].T
    return out + b[None, :, None]


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "length"),
    [(5, 1, (2, 2), 1, 16), (5, 2, (1, 2), 1, 16), (7, 2, (2, 3), 1, 15), (3, 3, (0, 2), 1, 11),
     (3, 1, (6, 0), 4, 5)],  # the last: the first tap reads only padding
)
def test_conv1d_matches_a_direct_convolution_in_both_layouts(kernel, stride, padding, dilation, length):
    layer = Conv1D(3, 4, kernel, np.random.default_rng(0), stride=stride, padding=padding, dilation=dilation)
    layer.params["bias"].value[:] = [0.5, -1.0, 0.25, 2.0]
    x = _x(2, 3, length)
    want = _direct_conv(layer, x)
    for inp in (x, _channel_major(x)):
        for training in (False, True):
            np.testing.assert_allclose(layer.forward(inp, training=training), want, rtol=1e-5, atol=1e-5)


def _grads(layer, x: np.ndarray, dout: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    for p in layer.params.values():
        p.grad.fill(0)
    layer.forward(x, training=True)
    dx = np.array(layer.backward(dout))
    return dx, {k: p.grad.copy() for k, p in layer.params.items() if p.trainable}


@pytest.mark.parametrize("make", [
    lambda: Conv1D(3, 4, 5, np.random.default_rng(0), stride=2, padding=(1, 2)),
    lambda: BatchNorm1D(3),
    lambda: ReLU(),
])
def test_layers_give_the_same_gradients_for_either_memory_layout(make):
    x = _x(4, 3, 12)
    layer = make()
    out_shape = layer.forward(x, training=True).shape
    dout = _x(*out_shape, seed=2)
    dx_a, g_a = _grads(layer, x, dout)
    dx_b, g_b = _grads(layer, _channel_major(x), _channel_major(dout))
    np.testing.assert_allclose(dx_a, dx_b, rtol=1e-6, atol=1e-6)
    for k in g_a:
        np.testing.assert_allclose(g_a[k], g_b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_training_reuses_the_state_kept_for_backward_and_release_drops_it():
    model = Model(activity_spec(), seed=0)
    x = _x(8, *model.spec.input_shape)
    conv = model.network.layers[0][1]
    out = conv.forward(x, training=True)
    cols = conv._cols
    again = conv.forward(x * 2, training=True)
    assert conv._cols is cols  # the columns' buffer is overwritten, not allocated anew
    assert not np.shares_memory(out, again)  # what a layer returns is always new
    model.network.release()
    fresh = Model(activity_spec(), seed=0)
    fresh.network.forward(x)  # inference keeps nothing
    model.network.forward(x, training=True)
    model.network.release()
    for net in (fresh.network, model.network):
        for _, layer in net.layers:
            assert not layer._buffers
            assert all(getattr(layer, name, None) is None for name in layer.kept)


def test_fit_keeps_the_training_buffers_only_when_asked_and_gives_the_same_weights():
    from models.training import TrainConfig, fit

    spec = activity_spec()
    x, y = _x(16, *spec.input_shape, seed=3), np.arange(16) % len(spec.classes)
    config = TrainConfig(batch_size=8, local_steps=2, seed=0)
    kept, plain = Model(spec, seed=0), Model(spec, seed=0)
    fit(kept, x, y, config, keep_buffers=True)
    conv = kept.network.layers[0][1]
    cols = conv._buffers["cols"]
    fit(plain, x, y, config)
    assert all(not layer._buffers for _, layer in plain.network.layers)
    start = Model(spec, seed=0).network.state_dict()
    kept.network.load_state_dict(start)
    plain.network.load_state_dict(start)
    fit(kept, x, y, config, keep_buffers=True)  # a second fit in the same model reuses the buffers
    fit(plain, x, y, config)
    assert conv._buffers["cols"] is cols
    for name, value in plain.network.state_dict().items():
        np.testing.assert_array_equal(kept.network.state_dict()[name], value, err_msg=name)
    kept.network.release()
    assert not conv._buffers


def test_network_backward_without_the_input_gradient_fills_the_same_gradients():
    model = Model(heart_rate_spec(), seed=0)
    x = _x(6, *model.spec.input_shape)
    dout = _x(6, 1, seed=3)
    grads = []
    for need_dx in (True, False):
        model.network.zero_grad()
        model.network.forward(x, training=True)
        dx = model.network.backward(dout, need_dx=need_dx)
        assert (dx is None) == (not need_dx)
        grads.append({k: p.grad.copy() for k, p in model.network.parameters().items()})
    for k in grads[0]:
        np.testing.assert_array_equal(grads[0][k], grads[1][k], err_msg=k)


def _reference_adam(values, grads_per_step, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """Adam written out per parameter in float64, as in the paper."""
    w = [v.astype(np.float64) for v in values]
    m = [np.zeros_like(v) for v in w]
    v2 = [np.zeros_like(v) for v in w]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v2[i] = b2 * v2[i] + (1 - b2) * g * g
            w[i] -= lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m[i] / (np.sqrt(v2[i]) + eps)
    return w


def test_adam_on_packed_parameters_matches_the_textbook_update():
    rng = np.random.default_rng(0)
    params = [Parameter(rng.standard_normal((3, 4))), Parameter(rng.standard_normal(5)),
              Parameter(np.zeros(2), trainable=False)]
    start = [p.value.copy() for p in params[:2]]
    opt = Adam(params, lr=0.01)
    assert all(np.shares_memory(p.value, opt.values) for p in params[:2])
    assert not np.shares_memory(params[2].value, opt.values)
    steps = [[rng.standard_normal(p.value.shape) for p in params[:2]] for _ in range(3)]
    for grads in steps:
        opt.zero_grad()
        for p, g in zip(params[:2], grads, strict=True):
            p.grad += g
        opt.step()
    for p, want in zip(params[:2], _reference_adam(start, steps), strict=True):
        np.testing.assert_allclose(p.value, want, rtol=1e-5, atol=1e-6)


def test_a_parameter_given_a_new_array_is_packed_again():
    p, q = Parameter(np.ones(3)), Parameter(np.ones(2))
    opt = SGD([p, q], lr=0.5)
    p.value = np.full(3, 4.0, np.float32)  # e.g. weights loaded by assignment
    p.grad[:] = 2.0
    opt.step()
    np.testing.assert_allclose(p.value, [3.0, 3.0, 3.0])
    np.testing.assert_allclose(q.value, [1.0, 1.0])
    assert np.shares_memory(p.value, opt.values)


def test_optimizer_clipping_matches_clip_grad_norm():
    rng = np.random.default_rng(1)
    a = [Parameter(rng.standard_normal((4, 3))), Parameter(rng.standard_normal(6))]
    b = [Parameter(p.value) for p in a]
    for pa, pb in zip(a, b, strict=True):
        pa.grad[:] = pb.grad[:] = rng.standard_normal(pa.value.shape) * 3
    opt = SGD(a, lr=0.1)
    assert opt.clip_grad_norm(1.0) == pytest.approx(clip_grad_norm(b, 1.0), rel=1e-5)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_allclose(pa.grad, pb.grad, rtol=1e-5)
