from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_KIND_UNSPECIFIED: _ClassVar[MediaKind]
    MEDIA_KIND_IMAGE: _ClassVar[MediaKind]
    MEDIA_KIND_VIDEO: _ClassVar[MediaKind]

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_RGB24: _ClassVar[PixelFormat]
    PIXEL_FORMAT_YUV420P: _ClassVar[PixelFormat]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_ZSTD: _ClassVar[Compression]
    COMPRESSION_NONE: _ClassVar[Compression]
MEDIA_KIND_UNSPECIFIED: MediaKind
MEDIA_KIND_IMAGE: MediaKind
MEDIA_KIND_VIDEO: MediaKind
PIXEL_FORMAT_RGB24: PixelFormat
PIXEL_FORMAT_YUV420P: PixelFormat
COMPRESSION_ZSTD: Compression
COMPRESSION_NONE: Compression

class ProbeRequest(_message.Message):
    __slots__ = ("path", "preset", "resize")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    preset: str
    resize: str
    def __init__(self, path: _Optional[str] = ..., preset: _Optional[str] = ..., resize: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("path", "preset", "frame_start", "frame_stop", "compression", "pixel_format", "resize")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    FRAME_START_FIELD_NUMBER: _ClassVar[int]
    FRAME_STOP_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PIXEL_FORMAT_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    preset: str
    frame_start: int
    frame_stop: int
    compression: Compression
    pixel_format: PixelFormat
    resize: str
    def __init__(self, path: _Optional[str] = ..., preset: _Optional[str] = ..., frame_start: _Optional[int] = ..., frame_stop: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ..., pixel_format: _Optional[_Union[PixelFormat, str]] = ..., resize: _Optional[str] = ...) -> None: ...

class FramePlan(_message.Message):
    __slots__ = ("path", "kind", "source_width", "source_height", "source_fps", "duration_s", "num_source_frames", "frame_indices", "timestamps", "is_fast", "heights", "widths", "tokens")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FPS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    NUM_SOURCE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDICES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    IS_FAST_FIELD_NUMBER: _ClassVar[int]
    HEIGHTS_FIELD_NUMBER: _ClassVar[int]
    WIDTHS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    path: str
    kind: MediaKind
    source_width: int
    source_height: int
    source_fps: float
    duration_s: float
    num_source_frames: int
    frame_indices: _containers.RepeatedScalarFieldContainer[int]
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    is_fast: _containers.RepeatedScalarFieldContainer[bool]
    heights: _containers.RepeatedScalarFieldContainer[int]
    widths: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[str] = ..., kind: _Optional[_Union[MediaKind, str]] = ..., source_width: _Optional[int] = ..., source_height: _Optional[int] = ..., source_fps: _Optional[float] = ..., duration_s: _Optional[float] = ..., num_source_frames: _Optional[int] = ..., frame_indices: _Optional[_Iterable[int]] = ..., timestamps: _Optional[_Iterable[float]] = ..., is_fast: _Optional[_Iterable[bool]] = ..., heights: _Optional[_Iterable[int]] = ..., widths: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("plan", "preset", "resize")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    plan: FramePlan
    preset: str
    resize: str
    def __init__(self, plan: _Optional[_Union[FramePlan, _Mapping]] = ..., preset: _Optional[str] = ..., resize: _Optional[str] = ...) -> None: ...

class FrameInfo(_message.Message):
    __slots__ = ("height", "width", "channels", "timestamp_s", "is_fast", "grid_h", "grid_w", "tokens", "raw_size", "encoded_size", "compression", "pixel_format", "color_matrix", "full_range")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    IS_FAST_FIELD_NUMBER: _ClassVar[int]
    GRID_H_FIELD_NUMBER: _ClassVar[int]
    GRID_W_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODED_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PIXEL_FORMAT_FIELD_NUMBER: _ClassVar[int]
    COLOR_MATRIX_FIELD_NUMBER: _ClassVar[int]
    FULL_RANGE_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    timestamp_s: float
    is_fast: bool
    grid_h: int
    grid_w: int
    tokens: int
    raw_size: int
    encoded_size: int
    compression: Compression
    pixel_format: PixelFormat
    color_matrix: str
    full_range: bool
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., is_fast: _Optional[bool] = ..., grid_h: _Optional[int] = ..., grid_w: _Optional[int] = ..., tokens: _Optional[int] = ..., raw_size: _Optional[int] = ..., encoded_size: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ..., pixel_format: _Optional[_Union[PixelFormat, str]] = ..., color_matrix: _Optional[str] = ..., full_range: _Optional[bool] = ...) -> None: ...

class DecodeChunk(_message.Message):
    __slots__ = ("plan", "preset", "frame_start", "frame_stop", "resize", "frame", "info", "data", "frame_end")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    FRAME_START_FIELD_NUMBER: _ClassVar[int]
    FRAME_STOP_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FRAME_END_FIELD_NUMBER: _ClassVar[int]
    plan: FramePlan
    preset: str
    frame_start: int
    frame_stop: int
    resize: str
    frame: int
    info: FrameInfo
    data: bytes
    frame_end: bool
    def __init__(self, plan: _Optional[_Union[FramePlan, _Mapping]] = ..., preset: _Optional[str] = ..., frame_start: _Optional[int] = ..., frame_stop: _Optional[int] = ..., resize: _Optional[str] = ..., frame: _Optional[int] = ..., info: _Optional[_Union[FrameInfo, _Mapping]] = ..., data: _Optional[bytes] = ..., frame_end: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GpuStats(_message.Message):
    __slots__ = ("index", "name", "decoder_utilization_pct", "gpu_utilization_pct", "memory_utilization_pct", "memory_used_bytes", "memory_total_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DECODER_UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    decoder_utilization_pct: int
    gpu_utilization_pct: int
    memory_utilization_pct: int
    memory_used_bytes: int
    memory_total_bytes: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., decoder_utilization_pct: _Optional[int] = ..., gpu_utilization_pct: _Optional[int] = ..., memory_utilization_pct: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("uptime_s", "requests", "decode_requests", "probe_requests", "errors", "errors_by_code", "rejected", "bytes_in", "file_bytes_read", "raw_bytes_out", "wire_bytes_out", "frames_out", "decode_seconds", "compress_seconds", "worker_cpu_seconds", "in_flight", "max_in_flight", "workers", "plan_cache_hits", "plan_cache_misses", "serving", "gpu_available", "gpu_unavailable_reason", "gpus", "resize", "max_pixels", "max_path_bytes", "worker_memory_bytes")
    class ErrorsByCodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DECODE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROBE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_BY_CODE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OUT_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PLAN_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PLAN_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    GPU_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    GPU_UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PATH_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKER_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    uptime_s: float
    requests: int
    decode_requests: int
    probe_requests: int
    errors: int
    errors_by_code: _containers.ScalarMap[str, int]
    rejected: int
    bytes_in: int
    file_bytes_read: int
    raw_bytes_out: int
    wire_bytes_out: int
    frames_out: int
    decode_seconds: float
    compress_seconds: float
    worker_cpu_seconds: float
    in_flight: int
    max_in_flight: int
    workers: int
    plan_cache_hits: int
    plan_cache_misses: int
    serving: bool
    gpu_available: bool
    gpu_unavailable_reason: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuStats]
    resize: str
    max_pixels: int
    max_path_bytes: int
    worker_memory_bytes: int
    def __init__(self, uptime_s: _Optional[float] = ..., requests: _Optional[int] = ..., decode_requests: _Optional[int] = ..., probe_requests: _Optional[int] = ..., errors: _Optional[int] = ..., errors_by_code: _Optional[_Mapping[str, int]] = ..., rejected: _Optional[int] = ..., bytes_in: _Optional[int] = ..., file_bytes_read: _Optional[int] = ..., raw_bytes_out: _Optional[int] = ..., wire_bytes_out: _Optional[int] = ..., frames_out: _Optional[int] = ..., decode_seconds: _Optional[float] = ..., compress_seconds: _Optional[float] = ..., worker_cpu_seconds: _Optional[float] = ..., in_flight: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., workers: _Optional[int] = ..., plan_cache_hits: _Optional[int] = ..., plan_cache_misses: _Optional[int] = ..., serving: _Optional[bool] = ..., gpu_available: _Optional[bool] = ..., gpu_unavailable_reason: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuStats, _Mapping]]] = ..., resize: _Optional[str] = ..., max_pixels: _Optional[int] = ..., max_path_bytes: _Optional[int] = ..., worker_memory_bytes: _Optional[int] = ...) -> None: ...
