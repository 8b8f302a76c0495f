"""The wire contract: what the edge and the hub both speak.

Topics, signed messages (model, update, task, receipt), the update codec, ledger entries,
identities and the SecAgg+ math (:mod:`models.protocol.secagg`). Nothing here opens a
socket: the MQTT session lives in :mod:`models.transport`, and the broker launcher for
laptops and tests in :mod:`wearfl.broker`.
"""

from models.protocol.codec import SCHEMES, CodecConfig, CodecError, UpdateCodec
from models.protocol.identity import load_keyring, load_or_create_key, public_hex
from models.protocol.messages import (
    MAX_JSON_BYTES,
    MAX_MODEL_BYTES,
    REJECT_REASONS,
    ModelMessage,
    Receipt,
    Task,
    UpdateMeta,
    build_model,
    build_update,
    model_hash,
    parse_json,
    parse_model,
    parse_update_meta,
)
from models.protocol.signed import SignedMessage, SigningError, sign_tensors, verify_and_parse
from models.protocol.topics import Topics, check_name

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_MODEL_BYTES",
    "REJECT_REASONS",
    "SCHEMES",
    "CodecConfig",
    "CodecError",
    "ModelMessage",
    "Receipt",
    "SignedMessage",
    "SigningError",
    "Task",
    "Topics",
    "UpdateCodec",
    "UpdateMeta",
    "build_model",
    "build_update",
    "check_name",
    "load_keyring",
    "load_or_create_key",
    "model_hash",
    "parse_json",
    "parse_model",
    "parse_update_meta",
    "public_hex",
    "sign_tensors",
    "verify_and_parse",
]
