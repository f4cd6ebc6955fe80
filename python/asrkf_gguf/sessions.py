"""Session files and in-memory session blobs: one conversation of an Engine, restorable bit for bit.

Layout of a session (file or blob), all integers little-endian:

    b"ASRKFSES"              magic
    u32                      format version (FORMAT_VERSION)
    u32                      length of the header
    header                   UTF-8 JSON: library and llama.cpp versions, model fingerprint, cache geometry (KV
                             types, context, device budget, cells, flash attention), the chat (messages, token
                             history), the controller's scalars (step, entropy monitor, statistics), and the
                             sections: [{name, offset, length}] relative to the end of the header
    sections                 "kv": asrkf_kv_session_save's buffer (resident cells with their frozen flags, the host
                             tier's offloaded rows with their checksums, per-token checksums; native/src/
                             llama-kv-freeze-session.cpp); "table": the controller's per-token arrays (.npy each,
                             concatenated as one .npz without pickles)
    32 bytes                 sha256 of everything before (a file); all zero in a blob kept in memory by the Engine
                             that wrote it (the rows still carry their checksums, which the native load verifies)

The model is identified by a fingerprint, not a full sha256 (reading a multi-GB model at every save and load costs
seconds): sha256 over the file size, its first 16 MiB (the GGUF header, metadata and tensor table), 64 blocks of
64 KiB spread evenly over the file, and its last MiB. See model_fingerprint().
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from typing import Callable, Dict, Tuple

import numpy as np

from .errors import SessionError

MAGIC = b"ASRKFSES"
FORMAT_VERSION = 1
LLAMA_CPP_COMMIT = "0c1e570"  # the llama.cpp this library patches (llama-cpp-python 0.3.36)
FINGERPRINT_METHOD = "sha256(size, first 16 MiB, 64 x 64 KiB evenly spaced, last 1 MiB)"

_DIGEST = 32
_NO_DIGEST = bytes(_DIGEST)


def model_fingerprint(path: str) -> str:
    """A stable fingerprint of a model file that reads about 21 MiB of it whatever its size (FINGERPRINT_METHOD)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    h.update(b"asrkf-model-fingerprint-1")
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(16 << 20))
        for i in range(64):
            f.seek(size * i // 64)
            h.update(f.read(64 << 10))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def pack_arrays(arrays: Dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> Dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as err:  # a damaged archive: zipfile, ValueError, ...
        raise SessionError(f"the session's token table cannot be read: {err}") from None


def encode(header: dict, sections: Dict[str, bytes], *, digest: bool = True) -> np.ndarray:
    """One session: header JSON (the section table is added here) and the sections, with a sha256 when digest."""
    def fill(name, view):
        view[:] = sections[name]

    return encode_into(header, {name: len(data) for name, data in sections.items()}, fill, digest=digest)


def encode_into(header: dict, sizes: Dict[str, int], fill: Callable[[str, memoryview], None], *,
                digest: bool = True) -> np.ndarray:
    """One session as a uint8 array whose sections fill(name, view) writes in place (view: sizes[name] bytes).

    A session of a 30k-token chat of an 8B model is ~4 GB: the K/V section is written by the native save straight
    into the session's memory, which is allocated without zeroing (np.empty), instead of being built apart and
    concatenated (a zero-filled bytearray plus a copy took longer than the native save itself)."""
    table, offset = [], 0
    for name, size in sizes.items():
        table.append({"name": name, "offset": offset, "length": int(size)})
        offset += int(size)
    head = json.dumps({**header, "sections": table}, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<II", FORMAT_VERSION, len(head)) + head
    out = np.empty(len(prefix) + offset + _DIGEST, np.uint8)
    view = memoryview(out)
    view[: len(prefix)] = prefix
    for entry in table:
        a = len(prefix) + entry["offset"]
        fill(entry["name"], view[a: a + entry["length"]])
    body = view[: len(out) - _DIGEST]
    view[len(out) - _DIGEST:] = hashlib.sha256(body).digest() if digest else _NO_DIGEST
    return out


def decode(data, *, verify: bool = True) -> Tuple[dict, Dict[str, memoryview]]:
    """(header, sections) of a session; SessionError when it is not one, a newer format, or (verify) damaged."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + 8 + _DIGEST or bytes(view[: len(MAGIC)]) != MAGIC:
        raise SessionError("not an asrkf-gguf session file")
    version, n_head = struct.unpack_from("<II", view, len(MAGIC))
    if version != FORMAT_VERSION:
        raise SessionError(f"session format version {version}; this asrkf-gguf reads version {FORMAT_VERSION}")
    body = view[: len(view) - _DIGEST]
    stored = bytes(view[len(view) - _DIGEST:])
    if verify:
        if stored == _NO_DIGEST:
            raise SessionError("the session has no checksum (an in-memory blob, not a file)")
        if hashlib.sha256(body).digest() != stored:
            raise SessionError("the session file failed its checksum (corrupted or truncated)")
    start = len(MAGIC) + 8
    if start + n_head > len(body):
        raise SessionError("the session file is truncated (header)")
    try:
        header = json.loads(bytes(body[start:start + n_head]))
    except ValueError as err:
        raise SessionError(f"the session header is not valid JSON: {err}") from None
    base = start + n_head
    sections = {}
    for s in header.get("sections", []):
        a, b = base + int(s["offset"]), base + int(s["offset"]) + int(s["length"])
        if b > len(body):
            raise SessionError(f"the session file is truncated (section {s['name']})")
        sections[s["name"]] = body[a:b]
    for need in ("kv", "table"):
        if need not in sections:
            raise SessionError(f"the session has no {need!r} section")
    return header, sections


def read_header(path: str) -> dict:
    """The header of a session file, reading only its first bytes (no checksum: load() verifies the whole file);
    SessionError when it is not one, a newer format, or its header is cut or not JSON. A server indexes its cache
    directory with this: what a file holds (the chat's tokens) and what it needs (header["compat"])."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                raise SessionError("not an asrkf-gguf session file")
            version, n_head = struct.unpack_from("<II", head, len(MAGIC))
            if version != FORMAT_VERSION:
                raise SessionError(f"session format version {version}; this asrkf-gguf reads version "
                                   f"{FORMAT_VERSION}")
            text = f.read(n_head)
    except OSError as err:
        raise SessionError(f"cannot read the session file: {err}") from None
    if len(text) < n_head:
        raise SessionError("the session file is truncated (header)")
    try:
        header = json.loads(text)
    except ValueError as err:
        raise SessionError(f"the session header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise SessionError("the session header is not a JSON object")
    return header


def write_file(path: str, data) -> None:
    """Write a session file atomically: a temporary file next to it, flushed to the disk (fsync), renamed over
    `path`, and the directory flushed too, so that a crash or power loss leaves the old file or the new one,
    never a torn one (readers only ever see whole files)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # a directory that cannot be opened (some platforms): the rename is done all the same
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def compare(saved: dict, here: dict) -> None:
    """SessionError naming the first setting in which a saved session and this Engine differ."""
    labels = {
        "llama_cpp_commit": "llama.cpp commit", "model_fingerprint": "model", "type_k": "K cache type (--kv-type)",
        "type_v": "V cache type (--kv-type)", "ctx": "context size (--ctx)",
        "budget_cells": "device budget in cells (--kv-budget)", "n_cells": "KV cells",
        "v_trans": "flash attention off (V transposed)", "policy": "policy (--policy)",
        "kv_bytes_per_token": "K/V bytes per token",
    }
    for key, label in labels.items():
        if key not in here or key not in saved:
            continue
        if saved[key] != here[key]:
            if key == "model_fingerprint":
                raise SessionError(f"the session was saved with another model ({saved.get('model_file')}, "
                                   f"{saved.get('model_size')} bytes); this Engine runs {here.get('model_file')}")
            raise SessionError(f"the session was saved with {label} {saved[key]}, this Engine has {here[key]}")
