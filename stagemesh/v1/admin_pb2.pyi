from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InjectFaultRequest(_message.Message):
    __slots__ = ("fail", "stall", "drop", "clear")
    FAIL_FIELD_NUMBER: _ClassVar[int]
    STALL_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    fail: FailSteps
    stall: StallSteps
    drop: DropStreams
    clear: ClearFaults
    def __init__(self, fail: _Optional[_Union[FailSteps, _Mapping]] = ..., stall: _Optional[_Union[StallSteps, _Mapping]] = ..., drop: _Optional[_Union[DropStreams, _Mapping]] = ..., clear: _Optional[_Union[ClearFaults, _Mapping]] = ...) -> None: ...

class FailSteps(_message.Message):
    __slots__ = ("count", "code")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    count: int
    code: str
    def __init__(self, count: _Optional[int] = ..., code: _Optional[str] = ...) -> None: ...

class StallSteps(_message.Message):
    __slots__ = ("stall_s", "for_s")
    STALL_S_FIELD_NUMBER: _ClassVar[int]
    FOR_S_FIELD_NUMBER: _ClassVar[int]
    stall_s: float
    for_s: float
    def __init__(self, stall_s: _Optional[float] = ..., for_s: _Optional[float] = ...) -> None: ...

class DropStreams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearFaults(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InjectFaultResponse(_message.Message):
    __slots__ = ("worker", "detail")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    worker: str
    detail: str
    def __init__(self, worker: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...
