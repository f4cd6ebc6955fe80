"""llama.cpp's RPC backend: layers, and so their KV cache, on ggml-rpc-server processes on this machine or others.

What llama.cpp's `--rpc HOST:PORT[,HOST:PORT]` does (common/arg.cpp, add_rpc_devices): each server is added
through the RPC backend's `ggml_backend_rpc_add_server` (a proc address of the "RPC" registry), and its devices
come first in the model's device list, before the local GPUs (llama.cpp's default order, src/llama.cpp), so that
--n-gpu-layers puts layers on them by llama.cpp's own rules (the last layers offloaded, split over the devices by
their free memory). One difference: llama.cpp's CLI registers the servers for the whole process; here they go into
one model's `devices` only, so that a later model in the same process without rpc stays on this machine.

ggml's RPC client aborts the process when it cannot connect to a server or the handshake fails, so every server is
checked from Python first (a connection, and llama.cpp's HELLO with its protocol version); a bad one is one
RpcError. A server serves one client at a time: a second process connecting to it waits until the first is done.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from typing import Dict, List, Sequence, Union

from ._cffi import ggml, ggml_ffi
from ._lib import rpc_server_path

# ggml/include/ggml-rpc.h and ggml-rpc.cpp at llama.cpp 0c1e570: the HELLO command and the protocol version this
# client speaks (a server of another major version, or a newer minor one, is refused by the client)
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
_RPC_CMD_HELLO = 14
_RPC_CONN_CAPS = 24
_HELLO_RSP_BYTES = 4 + _RPC_CONN_CAPS

# enum ggml_backend_dev_type
_DEV_CPU, _DEV_GPU, _DEV_IGPU = 0, 1, 2

CHECK_TIMEOUT_S = 5.0

_lock = threading.Lock()
_added: Dict[str, object] = {}  # endpoint -> its ggml_backend_reg_t (ggml keeps them for the process)


class RpcError(ValueError):
    """An RPC server list that cannot be used: malformed, a server that cannot be reached or is not llama.cpp's
    ggml-rpc-server of this protocol version, or a build without the RPC backend. Nothing was loaded."""


def parse_servers(servers: Union[str, Sequence[str]]) -> List[str]:
    """'HOST:PORT[,HOST:PORT...]' (or a list of 'HOST:PORT') as endpoints, each once; RpcError if malformed."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out: List[str] = []
    for item in items:
        if not isinstance(item, str):
            raise RpcError(f"an RPC server is HOST:PORT, got {item!r}")
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port:
            raise RpcError(f"an RPC server is HOST:PORT, got {item!r}")
        if ":" in host or host.startswith("["):
            raise RpcError(f"{item!r}: llama.cpp's RPC client takes a host name or an IPv4 address (HOST:PORT), "
                           "not an IPv6 address")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise RpcError(f"{item!r}: the port must be a number from 1 to 65535")
        endpoint = f"{host}:{int(port)}"
        if endpoint in out:
            raise RpcError(f"the RPC server {endpoint} is listed twice")
        out.append(endpoint)
    if not out:
        raise RpcError("no RPC server given (HOST:PORT[,HOST:PORT...])")
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def check_server(endpoint: str, timeout: float = CHECK_TIMEOUT_S, handshake: bool = True) -> None:
    """Connect to a ggml-rpc-server and, with handshake, exchange llama.cpp's HELLO and check its protocol
    version; RpcError if any of it fails. The connection is closed again (the server then takes the next client)."""
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except socket.timeout:
        raise RpcError(f"cannot reach the RPC server {endpoint}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise RpcError(f"cannot reach the RPC server {endpoint}: {err.strerror or err} (is ggml-rpc-server "
                       f"running there? python -m asrkf_gguf rpc-server --host HOST --port {port})") from None
    with sock:
        if not handshake:
            return
        try:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _RPC_CONN_CAPS) + bytes(_RPC_CONN_CAPS))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != _HELLO_RSP_BYTES:
                raise RpcError(f"{endpoint} does not answer as llama.cpp's ggml-rpc-server of protocol "
                               f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR} does")
            major, minor, patch = _recv_exact(sock, size)[:3]
        except socket.timeout:
            raise RpcError(f"the RPC server {endpoint} did not answer the handshake within {timeout:g} s (a "
                           "ggml-rpc-server serves one client at a time: is another process using it?)") from None
        except (OSError, ConnectionError) as err:
            raise RpcError(f"the RPC server {endpoint} failed the handshake: {err}") from None
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise RpcError(f"the RPC server {endpoint} speaks protocol {major}.{minor}.{patch}, this client "
                       f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}: run the ggml-rpc-server of this package "
                       "(python -m asrkf_gguf rpc-server) there")


def supported() -> bool:
    """Whether this build has ggml's RPC backend."""
    return bool(ggml.ggml_backend_reg_by_name(b"RPC"))


def server_devices(endpoint: str, timeout: float = CHECK_TIMEOUT_S) -> list:
    """The devices (ggml_backend_dev_t) of one server, added to ggml's RPC backend once per process."""
    with _lock:
        reg = _added.get(endpoint)
        if reg is None:
            rpc = ggml.ggml_backend_reg_by_name(b"RPC")
            if not rpc:
                raise RpcError("this build of asrkf-gguf has no RPC backend (built with -DASRKF_RPC=OFF)")
            check_server(endpoint, timeout)
            add = ggml.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server")
            if not add:
                raise RpcError("the RPC backend of this build has no ggml_backend_rpc_add_server")
            add = ggml_ffi.cast("ggml_backend_reg_t (*)(const char *)", add)
            reg = add(endpoint.encode())
            if not reg:
                raise RpcError(f"the RPC server {endpoint} has no devices")
            _added[endpoint] = reg
        else:
            # this process may be connected to it already (a server takes one client at a time: no handshake)
            check_server(endpoint, timeout, handshake=False)
        return [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]


def _is_rpc(dev) -> bool:
    reg = ggml.ggml_backend_dev_backend_reg(dev)
    return bool(reg) and ggml_ffi.string(ggml.ggml_backend_reg_name(reg)).decode().startswith("RPC")


def local_gpus() -> list:
    """The local devices llama.cpp offloads layers to by default: its GPUs, or its integrated GPUs when it has no
    discrete one (src/llama.cpp's default device selection, without its de-duplication of a GPU that two backends
    both expose: this package builds one GPU backend)."""
    devs = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    devs = [d for d in devs if not _is_rpc(d)]
    gpus = [d for d in devs if ggml.ggml_backend_dev_type(d) == _DEV_GPU]
    return gpus or [d for d in devs if ggml.ggml_backend_dev_type(d) == _DEV_IGPU]


def device_name(dev) -> str:
    return ggml_ffi.string(ggml.ggml_backend_dev_name(dev)).decode()


def device_description(dev) -> str:
    return ggml_ffi.string(ggml.ggml_backend_dev_description(dev)).decode()


class ModelDevices:
    """llama_model_params.devices for a model on these RPC servers and the local GPUs: a NULL-terminated array of
    ggml_backend_dev_t that must stay alive while the model loads (`pointer`); `names` are llama.cpp's device names
    (RPC0, RPC1, ..., CUDA0, ...) in that order."""

    def __init__(self, servers: Union[str, Sequence[str]], timeout: float = CHECK_TIMEOUT_S):
        self.endpoints = parse_servers(servers)
        devs = [d for e in self.endpoints for d in server_devices(e, timeout)] + local_gpus()
        self.names = [device_name(d) for d in devs]
        self._array = (ctypes.c_void_p * (len(devs) + 1))(
            *[int(ggml_ffi.cast("uintptr_t", d)) for d in devs], None)

    @property
    def pointer(self) -> int:
        return ctypes.addressof(self._array)


def has_local_gpu() -> bool:
    return bool(local_gpus())


def server_command(args: Sequence[str] = ()) -> List[str]:
    """The command line of this package's ggml-rpc-server (llama.cpp's flags: -H/--host, -p/--port, -t/--threads,
    -d/--device, -c/--cache); RpcError when the build has none."""
    path = rpc_server_path()
    if not path.exists():
        raise RpcError(f"ggml-rpc-server is not installed ({path}): the package was built without the RPC backend "
                       "(-DASRKF_RPC=OFF) or with a llama.cpp source lacking tools/rpc")
    if not os.access(path, os.X_OK):
        raise RpcError(f"{path} is not executable")
    return [str(path), *args]
