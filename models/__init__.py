"""What is learned and exchanged: the numpy engine, the two models, packages, export, inference."""

from models.errors import BackendUnavailable, ConfigError, InputError, ModelFormatError, WearflError
from models.model import Model, check_input
from models.package import load_package, package_bytes, parse_package, save_package
from models.spec import ACTIVITY_CLASSES, TASKS, ModelSpec, activity_spec, default_spec, heart_rate_spec
from models.training import TrainConfig, TrainResult, fit

__all__ = [
    "ACTIVITY_CLASSES",
    "TASKS",
    "BackendUnavailable",
    "ConfigError",
    "InputError",
    "Model",
    "ModelFormatError",
    "ModelSpec",
    "TrainConfig",
    "TrainResult",
    "WearflError",
    "activity_spec",
    "check_input",
    "default_spec",
    "fit",
    "heart_rate_spec",
    "load_package",
    "package_bytes",
    "parse_package",
    "save_package",
]
