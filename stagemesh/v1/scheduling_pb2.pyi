from stagemesh.v1 import gateway_pb2 as _gateway_pb2
from stagemesh.v1 import sampling_pb2 as _sampling_pb2
from stagemesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Submission(_message.Message):
    __slots__ = ("handle", "request_id", "prompt_token_ids", "params", "resume", "known_token_ids")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    KNOWN_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    handle: int
    request_id: str
    prompt_token_ids: _tensor_pb2.Tensor
    params: _sampling_pb2.SamplingParams
    resume: bool
    known_token_ids: _tensor_pb2.Tensor
    def __init__(self, handle: _Optional[int] = ..., request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., params: _Optional[_Union[_sampling_pb2.SamplingParams, _Mapping]] = ..., resume: _Optional[bool] = ..., known_token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class FrontendBatch(_message.Message):
    __slots__ = ("frontend", "submit", "cancel", "pid", "spare")
    FRONTEND_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SPARE_FIELD_NUMBER: _ClassVar[int]
    frontend: str
    submit: _containers.RepeatedCompositeFieldContainer[Submission]
    cancel: _containers.RepeatedScalarFieldContainer[int]
    pid: int
    spare: bool
    def __init__(self, frontend: _Optional[str] = ..., submit: _Optional[_Iterable[_Union[Submission, _Mapping]]] = ..., cancel: _Optional[_Iterable[int]] = ..., pid: _Optional[int] = ..., spare: _Optional[bool] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("handle", "error")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    handle: int
    error: _tensor_pb2.Error
    def __init__(self, handle: _Optional[int] = ..., error: _Optional[_Union[_tensor_pb2.Error, _Mapping]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("handles", "token_ids", "finished", "errors", "logprobs")
    class FinishedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    class LogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _sampling_pb2.TokenLogprobs
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_sampling_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    handles: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    finished: _containers.ScalarMap[int, str]
    errors: _containers.RepeatedCompositeFieldContainer[RequestError]
    logprobs: _containers.MessageMap[int, _sampling_pb2.TokenLogprobs]
    def __init__(self, handles: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., finished: _Optional[_Mapping[int, str]] = ..., errors: _Optional[_Iterable[_Union[RequestError, _Mapping]]] = ..., logprobs: _Optional[_Mapping[int, _sampling_pb2.TokenLogprobs]] = ...) -> None: ...
