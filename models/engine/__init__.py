"""The numpy training engine: layers, losses, optimizers, a sequential network."""

from models.engine.layers import (
    BatchNorm1D,
    Conv1D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePool1D,
    Layer,
    Parameter,
    ReLU,
)
from models.engine.losses import MSE, Huber, Loss, SoftmaxCrossEntropy, softmax
from models.engine.network import Network, build_layer
from models.engine.optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm

__all__ = [
    "MSE",
    "SGD",
    "Adam",
    "AdamW",
    "BatchNorm1D",
    "Conv1D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAveragePool1D",
    "Huber",
    "Layer",
    "Loss",
    "Network",
    "Optimizer",
    "Parameter",
    "ReLU",
    "SoftmaxCrossEntropy",
    "build_layer",
    "clip_grad_norm",
    "softmax",
]
