"""Sensor sources: simulated wearers, UCI HAPT, wearfl recordings, and a push source for live devices.

``open_dataset("sim:0" | "hapt:DIR" | "recordings:DIR")`` opens a dataset; each
source module is imported only when its form is used.
"""

from edge_client.sources.base import CHANNELS, UNKNOWN, Chunk, Dataset, Source
from edge_client.sources.datasets import SPEC_FORMS, open_dataset

__all__ = ["CHANNELS", "SPEC_FORMS", "UNKNOWN", "Chunk", "Dataset", "Source", "open_dataset"]
