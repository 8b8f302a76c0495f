"""Run exported ``.tflite`` files on ``tflite-runtime`` and compare with saved numpy outputs.

Meant for a separate small environment with ``numpy<2`` and ``tflite-runtime`` (what
older Raspberry Pi images ship); imports nothing from wearfl. Exit 0 when every model
loads, resizes its batch, runs, and matches within its tolerance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tflite_runtime.interpreter import Interpreter


def run(path: Path, x: np.ndarray) -> np.ndarray:
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape), strict=False)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def main(folder: str) -> int:
    root = Path(folder)
    failures = 0
    for item in json.loads((root / "manifest.json").read_text()):
        x = np.load(root / item["input"])
        expected = np.load(root / item["expected"])
        got = run(root / item["file"], x)
        bound = item["tolerance"] * (np.maximum(1.0, np.abs(expected)) if item["relative"] else 1.0)
        worst = float(np.max(np.abs(got - expected) - bound)) if got.shape == expected.shape else float("inf")
        ok = worst <= 0
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {item['file']}: shape {got.shape}, "
              f"max |diff| {float(np.max(np.abs(got - expected))) if got.shape == expected.shape else 'n/a'}")
    print(f"tflite-runtime check: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
