"""The shared core of the fabric: wire protocol, topics, codecs, the MQTT session, errors.

`master` and `node` build on this package; `esp32` shares only the wire format and the
prime test (`core.primality`, written in the subset of Python that MicroPython runs).
"""

from core.codec import CODECS, JSON, MSGPACK, decode, encode
from core.errors import (BrokerUnavailable, ConfigError, DecodeError, EncodeError, FabricError,
                         FabricTimeout, QueueFull, TaskError, TaskFailed)
from core.protocol import (DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, SCHEMA_VERSION, Control,
                           MasterStatus, Message, NodeReport, NodeStatus, OutcomeBatch, Query,
                           QueryReply, ResultBatch, Submission, SubmitReply, TaskBatch,
                           TaskOutcome, TaskResult, TaskSpec, decode_message)
from core.topics import DEFAULT_ROOT, Topics, validate_id
from core.url import BROKER_ENV, BrokerUrl, parse_broker_url

__all__ = [
    "CODECS", "JSON", "MSGPACK", "decode", "encode",
    "BrokerUnavailable", "ConfigError", "DecodeError", "EncodeError", "FabricError",
    "FabricTimeout", "QueueFull", "TaskError", "TaskFailed",
    "DEFAULT_PRIORITY", "MAX_PRIORITY", "MIN_PRIORITY", "SCHEMA_VERSION", "Control",
    "MasterStatus", "Message", "NodeReport", "NodeStatus", "OutcomeBatch", "Query", "QueryReply",
    "ResultBatch", "Submission", "SubmitReply", "TaskBatch", "TaskOutcome", "TaskResult",
    "TaskSpec", "decode_message",
    "DEFAULT_ROOT", "Topics", "validate_id",
    "BROKER_ENV", "BrokerUrl", "parse_broker_url",
]
