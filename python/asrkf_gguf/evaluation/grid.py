"""The evaluation grid: which runs, in which order, into one resumable results file.

A run is (case, setting, budget). Finished runs are recorded in DIR/results.json after each one, so an
interrupted grid continues where it stopped and a later command with more tasks, contexts or budgets adds to the
same file. The full-cache settings ignore the budget and run once per case.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .runner import KL_TOP_K, SETTINGS, Setting, load_reference, run_case, save_reference
from .tasks import DEPTHLESS, KL_TASKS, NEEDS_ESSAYS, TASKS, Case, make_case

RESULTS = "results.json"
SCHEMA = 1


class GridError(ValueError):
    """Bad grid input or a results file that belongs to another model or seed."""


@dataclass(frozen=True)
class GridSpec:
    tasks: Tuple[str, ...]
    ctxs: Tuple[int, ...]
    budgets: Tuple[float, ...]
    depths: Tuple[float, ...]
    settings: Tuple[str, ...]
    seed: int = 0
    kl_tokens: int = 512
    redo: Tuple[str, ...] = ()  # settings whose finished runs are run again (e.g. after a controller fix)

    def __post_init__(self):
        for t in self.tasks:
            if t not in TASKS:
                raise GridError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        for s in (*self.settings, *self.redo):
            if s not in SETTINGS:
                raise GridError(f"unknown policy/setting {s!r}; choose from {', '.join(SETTINGS)}")
        if not (self.tasks and self.ctxs and self.settings):
            raise GridError("tasks, contexts and policies must not be empty")
        if any(c < 256 for c in self.ctxs):
            raise GridError("every context must be at least 256 tokens")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise GridError("budgets are fractions of the context in (0, 1]")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise GridError("depths are fractions of the document in [0, 1]")
        if any(SETTINGS[s].budgeted for s in self.settings) and not self.budgets:
            raise GridError("a budgeted policy needs at least one budget")
        if KL_TASKS & set(self.tasks) and not all(0 < self.kl_tokens < c for c in self.ctxs):
            raise GridError(f"--kl-tokens ({self.kl_tokens}) must be shorter than every context")

    def runs(self) -> Iterator[Tuple[str, int, Optional[float], Setting, float]]:
        """(task, ctx, depth, setting, budget) in order: small contexts first; for KL the full cache first, since
        it is the reference the others are compared with."""
        for ctx in sorted(self.ctxs):
            for task in self.tasks:
                depths = [None] if task in DEPTHLESS else list(self.depths)
                settings = sorted(self.settings, key=lambda s: (s != "full")) if task in KL_TASKS else self.settings
                for depth in depths:
                    for name in settings:
                        s = SETTINGS[name]
                        for budget in (sorted(self.budgets, reverse=True) if s.budgeted else [1.0]):
                            yield task, ctx, depth, s, budget


def run_key(case: Case, setting: Setting, budget: float) -> str:
    return f"{case.key}|{setting.name}|budget={budget:g}"


# ---- model and provenance


def resolve_model(spec: str) -> Tuple[str, str, str]:
    """'qwen' | 'demo' | 'gemma' | a GGUF path -> (path, name, sha256)."""
    from .. import models

    known = {"qwen": (models.fetch_qwen_coder_model, models._QWEN_CODER),
             "demo": (models.fetch_demo_model, models._SMOLLM2),
             "gemma": (models.fetch_gemma3_model, models._GEMMA3)}
    if spec in known:
        fetch, meta = known[spec]
        return str(fetch(progress=True)), meta["name"], meta["sha256"]
    path = Path(spec)
    if not path.is_file():
        raise GridError(f"model file not found: {spec} (or use qwen, demo, gemma)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GridError(f"{spec} is not a GGUF file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return str(path), path.name, h.hexdigest()


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


class Tokenizer:
    """The model's vocabulary alone (no weights, no context): sizes the cases in the model's tokens."""

    def __init__(self, model_path: str):
        from .. import _lib  # noqa: F401  (the patched libllama first)
        import llama_cpp

        self._llama = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
        if not self._model:
            raise GridError(f"cannot load the vocabulary of {model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    def tokenize(self, text: str, add_special: bool = False) -> List[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (self._llama.llama_token * n_max)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:
            raise GridError(f"tokenization failed ({n})")
        return list(buf[:n])

    def count(self, text: str) -> int:
        return len(self.tokenize(text))

    def close(self) -> None:
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Tokenizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- results file


class ResultsFile:
    """DIR/results.json: meta (model, sha256, commit, seed, machine) and one record per finished run."""

    def __init__(self, out_dir: Path, meta: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RESULTS
        self.meta = meta
        self.records: Dict[str, dict] = {}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise GridError(f"{self.path} is not valid JSON ({err}); move it away to start over") from None
            for k in ("model_sha256", "seed"):
                if old["meta"].get(k) != meta[k]:
                    raise GridError(f"{self.path} holds results for {k} {old['meta'].get(k)!r}, not {meta[k]!r}; "
                                    "use another --out directory")
            self.records = {r["key"]: r for r in old["records"]}
            # keep the first commit/start; note every later one
            meta["resumed"] = old["meta"].get("resumed", []) + [{"git_commit": meta["git_commit"],
                                                                "started": meta["started"]}]
            meta["git_commit"], meta["started"] = old["meta"]["git_commit"], old["meta"]["started"]

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        self.save()

    def save(self) -> None:
        data = {"schema": SCHEMA, "meta": self.meta, "records": list(self.records.values())}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}


# ---- the loop


def _progress(i: int, n: int, text: str, t_start: float, done_new: int) -> None:
    elapsed = time.perf_counter() - t_start
    eta = f", ~{elapsed / done_new * (n - i) / 60:.0f} min left" if done_new else ""
    sys.stderr.write(f"[{i}/{n}] {text} ({elapsed / 60:.1f} min{eta})\n")
    sys.stderr.flush()


def run_grid(model: str, spec: GridSpec, out_dir: str, *, n_threads: Optional[int] = None,
             log: Callable[[int, int, str, float, int], None] = _progress, cases_only: bool = False) -> ResultsFile:
    """Run every (case, setting, budget) of spec not yet in out_dir/results.json. Returns the results file.
    Every case is also written to out_dir/cases/ (peers run the same text from there); cases_only stops there."""
    path, name, sha = resolve_model(model)
    meta = {"model": name, "model_path": path, "model_sha256": sha, "git_commit": git_commit(), "seed": spec.seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": _machine(), "n_threads": n_threads,
            "kl_top_k": KL_TOP_K}
    results = ResultsFile(Path(out_dir), meta)
    essays = []
    if NEEDS_ESSAYS & set(spec.tasks):
        from ..models import fetch_haystack_essays

        essays = [p.read_text(encoding="utf-8", errors="replace") for p in fetch_haystack_essays(progress=True)]

    runs = list(spec.runs())
    cases: Dict[tuple, Case] = {}
    t_start = time.perf_counter()
    done_new = 0
    with Tokenizer(path) as tok:
        for i, (task, ctx, depth, setting, budget) in enumerate(runs, 1):
            ck = (task, ctx, depth)
            if ck not in cases:
                cases[ck] = make_case(task, ctx, depth, spec.seed, tok.count, essays, spec.kl_tokens)
                save_case(results.dir, cases[ck])
            case = cases[ck]
            if cases_only:
                continue
            key = run_key(case, setting, budget)
            label = f"{task} ctx={ctx} depth={depth if depth is not None else '-'} {setting.name}" + \
                (f" budget={budget:g}" if setting.budgeted else "")
            if key in results and setting.name not in spec.redo:
                log(i, len(runs), f"{label}: done before, skipped", t_start, done_new)
                continue
            record = _run_one(path, case, setting, budget, tok, results, n_threads)
            record["key"] = key
            record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            results.add(record)
            done_new += 1
            log(i, len(runs), f"{label}: {_summary(record)}", t_start, done_new)
    return results


def save_case(out_dir: Path, case: Case) -> Path:
    """DIR/cases/<key>.json: the case as text, for runs outside this package (scripts/kvpress_side_by_side.py)."""
    path = Path(out_dir) / "cases" / (case.key.replace("|", "_").replace("=", "") + ".json")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": case.key, **asdict(case)}), encoding="utf-8")
        os.replace(tmp, path)
    return path


def _run_one(path: str, case: Case, setting: Setting, budget: float, tok: Tokenizer, results: ResultsFile,
             n_threads: Optional[int]) -> dict:
    if case.task not in KL_TASKS:
        return run_case(path, case, setting, budget, n_threads=n_threads)
    tokens = tok.tokenize(case.text, add_special=True)
    if len(tokens) < case.ctx:
        raise GridError(f"the KL text has {len(tokens)} tokens, fewer than ctx {case.ctx}")
    ref_path = results.dir / "kl-ref" / (case.key.replace("|", "_").replace("=", "") + ".npz")
    ref = load_reference(ref_path)
    if setting.name == "full" or ref is None:
        if setting.name != "full":
            # the reference comes first: compute it now (and record it) if this grid did not ask for it
            full = run_case(path, case, SETTINGS["full"], 1.0, n_threads=n_threads, kl_tokens=tokens)
            ref = _store_reference(full, ref_path)
            full["key"] = run_key(case, SETTINGS["full"], 1.0)
            full["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            results.add(full)
        else:
            record = run_case(path, case, setting, budget, n_threads=n_threads, kl_tokens=tokens)
            _store_reference(record, ref_path)
            return record
    return run_case(path, case, setting, budget, n_threads=n_threads, kl_tokens=tokens, kl_ref=ref)


def _store_reference(record: dict, ref_path: Path) -> dict:
    ref = record.pop("reference")
    save_reference(ref_path, ref)
    n = record["n_continuation"]
    record.update({"kl": [0.0] * n, "kl_median": 0.0, "kl_p95": 0.0, "kl_mean": 0.0, "top1_agreement": 1.0})
    return ref


def _summary(r: dict) -> str:
    kv = r["kv"]
    dev = f"peak {kv['resident_cells_peak']}/{kv['logical_tokens']} cells"
    if r["task"] in KL_TASKS:
        return f"KL median {r['kl_median']:.4f} p95 {r['kl_p95']:.4f} top1 {r['top1_agreement']:.3f}, {dev}, " \
               f"{r['timing']['wall_s']:.0f} s"
    return f"{'PASS' if r['passed'] else 'fail'} {r['answer'][:40]!r}, {dev}, {r['timing']['wall_s']:.0f} s"


def parse_list(text: str, kind: Callable, what: str) -> Tuple:
    """'0.5,0.25' or '50%,25%' (fractions) / '2048,4096' (ints) -> a tuple."""
    items = []
    for x in (t.strip() for t in text.split(",")):
        if not x:
            continue
        try:
            items.append(float(x[:-1]) / 100 if kind is float and x.endswith("%") else kind(x))
        except ValueError:
            raise GridError(f"{what}: cannot read {x!r} in {text!r} as a number") from None
    if not items:
        raise GridError(f"{what} is empty")
    return tuple(items)
