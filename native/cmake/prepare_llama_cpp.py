"""Obtain the llama.cpp source that llama-cpp-python 0.3.36 vendors, and apply our patches to a copy of it.

Called by CMakeLists.txt at configure time. The source comes from, in order:
  1. --source: a directory (llama.cpp root, or an unpacked llama-cpp-python sdist) or the sdist .tar.gz;
  2. the sdist cached by an earlier build;
  3. `pip download` of the sdist (needs PyPI).
The sdist is checked against its sha256 before use. The patched tree is written to --dest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_REQ = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR = "vendor/llama.cpp"

# what libllama + libggml need, and the source of llama.cpp's RPC server; other tools, tests and examples stay out
# of the build tree
NEEDED = ["CMakeLists.txt", "LICENSE", "cmake", "include", "src", "ggml", "vendor", "common", "tools/rpc"]


def needed(rel: str) -> bool:
    """Whether a path of the llama.cpp tree (relative, '/'-separated) is one NEEDED names or inside one."""
    return any(rel == name or rel.startswith(name + "/") for name in NEEDED)


class PrepareError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("ASRKF_GGUF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "asrkf-gguf")
    path = Path(root) / "src"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist() -> Path:
    cached = cache_dir() / SDIST_NAME
    if cached.exists() and sha256_of(cached) == SDIST_SHA256:
        return cached
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        # --no-binary for this package only: the build tools it needs may come as wheels
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
               SDIST_REQ, "-d", tmp]
        print("asrkf-gguf: fetching the llama.cpp source:", " ".join(cmd), flush=True)
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0:
            raise PrepareError(
                "could not download " + SDIST_REQ + " (the llama.cpp source) with pip:\n" + res.stdout +
                "\nWithout network access, pass the source explicitly: "
                "ASRKF_LLAMA_CPP_SOURCE=/path/to/" + SDIST_NAME + " (or an unpacked llama.cpp directory) pip install .")
        got = Path(tmp) / SDIST_NAME
        if not got.exists():
            raise PrepareError("pip did not produce " + SDIST_NAME + ":\n" + res.stdout)
        os.replace(got, cached)
    return cached


def extract(source: Path, dest: Path) -> None:
    if source.is_dir():
        root = source / VENDOR if (source / VENDOR).is_dir() else source
        if not (root / "src" / "llama-kv-cache.cpp").exists():
            raise PrepareError(f"{source} is neither a llama.cpp source tree nor an unpacked llama-cpp-python sdist")
        for name in NEEDED:
            if (root / name).is_dir():
                shutil.copytree(root / name, dest / name)
            elif (root / name).exists():
                shutil.copy2(root / name, dest / name)
        return

    digest = sha256_of(source)
    if digest != SDIST_SHA256:
        raise PrepareError(f"{source}: sha256 {digest} is not the one of {SDIST_NAME} ({SDIST_SHA256})")
    prefix = SDIST_NAME[: -len(".tar.gz")] + "/" + VENDOR + "/"
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if not rel or not needed(rel):
                continue
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)


def apply_patches(dest: Path, patches: list[Path]) -> None:
    for patch in patches:
        if shutil.which("patch"):
            cmd = ["patch", "-p1", "--forward", "--batch", "-i", str(patch)]
        elif shutil.which("git"):
            # inside another work tree (a build folder in a checkout) git apply would patch paths relative to
            # that tree's root: make dest its own repository first
            subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
            cmd = ["git", "apply", "--whitespace=nowarn", str(patch)]
        else:
            raise PrepareError("applying the patches needs patch or git on PATH")
        res = subprocess.run(cmd, cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0:
            raise PrepareError(f"patch {patch.name} does not apply to the llama.cpp source "
                               f"(is it llama-cpp-python 0.3.36's vendor/llama.cpp?):\n{res.stdout}")
    # a patch tool that reports success without patching must not give a silently unpatched library
    if patches and "is_frozen" not in (dest / "src" / "llama-kv-cells.h").read_text():
        raise PrepareError("the patches reported success but src/llama-kv-cells.h is unpatched")


def keep_unchanged_mtimes(new: Path, old: Path) -> None:
    """Files of the new tree with the same bytes as in the old one keep the old modification time, so that a patch
    change rebuilds only the sources it changed (and what includes them), not the whole library."""
    if not old.is_dir():
        return
    for path in new.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        before = old / path.relative_to(new)
        try:
            st = before.stat()
            if st.st_size == path.stat().st_size and before.read_bytes() == path.read_bytes():
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError:
            continue


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="")
    ap.add_argument("--dest", required=True)
    ap.add_argument("--patch", action="append", default=[])
    args = ap.parse_args()

    dest = Path(args.dest)
    stamp = dest / ".asrkf-prepared"
    patches = [Path(p) for p in sorted(args.patch)]
    key = "\n".join([args.source, ",".join(NEEDED)] + [sha256_of(p) for p in patches])
    if stamp.exists() and stamp.read_text() == key:
        return 0

    try:
        source = Path(args.source) if args.source else fetch_sdist()
        if not source.exists():
            raise PrepareError(f"ASRKF_LLAMA_CPP_SOURCE={source} does not exist")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        extract(source, tmp)
        apply_patches(tmp, patches)
        keep_unchanged_mtimes(tmp, dest)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        stamp.write_text(key)
    except PrepareError as err:
        print(f"asrkf-gguf: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
