"""Type stub for the compiled extension ``membrain._native`` (csrc/bindings/*.cpp).

Keep in step with the bindings: each section names the file that defines it. Names registered
only in some builds (``gather_cuda``, ``scatter_cuda``, ``cuda_memcpy`` with CUDA;
``UcxConnection`` with UCX) are declared unconditionally; callers test ``hasattr`` first.
"""

from collections.abc import Sequence
from typing import Any, TypeAlias, TypedDict, type_check_only

import numpy.typing as npt
from typing_extensions import Buffer, Self

# Objects the bindings read through the buffer protocol. numpy declares ``__buffer__`` on its
# arrays only for Python >= 3.12, so arrays are listed explicitly for older targets.
_BufferLike: TypeAlias = Buffer | npt.NDArray[Any]
# Keys: bytes, str (UTF-8) or any buffer (connection_binding.h: take_keys).
_Key: TypeAlias = bytes | str | Buffer
# Block ids: anything numpy converts to a C-contiguous int64 array (layout_args.h: IdArray).
_BlockIds: TypeAlias = npt.ArrayLike

# ---------------------------------------------------------------- info_bindings.cpp

@type_check_only
class _NativeInfo(TypedDict):
    version: str
    cuda_compiled: bool
    cuda_devices: int
    cuda_device_names: list[str]
    ucx: bool

def native_info() -> _NativeInfo:
    """Build and runtime facts: version, cuda_compiled, cuda_devices, cuda_device_names, ucx."""

# ---------------------------------------------------------------- checksum_bindings.cpp

def checksum64(data: _BufferLike, seed: int = 0) -> int:
    """XXH3-64 of a contiguous buffer (GIL released while hashing)."""

def checksum64_ptr(ptr: int, nbytes: int, seed: int = 0) -> int:
    """XXH3-64 of host memory at a raw address (for torch tensors via data_ptr())."""

def _checksum64_all_paths(data: bytes, seed: int = 0) -> dict[str, int]:
    """Test hook: the XXH3-64 of `data` from each implementation usable on this CPU, by name."""

# ---------------------------------------------------------------- ops_bindings.cpp

def gather_cpu(
    layer_ptrs: Sequence[int],
    num_blocks: int,
    page_bytes: int,
    block_stride: int,
    block_ids: _BlockIds,
    out_ptr: int,
    out_bytes: int,
    *,
    sub_count: int = 1,
    sub_stride: int = 0,
    run_count: int = 1,
    run_stride: int = 0,
    max_threads: int = 0,
) -> None: ...
def scatter_cpu(
    src_ptr: int,
    src_bytes: int,
    layer_ptrs: Sequence[int],
    num_blocks: int,
    page_bytes: int,
    block_stride: int,
    block_ids: _BlockIds,
    *,
    sub_count: int = 1,
    sub_stride: int = 0,
    run_count: int = 1,
    run_stride: int = 0,
    max_threads: int = 0,
) -> None: ...
def describe_paged_layout(
    layer_ptrs: Sequence[int],
    num_blocks: int,
    page_bytes: int,
    block_stride: int,
    sub_count: int = 1,
    sub_stride: int = 0,
    run_count: int = 1,
    run_stride: int = 0,
) -> dict[str, int | bool]:
    """Validates a run description as gather/scatter do; returns it merged into the fewest runs."""

def memcpy_cpu(dst_ptr: int, src_ptr: int, nbytes: int, streaming: bool = False) -> None:
    """Contiguous copy on the gather thread pool (the benchmark's limit)."""

def set_num_threads(n: int) -> None:
    """Threads used by CPU gather/scatter; 0 restores the default."""

def get_num_threads() -> int: ...

# ---------------------------------------------------------------- cuda_ops_bindings.cpp

cuda_default_host_mode: str
"""'mapped' or 'staged' with CUDA compiled in, else 'none'."""

def gather_cuda(
    layer_ptrs: Sequence[int],
    num_blocks: int,
    page_bytes: int,
    block_stride: int,
    block_ids: _BlockIds,
    out_ptr: int,
    out_bytes: int,
    device: int,
    stream: int,
    mode: str = "auto",
    *,
    sub_count: int = 1,
    sub_stride: int = 0,
    run_count: int = 1,
    run_stride: int = 0,
) -> None:
    """Enqueues one gather kernel on `stream` (cudaStream_t as int). CUDA builds only."""

def scatter_cuda(
    src_ptr: int,
    src_bytes: int,
    layer_ptrs: Sequence[int],
    num_blocks: int,
    page_bytes: int,
    block_stride: int,
    block_ids: _BlockIds,
    device: int,
    stream: int,
    mode: str = "auto",
    *,
    sub_count: int = 1,
    sub_stride: int = 0,
    run_count: int = 1,
    run_stride: int = 0,
) -> None:
    """The inverse of gather_cuda; duplicate ids: the last occurrence wins. CUDA builds only."""

def cuda_memcpy(dst_ptr: int, src_ptr: int, nbytes: int, device: int, stream: int) -> None:
    """cudaMemcpyAsync(cudaMemcpyDefault) on `stream`. CUDA builds only."""

# ---------------------------------------------------------------- pool_bindings.cpp

class Slot:
    """One slot of a HostPool; supports the buffer protocol without copying."""

    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def ptr(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def released(self) -> bool: ...
    @property
    def refcount(self) -> int: ...
    def share(self) -> Slot: ...
    def release(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *args: object) -> None: ...

class HostPool:
    """A pinned (when CUDA is present) host region carved into equal slots."""

    def __init__(
        self, slot_bytes: int, num_slots: int, pin: bool = True, huge_pages: bool = True
    ) -> None: ...
    def acquire(self) -> Slot | None:
        """A free Slot, or None when the pool is exhausted."""

    def acquire_many(self, n: int) -> list[Slot] | None:
        """n free Slots, or None (and nothing taken) when fewer are free."""

    def prefault(self, first: int, count: int) -> int:
        """Backs slots [first, first + count) with memory now, contents unchanged (page faults
        taken here, not on the first copy into them); returns the bytes populated."""

    @property
    def slot_bytes(self) -> int: ...
    @property
    def num_slots(self) -> int: ...
    @property
    def free_slots(self) -> int: ...
    @property
    def region_bytes(self) -> int: ...
    @property
    def pinned(self) -> bool: ...
    @property
    def huge_pages(self) -> bool: ...

# ---------------------------------------------------------------- transport_bindings.cpp

class TransportError(ConnectionError): ...

STATUS_OK: int
STATUS_NOT_FOUND: int
STATUS_BAD_REQUEST: int
STATUS_UNAUTHORIZED: int
STATUS_TOO_LARGE: int
STATUS_NO_SPACE: int
STATUS_CHECKSUM_MISMATCH: int
STATUS_INTERNAL: int
STATUS_UNSUPPORTED_VERSION: int

def status_name(arg0: int, /) -> str: ...

# connection_binding.h: the API shared by Connection and UcxConnection (no such base at runtime).
@type_check_only
class _ConnectionBase:
    def __init__(
        self,
        host: str,
        port: int,
        namespace: str = "default",
        auth_token: str | None = None,
        connect_timeout_ms: int = 2000,
        timeout_ms: int = 5000,
    ) -> None: ...
    def put(
        self, keys: Sequence[_Key], values: Sequence[_BufferLike], timeout_ms: int | None = None
    ) -> list[int]:
        """Store values. Returns one status per key (STATUS_*)."""

    def get_into(
        self, keys: Sequence[_Key], buffers: Sequence[_BufferLike], timeout_ms: int | None = None
    ) -> list[int]:
        """Read each value into its writable buffer. Returns one status per key (STATUS_*)."""

    def get(self, keys: Sequence[_Key], timeout_ms: int | None = None) -> list[bytes | None]:
        """Values as bytes, None for misses and bad checksums."""

    def exists(self, keys: Sequence[_Key], timeout_ms: int | None = None) -> list[int]:
        """Statuses (OK or NOT_FOUND) per key."""

    def lookup_prefix(self, keys: Sequence[_Key], timeout_ms: int | None = None) -> int:
        """Number of leading keys that are all present."""

    def delete(self, keys: Sequence[_Key], timeout_ms: int | None = None) -> int:
        """Number of keys deleted."""

    def stats_json(self, timeout_ms: int | None = None) -> str: ...
    def stats(self, timeout_ms: int | None = None) -> dict[str, Any]: ...
    def ping(self, timeout_ms: int | None = None) -> float:
        """Round trip; returns seconds taken."""

    def close(self) -> None: ...
    @property
    def broken(self) -> bool: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def timeout_ms(self) -> int: ...
    @property
    def limits(self) -> dict[str, int]: ...

class Connection(_ConnectionBase):
    """One TCP connection to a Membrain server (protocol v1)."""

    def timings(self) -> dict[str, float]:
        """Cumulative seconds per phase of PUT/GET frames (checksum, send, wait, recv, verify)
        and the number of ``frames``."""

    def reset_timings(self) -> None: ...

# ---------------------------------------------------------------- ucx_bindings.cpp (UCX builds only)

class UcxConnection(_ConnectionBase):
    """One UCX (UCP active messages) connection; same API and errors as Connection."""

    def _raw_call(self, am_header: bytes, data: bytes, timeout_ms: int | None = None) -> bytes: ...
    @property
    def am_header_cap(self) -> int: ...
    @property
    def transport_info(self) -> str: ...

# ---------------------------------------------------------------- server_bindings.cpp

class Server:
    """Membrain data-plane server (epoll workers in C++ threads)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9201,
        capacity: int = 268435456,
        threads: int = 2,
        max_connections: int = 1024,
        idle_timeout: float = 60.0,
        ttl: float = 0.0,
        auth_token: str = "",
        slab_bytes: int = 0,
        socket_buffer_bytes: int = 4194304,
        max_batch: int = 1024,
        max_key_len: int = 128,
        max_value_bytes: int = 268435456,
        max_payload_bytes: int = 1073741824,
        prefault: bool = True,
        ucx_port: int = -1,
        max_pending_put_bytes: int = 0,
        max_pending_put_bytes_per_connection: int = 0,
        max_reply_bytes_per_connection: int = 1073741824,
        auth_timeout: float = 10.0,
        tokens: Sequence[tuple[str, Sequence[str]]] = (),
        eviction_policy: str = "slru",
        namespace_priority: Sequence[tuple[str, int]] = (),
    ) -> None: ...
    def start(self) -> int:
        """Bind, listen and start the workers; returns the bound port."""

    def stop(self, drain_timeout: float = 5.0) -> None: ...
    @property
    def port(self) -> int: ...
    @property
    def ucx_port(self) -> int:
        """UCX listener port (0 when UCX is off)."""

    @property
    def running(self) -> bool: ...
    @property
    def max_value_bytes(self) -> int: ...
    @property
    def max_connections(self) -> int:
        """--max-connections after fitting it to RLIMIT_NOFILE at start()."""

    @property
    def requested_max_connections(self) -> int: ...
    @property
    def fd_limit(self) -> int:
        """RLIMIT_NOFILE soft limit after start()."""

    @property
    def fd_limit_hard(self) -> int: ...
    @property
    def max_pending_put_bytes(self) -> int: ...
    @property
    def max_pending_put_bytes_per_connection(self) -> int: ...
    def namespace_stats(self) -> dict[str, dict[str, Any]]:
        """Per-namespace figures of the namespaces holding objects."""

    def stats(self) -> dict[str, Any]: ...
    def stats_json(self) -> str: ...

DEFAULT_EVICTION_POLICY: str

def eviction_policies() -> list[str]: ...

class PolicyIndex:
    """Keys ordered by one of the server's eviction policies, with a capacity in keys."""

    def __init__(self, policy: str, capacity: int, admission: str = "all") -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: bytes) -> bool: ...
    @property
    def capacity(self) -> int: ...
    @property
    def policy(self) -> str: ...
    @property
    def evictions(self) -> int: ...
    @property
    def evicted_probation(self) -> int: ...
    @property
    def evicted_protected(self) -> int: ...
    @property
    def evicted_priority(self) -> int: ...
    def prefix_hits(self, keys: Sequence[bytes]) -> int: ...
    def touch(self, keys: Sequence[bytes]) -> None: ...
    def admit(
        self, keys: Sequence[bytes], protect: Sequence[bytes] = (), priority: int = 0
    ) -> tuple[list[bytes], list[bytes]]: ...
    def request(self, keys: Sequence[bytes], priority: int = 0) -> int: ...
    def replay_ids(self, requests: Sequence[Sequence[int]], priorities: Sequence[int] = ()) -> list[int]: ...
    def discard(self, keys: Sequence[bytes]) -> None: ...
    def clear(self) -> None: ...
    def keys(self) -> list[bytes]: ...

# ---------------------------------------------------------------- redis_bindings.cpp

REDIS_TRAILER: int

def redis_read_gets(
    fd: int, buffers: Sequence[_BufferLike], timeout_ms: int
) -> tuple[list[bool], list[bytes], str, str]:
    """Reads len(buffers) Redis GET replies from socket fd (the GETs already sent), each value
    straight into its buffer, GIL released. Returns (hits, error replies, failure, detail):
    failure is '' or 'timed_out' / 'closed' / 'protocol', after which the connection must
    be dropped."""
