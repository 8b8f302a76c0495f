"""The model commands of the ``wearfl`` CLI: init, export, predict, explain, info."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import InputError
from models.files import write_atomic
from models.inference import BACKENDS, open_model
from models.model import Model
from models.package import load_package, save_package
from models.spec import TASKS, ModelSpec, default_spec

__all__ = ["add_commands"]

EXPORT_FORMATS = ("onnx", "tflite", "tflite-int8")


def _csv(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _channels(values: list[str]) -> list[str]:
    return [c for v in values for c in _csv(v)]


def cmd_init(args: argparse.Namespace) -> int:
    spec = default_spec(
        args.task,
        channels=_channels(args.channels) if args.channels else None,
        window=args.window,
        classes=args.classes,
        sampling_rate_hz=args.sampling_rate,
    )
    model = Model(spec, seed=args.seed)
    save_package(model, args.out)
    print(f"wrote {args.out}: {spec.task} model, {model.num_parameters()} parameters, "
          f"input {len(spec.channels)} x {spec.window} at {spec.sampling_rate_hz:g} Hz")
    return 0


def _load_windows(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {p} does not exist; pass windows saved with numpy.save.")
    try:
        loaded = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{p} is not a readable .npy array ({exc}); save windows with numpy.save.") from exc
    if not isinstance(loaded, np.ndarray):  # an .npz archive
        loaded.close()
        raise InputError(f"{p} is an .npz archive, not one array; save the windows with numpy.save.")
    return loaded


def _check_out_folder(out: str) -> None:
    """InputError unless the folder ``out`` is to be written in exists.

    A typo in ``--out`` should not leave a tree of new folders behind: the folder is the
    operator's to create.
    """
    folder = Path(out).parent
    if not folder.exists():
        raise InputError(f"the folder {folder} of --out {out} does not exist; create it first "
                         f"(mkdir -p {shlex.quote(str(folder))}) or give another --out.")
    if not folder.is_dir():
        raise InputError(f"--out {out}: {folder} is not a folder.")
    if Path(out).is_dir():
        raise InputError(f"{out} is a folder; give the path of the file to write in it.")


def cmd_export(args: argparse.Namespace) -> int:
    _check_out_folder(args.out)  # before the export's work
    model = load_package(args.model)
    if args.format == "onnx":
        from models.onnx_export import export_onnx

        data = export_onnx(model)
    else:
        from models.tflite_export import export_tflite

        calibration = None
        if args.calibration:
            from models.model import check_input

            calibration = check_input(_load_windows(args.calibration), model.spec, args.calibration)
        elif args.format == "tflite-int8":
            print("note: calibrating int8 on synthetic windows; pass --calibration X.npy with real windows "
                  "for better accuracy", file=sys.stderr)
        data = export_tflite(model, int8=args.format == "tflite-int8", calibration=calibration)
    write_atomic(args.out, data)
    print(f"wrote {args.out}: {args.format}, {len(data)} bytes")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    predictor = open_model(args.model, args.backend)
    x = _load_windows(args.input)
    out = predictor.predict(x)
    spec: ModelSpec | None = predictor.spec
    result: dict[str, Any] = {"predictions": out.tolist()}
    if out.ndim == 2:
        names = list(spec.classes) if spec is not None else [str(i) for i in range(out.shape[1])]
        result["labels"] = [names[i] for i in out.argmax(axis=1)]
    if args.json:
        print(json.dumps(result))
        return 0
    for i, pred in enumerate(out):
        if out.ndim == 2:
            print(f"{i}\t{result['labels'][i]}\t{float(pred.max()):.3f}")
        else:
            print(f"{i}\t{float(pred):.1f} BPM" if spec is None or spec.task == "heart-rate" else f"{i}\t{pred}")
    return 0


def _explain_target(text: str | None, spec: ModelSpec | None) -> int | None:
    """``--target``: a class name of the model, or a class index."""
    if text is None:
        return None
    if spec is not None and not spec.is_classifier:
        raise InputError("a heart-rate model has one output (BPM) to explain; drop --target.")
    if text.isascii() and text.isdigit():
        return int(text)
    classes = list(spec.classes) if spec is not None else []
    if text not in classes:
        known = f"one of {', '.join(classes)} or" if classes else ""
        raise InputError(f"--target {text!r} is not a class of this model; give {known} a class index.")
    return classes.index(text)


def cmd_explain(args: argparse.Namespace) -> int:
    from models.attribution import default_span, explain

    path = Path(args.model)
    if path.suffix.lower() in (".onnx", ".tflite"):
        if args.method != "occlusion":
            raise InputError(f"{path} is an exported {path.suffix} file: only --method occlusion works on it (the "
                             "gradient methods need the model package, .safetensors).")
        source: Any = open_model(path)
    else:
        source = load_package(path)
    spec: ModelSpec | None = source.spec
    x = _load_windows(args.input)
    if x.ndim == 2:  # one window, as predict takes it
        x = x[None]
    if args.plot:
        _check_out_folder(args.plot)
    explanation = explain(source, x, args.method, _explain_target(args.target, spec), args.steps)
    if args.plot:
        from models.explanation_plot import plot_explanation

        shown = plot_explanation(explanation, x, spec, args.plot)
        print(f"wrote {args.plot}: {shown} of {len(x)} window(s)", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(explanation.to_json()))
        return 0
    regressor = spec is not None and not spec.is_classifier
    names = list(spec.classes) if spec is not None and spec.classes else []
    rate = spec.sampling_rate_hz if spec is not None else None
    span = default_span(x.shape[2])
    print(f"{explanation.method}: what moved each window's {'BPM' if regressor else 'class probability'}, "
          f"from the zero baseline")
    for i in range(len(x)):
        target = int(explanation.targets[i])
        label = "BPM" if regressor else (names[target] if target < len(names) else f"class {target}")
        ch, start, stop, value = explanation.strongest(i, span)
        when = (f"{start / rate:.2f}-{stop / rate:.2f} s" if rate else f"samples {start}-{stop}")
        print(f"{i}\t{label}\t{explanation.outputs[i]:.3f} (baseline {explanation.baseline_outputs[i]:.3f})"
              f"\tmost: {explanation.channels[ch]} {when} ({value:+.3f})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = load_package(args.model)
    spec = model.spec
    info = {
        "task": spec.task,
        "version": model.version,
        "channels": list(spec.channels),
        "window": spec.window,
        "sampling_rate_hz": spec.sampling_rate_hz,
        "classes": list(spec.classes),
        "parameters": model.num_parameters(),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"task        {info['task']}\nversion     {info['version']}\n"
          f"input       {', '.join(spec.channels)} x {spec.window} samples at {spec.sampling_rate_hz:g} Hz\n"
          f"classes     {', '.join(spec.classes) if spec.classes else '(regression: BPM)'}\n"
          f"parameters  {info['parameters']}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def add_commands(sub: Any) -> None:
    """Register init, export, predict and info on an argparse sub-parser set."""
    p = sub.add_parser("init", help="write a fresh model package")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, help="path of the package to write (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", nargs="+", help="input channel names (space- or comma-separated)")
    p.add_argument("--window", type=_positive_int, help="window length in samples")
    p.add_argument("--classes", type=_csv, help="class names, comma-separated (activity)")
    p.add_argument("--sampling-rate", type=float, help="sampling rate of the input in Hz")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("export", help="export a package to ONNX or TFLite")
    p.add_argument("--model", required=True, help="model package")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True)
    p.add_argument("--calibration", help="windows (.npy, (n, channels, time)) that calibrate int8")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="run a model on windows from a .npy file")
    p.add_argument("--model", required=True, help="model package, .onnx or .tflite file")
    p.add_argument("--input", required=True, help=".npy array of windows (n, channels, time)")
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="attribute a model's output to its input samples (docs/explanations.md)")
    p.add_argument("--model", required=True, help="model package (.onnx or .tflite: occlusion only)")
    p.add_argument("--input", required=True, help=".npy array of windows (n, channels, time)")
    p.add_argument("--method", choices=("integrated-gradients", "gradient", "occlusion"),
                   default="integrated-gradients")
    p.add_argument("--steps", type=_positive_int, default=32, help="integrated gradients' path steps")
    p.add_argument("--target", help="class to explain, by name or index (default: each window's predicted class)")
    p.add_argument("--json", action="store_true", help="print method, channels, targets, outputs, "
                                                       "baseline_outputs and attributions as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw each window's channels over their attributions")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("info", help="describe a model package")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

