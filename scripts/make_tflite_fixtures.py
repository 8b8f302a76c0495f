"""Write exported ``.tflite`` models with inputs and reference outputs for an old-runtime check.

Run in the project's environment. ``scripts/check_tflite_runtime.py`` then loads the
same files with ``tflite-runtime`` 2.14 under ``numpy<2`` (the runtime on older
Raspberry Pi images), which does not import wearfl at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import Model, TrainConfig, default_spec, fit
from models.tflite_export import export_tflite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = []
    rng = np.random.default_rng(0)
    for task in ("activity", "heart-rate"):
        model = Model(default_spec(task), seed=1)
        x = rng.standard_normal((96, *model.spec.input_shape)).astype(np.float32)
        y = rng.integers(0, 6, 96) if model.spec.is_classifier else rng.uniform(50, 180, 96)
        fit(model, x, y, TrainConfig(epochs=1, seed=0))  # non-trivial BatchNorm statistics
        windows = x[:16]
        np.save(args.out / f"{task}-input.npy", windows)
        np.save(args.out / f"{task}-expected.npy", model.predict(windows))
        for variant, int8 in (("float", False), ("int8", True)):
            name = f"{task}-{variant}.tflite"
            (args.out / name).write_bytes(export_tflite(model, int8=int8, calibration=x if int8 else None))
            # float: the 1e-5 parity bound; int8: a few steps of the output scale.
            tol = {"float": 1e-5, "int8": 0.06 if task == "activity" else 3.0}[variant]
            manifest.append({"file": name, "input": f"{task}-input.npy", "expected": f"{task}-expected.npy",
                             "relative": variant == "float", "tolerance": tol})
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {len(manifest)} models to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
