from stagemesh.v1 import sampling_pb2 as _sampling_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "token_ids", "params", "resume_from")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    token_ids: TokenIds
    params: _sampling_pb2.SamplingParams
    resume_from: int
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., params: _Optional[_Union[_sampling_pb2.SamplingParams, _Mapping]] = ..., resume_from: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "index", "text", "finish_reason", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    index: int
    text: str
    finish_reason: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_sampling_pb2.TokenLogprobs]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., index: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_sampling_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChainStatus(_message.Message):
    __slots__ = ("id", "healthy", "num_stages", "requests_served", "requests_running", "requests_waiting")
    ID_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    id: int
    healthy: bool
    num_stages: int
    requests_served: int
    requests_running: int
    requests_waiting: int
    def __init__(self, id: _Optional[int] = ..., healthy: _Optional[bool] = ..., num_stages: _Optional[int] = ..., requests_served: _Optional[int] = ..., requests_running: _Optional[int] = ..., requests_waiting: _Optional[int] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("queue_depth", "running_sequences", "kv_blocks_used", "kv_blocks_total", "busy_fraction", "tokens_processed", "step_latency_p50_s", "step_latency_p99_s", "micro_batches_per_s", "tokens_per_s", "bubble_fraction", "bytes_sent", "expert_tokens")
    class ExpertTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    STEP_LATENCY_P50_S_FIELD_NUMBER: _ClassVar[int]
    STEP_LATENCY_P99_S_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BUBBLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    queue_depth: int
    running_sequences: int
    kv_blocks_used: int
    kv_blocks_total: int
    busy_fraction: float
    tokens_processed: int
    step_latency_p50_s: float
    step_latency_p99_s: float
    micro_batches_per_s: float
    tokens_per_s: float
    bubble_fraction: float
    bytes_sent: int
    expert_tokens: _containers.ScalarMap[str, int]
    def __init__(self, queue_depth: _Optional[int] = ..., running_sequences: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., busy_fraction: _Optional[float] = ..., tokens_processed: _Optional[int] = ..., step_latency_p50_s: _Optional[float] = ..., step_latency_p99_s: _Optional[float] = ..., micro_batches_per_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., bubble_fraction: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., expert_tokens: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ExpertIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("role", "chain", "stage", "layer_start", "layer_end", "experts", "address", "pid", "device", "healthy", "tp_size", "heartbeat_age_s", "load", "layer_experts", "mlp_only_start", "attn_only_end", "id")
    class LayerExpertsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: ExpertIds
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[ExpertIds, _Mapping]] = ...) -> None: ...
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LAYER_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MLP_ONLY_START_FIELD_NUMBER: _ClassVar[int]
    ATTN_ONLY_END_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    role: str
    chain: int
    stage: int
    layer_start: int
    layer_end: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    address: str
    pid: int
    device: str
    healthy: bool
    tp_size: int
    heartbeat_age_s: float
    load: WorkerLoad
    layer_experts: _containers.MessageMap[int, ExpertIds]
    mlp_only_start: bool
    attn_only_end: bool
    id: str
    def __init__(self, role: _Optional[str] = ..., chain: _Optional[int] = ..., stage: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., device: _Optional[str] = ..., healthy: _Optional[bool] = ..., tp_size: _Optional[int] = ..., heartbeat_age_s: _Optional[float] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., layer_experts: _Optional[_Mapping[int, ExpertIds]] = ..., mlp_only_start: _Optional[bool] = ..., attn_only_end: _Optional[bool] = ..., id: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("chains", "workers", "model", "version", "json")
    CHAINS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    chains: _containers.RepeatedCompositeFieldContainer[ChainStatus]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    model: str
    version: str
    json: str
    def __init__(self, chains: _Optional[_Iterable[_Union[ChainStatus, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...
