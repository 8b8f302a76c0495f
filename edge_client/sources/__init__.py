"""Sensor sources: simulated wearers, UCI HAPT, wearfl recordings, and live devices.

``open_dataset("sim:0" | "hapt:DIR" | "recordings:DIR")`` opens a dataset;
``open_dataset("lsl:NAME" | "mqtt:TOPIC" | "follow:FILE.csv", live=True)`` a live device
(docs/devices.md), and :class:`~edge_client.sources.push.PushSource` takes samples from
Python code. Each source module is imported only when its form is used.
"""

from edge_client.sources.base import CHANNELS, UNKNOWN, Chunk, Dataset, Source
from edge_client.sources.datasets import SPEC_FORMS, open_dataset

__all__ = ["CHANNELS", "SPEC_FORMS", "UNKNOWN", "Chunk", "Dataset", "Source", "open_dataset"]
