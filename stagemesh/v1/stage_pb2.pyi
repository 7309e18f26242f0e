from stagemesh.v1 import sampling_pb2 as _sampling_pb2
from stagemesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StageRequest(_message.Message):
    __slots__ = ("step_id", "seq_ids", "starts", "lengths", "token_ids", "sample", "temperature", "top_k", "top_p", "seed", "index", "min_p", "logprobs", "top_logprobs", "free", "hidden", "epoch")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    starts: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _tensor_pb2.Tensor
    sample: _containers.RepeatedScalarFieldContainer[bool]
    temperature: _containers.RepeatedScalarFieldContainer[float]
    top_k: _containers.RepeatedScalarFieldContainer[int]
    top_p: _containers.RepeatedScalarFieldContainer[float]
    seed: _containers.RepeatedScalarFieldContainer[int]
    index: _containers.RepeatedScalarFieldContainer[int]
    min_p: _containers.RepeatedScalarFieldContainer[float]
    logprobs: _containers.RepeatedScalarFieldContainer[bool]
    top_logprobs: _containers.RepeatedScalarFieldContainer[int]
    free: _containers.RepeatedScalarFieldContainer[int]
    hidden: _tensor_pb2.Tensor
    epoch: int
    def __init__(self, step_id: _Optional[int] = ..., seq_ids: _Optional[_Iterable[int]] = ..., starts: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sample: _Optional[_Iterable[bool]] = ..., temperature: _Optional[_Iterable[float]] = ..., top_k: _Optional[_Iterable[int]] = ..., top_p: _Optional[_Iterable[float]] = ..., seed: _Optional[_Iterable[int]] = ..., index: _Optional[_Iterable[int]] = ..., min_p: _Optional[_Iterable[float]] = ..., logprobs: _Optional[_Iterable[bool]] = ..., top_logprobs: _Optional[_Iterable[int]] = ..., free: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class StageResponse(_message.Message):
    __slots__ = ("step_id", "seq_ids", "tokens", "error", "logprobs")
    class LogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _sampling_pb2.TokenLogprobs
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_sampling_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    error: _tensor_pb2.Error
    logprobs: _containers.MessageMap[int, _sampling_pb2.TokenLogprobs]
    def __init__(self, step_id: _Optional[int] = ..., seq_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ..., error: _Optional[_Union[_tensor_pb2.Error, _Mapping]] = ..., logprobs: _Optional[_Mapping[int, _sampling_pb2.TokenLogprobs]] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("role", "chain", "stage", "num_stages", "layer_start", "layer_end", "num_layers", "device", "tp_size", "dtype", "hidden_size", "num_kv_blocks", "block_size", "kv_blocks_used", "pid", "model", "mlp_only_start", "attn_only_end")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MLP_ONLY_START_FIELD_NUMBER: _ClassVar[int]
    ATTN_ONLY_END_FIELD_NUMBER: _ClassVar[int]
    role: str
    chain: int
    stage: int
    num_stages: int
    layer_start: int
    layer_end: int
    num_layers: int
    device: str
    tp_size: int
    dtype: str
    hidden_size: int
    num_kv_blocks: int
    block_size: int
    kv_blocks_used: int
    pid: int
    model: str
    mlp_only_start: bool
    attn_only_end: bool
    def __init__(self, role: _Optional[str] = ..., chain: _Optional[int] = ..., stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., device: _Optional[str] = ..., tp_size: _Optional[int] = ..., dtype: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., pid: _Optional[int] = ..., model: _Optional[str] = ..., mlp_only_start: _Optional[bool] = ..., attn_only_end: _Optional[bool] = ...) -> None: ...
