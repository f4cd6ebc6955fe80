"""The evaluation grid: which runs, in which order, into one resumable results file.

A run is (case, setting, budget); a case is (task, ctx, depth, seed). Finished runs are recorded in
DIR/results.json after each one (written whole to a temporary file, then renamed over the old one), so an
interrupted grid continues where it stopped and a later command with more tasks, contexts, budgets or seeds adds to
the same file. The full-cache settings ignore the budget and run once per case.

Order: task by task (as given), context by context (smallest first), and within that cell case by case (seed by
seed, each seed's depths in order), every setting and budget of a case before the next case, so that a grid
stopped anywhere leaves whole comparisons for the cases it did. For the KL tasks the full cache runs first: it is
the reference of the others.

time_limit: no run starts once that many seconds have passed since the call started, nor one that would likely
not end before (the median wall time of finished runs of the same task and context, or a guess from others); the
call then returns normally and results.json's meta["plan"] says how many planned runs did not run (per task and
context). The same command again continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from .runner import KL_TOP_K, SETTINGS, Setting, engine_gpu_layers, load_reference, run_case, save_reference
from .tasks import DEPTHLESS, KL_TASKS, NEEDS_ESSAYS, TASKS, Case, make_case

RESULTS = "results.json"
SCHEMA = 1


class GridError(ValueError):
    """Bad grid input or a results file that belongs to another model or seed."""


class Run(NamedTuple):
    task: str
    ctx: int
    depth: Optional[float]
    setting: Setting
    budget: float
    seed: int = 0


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
    seeds: Tuple[int, ...] = ()  # the cases' seeds; () = (seed,). Cases per cell: depths x seeds (seeds alone for
    # the depthless tasks: kl*, cwe, fwe)

    def __post_init__(self):
        if not self.seeds:
            object.__setattr__(self, "seeds", (self.seed,))
        if len(set(self.seeds)) != len(self.seeds):
            raise GridError(f"--seeds has a seed twice: {','.join(map(str, self.seeds))}")
        if any(s < 0 for s in self.seeds):
            raise GridError("seeds must not be negative")
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

    def cases(self, task: str) -> List[Tuple[Optional[float], int]]:
        """(depth, seed) of a task's cases in one context, in run order: seed by seed, depths within."""
        depths = [None] if task in DEPTHLESS else list(self.depths)
        return [(d, seed) for seed in self.seeds for d in depths]

    def runs(self) -> Iterator[Run]:
        """Every run in order: task by task, context by context (smallest first), case by case with all the
        case's settings and budgets (higher budgets first) before the next case. For KL the full cache first,
        since it is the reference the others are compared with."""
        for task in self.tasks:
            settings = sorted(self.settings, key=lambda s: (s != "full")) if task in KL_TASKS else self.settings
            for ctx in sorted(self.ctxs):
                for depth, seed in self.cases(task):
                    for name in settings:
                        s = SETTINGS[name]
                        for budget in (sorted(self.budgets, reverse=True) if s.budgeted else [1.0]):
                            yield Run(task, ctx, depth, s, budget, seed)


def run_key(case: Case, setting: Setting, budget: float) -> str:
    return f"{case.key}|{setting.name}|budget={budget:g}"


def case_key(task: str, ctx: int, depth: Optional[float], seed: int, kl_tokens: int) -> str:
    """A case's key without making the case (Case.key reads only these fields)."""
    return Case(task, ctx=ctx, depth=depth, seed=seed, n_continuation=kl_tokens if task in KL_TASKS else 0).key


# ---- model and provenance


def resolve_model(spec: str, hash_cache: Optional[Path] = None) -> Tuple[str, str, str]:
    """'qwen' | 'demo' | 'gemma' | a GGUF path -> (path, name, sha256). hash_cache: a JSON file that keeps a GGUF
    path's sha256 by size and modification time, so that a resumed call does not read a large model whole again."""
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
    st = path.stat()
    ident = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if hash_cache is not None and hash_cache.is_file():
        try:
            known = json.loads(hash_cache.read_text(encoding="utf-8"))
            if {k: known.get(k) for k in ident} == ident and len(known.get("sha256", "")) == 64:
                return str(path), path.name, known["sha256"]
        except (ValueError, OSError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if hash_cache is not None:
        hash_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = hash_cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({**ident, "sha256": h.hexdigest()}), encoding="utf-8")
        os.replace(tmp, hash_cache)
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
    """DIR/results.json: meta (model, sha256, commit, seeds, machine, the last call's plan) and one record per
    finished run. Results of other seeds add to the same file (case keys hold the seed); of another model, no."""

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
            if old["meta"].get("model_sha256") != meta["model_sha256"]:
                raise GridError(f"{self.path} holds results for model_sha256 {old['meta'].get('model_sha256')!r}, "
                                f"not {meta['model_sha256']!r}; use another --out directory")
            old_seeds = old["meta"].get("seeds", [old["meta"].get("seed", 0)])
            meta["seeds"] = sorted(set(old_seeds) | set(meta.get("seeds", [])))
            meta["seed"] = old["meta"].get("seed", meta.get("seed"))  # the first call's, as before
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
    out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        from .. import _lib  # noqa: F401  (the patched libllama first)
        import llama_cpp

        out["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001  (provenance only)
        pass
    return out


def estimate_wall(records: Sequence[dict], task: str, ctx: int, n_gpu_layers: int,
                  prefer: Sequence[str] = ()) -> Optional[float]:
    """Seconds the next run of (task, ctx) will likely take: the median wall time of finished runs of the same
    task and context (this call's, the keys in prefer, over earlier calls'). Else a guess on the long side: the
    largest per-task median at that context; else, scaled by the context, the larger of that from the largest
    smaller context and the same task's median at its largest smaller context. None when nothing ran. Only runs
    with the same n_gpu_layers count."""
    prefer = set(prefer)
    rs = [r for r in records if r.get("n_gpu_layers", 0) == n_gpu_layers and r.get("timing", {}).get("wall_s")]

    def med(sel: List[dict]) -> float:
        mine = [r for r in sel if r.get("key") in prefer]
        return statistics.median(r["timing"]["wall_s"] for r in (mine or sel))

    def longest(sel: List[dict]) -> float:
        return max(med([r for r in sel if r["task"] == t]) for t in {r["task"] for r in sel})

    same = [r for r in rs if r["task"] == task and r["ctx"] == ctx]
    if same:
        return med(same)
    at_ctx = [r for r in rs if r["ctx"] == ctx]
    if at_ctx:
        return longest(at_ctx)
    smaller = [r for r in rs if r["ctx"] < ctx]
    if not smaller:
        return None
    c = max(r["ctx"] for r in smaller)
    guesses = [longest([r for r in smaller if r["ctx"] == c]) * ctx / c]
    mine = [r for r in smaller if r["task"] == task]
    if mine:
        c = max(r["ctx"] for r in mine)
        guesses.append(med([r for r in mine if r["ctx"] == c]) * ctx / c)
    return max(guesses)


# ---- the loop


def _progress(i: int, n: int, text: str, t_start: float, done_new: int) -> None:
    elapsed = time.perf_counter() - t_start
    eta = f", ~{elapsed / done_new * (n - i) / 60:.0f} min left" if done_new else ""
    sys.stderr.write(f"[{i}/{n}] {text} ({elapsed / 60:.1f} min{eta})\n")
    sys.stderr.flush()


def run_grid(model: str, spec: GridSpec, out_dir: str, *, n_threads: Optional[int] = None,
             n_gpu_layers: Optional[int] = None, time_limit: Optional[float] = None, started: Optional[float] = None,
             clock: Callable[[], float] = time.monotonic,
             log: Callable[[int, int, str, float, int], None] = _progress, cases_only: bool = False) -> ResultsFile:
    """Run every (case, setting, budget) of spec not yet in out_dir/results.json. Returns the results file.
    Every case run is also written to out_dir/cases/ (peers run the same text from there); cases_only writes every
    case of the grid and runs nothing. n_gpu_layers goes to every Engine (None: the Engine's default, 0).
    time_limit: seconds since `started` (clock()'s reading when the command started; default: now) after which no
    run starts (see the module's text);
    results.meta["plan"]["stopped"] says why the call stopped early, None when it ran everything."""
    if started is None:
        started = clock()
    if time_limit is not None and not time_limit > 0:
        raise GridError("--time-limit must be a positive number of seconds")
    out = Path(out_dir)
    path, name, sha = resolve_model(model, hash_cache=out / "model-sha256.json")
    n_gpu_layers_run = engine_gpu_layers(n_gpu_layers)  # as recorded in every run
    meta = {"model": name, "model_path": path, "model_sha256": sha, "git_commit": git_commit(),
            "seed": spec.seeds[0], "seeds": sorted(spec.seeds),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": _machine(), "n_threads": n_threads,
            "n_gpu_layers": n_gpu_layers_run, "kl_top_k": KL_TOP_K}
    call_started = meta["started"]
    results = ResultsFile(out, meta)  # a resumed file keeps its first start in meta["started"]
    essays = []
    if NEEDS_ESSAYS & set(spec.tasks):
        from ..models import fetch_haystack_essays

        essays = [p.read_text(encoding="utf-8", errors="replace") for p in fetch_haystack_essays(progress=True)]

    runs = list(spec.runs())
    keys = [run_key_of(r, spec.kl_tokens) for r in runs]
    pending = [i for i, (r, k) in enumerate(zip(runs, keys)) if k not in results or r.setting.name in spec.redo]
    plan = {"started": call_started, "planned": len(runs), "done_before": len(runs) - len(pending),
            "ran": 0, "not_run": len(pending), "time_limit_s": time_limit, "stopped": None,
            "not_run_by_cell": _by_cell(runs[i] for i in pending)}
    results.meta["plan"] = plan
    if not cases_only:
        results.save()
    cases: Dict[tuple, Case] = {}
    t_start = clock()
    done_new = 0
    ran_keys: List[str] = []
    pending_set = set(pending)
    with Tokenizer(path) as tok:
        for i, run in enumerate(runs):
            task, ctx, depth, setting, budget, seed = run
            label = f"{task} ctx={ctx} depth={depth if depth is not None else '-'} seed={seed} {setting.name}" + \
                (f" budget={budget:g}" if setting.budgeted else "")
            if i not in pending_set and not cases_only:
                log(i + 1, len(runs), f"{label}: done before, skipped", t_start, done_new)
                continue
            if time_limit is not None and not cases_only:
                elapsed = clock() - started
                est = estimate_wall(results.records.values(), task, ctx, n_gpu_layers_run, ran_keys)
                if elapsed >= time_limit or (est is not None and elapsed + est > time_limit):
                    left = [j for j in pending if j >= i]
                    plan["stopped"] = (f"time limit {time_limit:g} s: {elapsed:.0f} s passed" +
                                       (f", the next run ({label}) would take ~{est:.0f} s" if est is not None
                                        else ""))
                    plan["not_run"], plan["not_run_by_cell"] = len(left), _by_cell(runs[j] for j in left)
                    results.save()
                    log(i + 1, len(runs), f"stopped: {plan['stopped']}; {len(left)} planned runs not run "
                        "(the same command continues)", t_start, done_new)
                    break
            ck = (task, ctx, depth, seed)
            if ck not in cases:
                cases[ck] = make_case(task, ctx, depth, seed, tok.count, essays, spec.kl_tokens)
                save_case(results.dir, cases[ck])
            case = cases[ck]
            if cases_only:
                continue
            key = keys[i]
            assert key == run_key(case, setting, budget)
            record = _run_one(path, case, setting, budget, tok, results, n_threads, n_gpu_layers)
            record["key"] = key
            record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            ran_keys.append(key)
            plan["ran"] += 1
            pending_set.discard(i)
            left = [j for j in pending if j in pending_set]
            plan["not_run"], plan["not_run_by_cell"] = len(left), _by_cell(runs[j] for j in left)
            results.add(record)
            done_new += 1
            log(i + 1, len(runs), f"{label}: {_summary(record)}", t_start, done_new)
    return results


def run_key_of(run: Run, kl_tokens: int) -> str:
    return f"{case_key(run.task, run.ctx, run.depth, run.seed, kl_tokens)}|{run.setting.name}|budget={run.budget:g}"


def _by_cell(runs) -> Dict[str, int]:
    """Planned runs per 'task ctx' (for the report: what did not run)."""
    return dict(Counter(f"{r.task} {r.ctx}" for r in runs))


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
             n_threads: Optional[int], n_gpu_layers: Optional[int] = None) -> dict:
    dev = {"n_threads": n_threads, "n_gpu_layers": n_gpu_layers}
    if case.task not in KL_TASKS:
        return run_case(path, case, setting, budget, **dev)
    tokens = tok.tokenize(case.text, add_special=True)
    if len(tokens) < case.ctx:
        raise GridError(f"the KL text has {len(tokens)} tokens, fewer than ctx {case.ctx}")
    ref_path = results.dir / "kl-ref" / (case.key.replace("|", "_").replace("=", "") + ".npz")
    ref = load_reference(ref_path)
    if setting.name == "full" or ref is None:
        if setting.name != "full":
            # the reference comes first: compute it now (and record it) if this grid did not ask for it
            full = run_case(path, case, SETTINGS["full"], 1.0, **dev, kl_tokens=tokens)
            ref = _store_reference(full, ref_path)
            full["key"] = run_key(case, SETTINGS["full"], 1.0)
            full["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            results.add(full)
        else:
            record = run_case(path, case, setting, budget, **dev, kl_tokens=tokens)
            _store_reference(record, ref_path)
            return record
    return run_case(path, case, setting, budget, **dev, kl_tokens=tokens, kl_ref=ref)


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
    score = f" (score {r['score']:.2f})" if len(r["expected"]) > 1 else ""
    return f"{'PASS' if r['passed'] else 'fail'}{score} {r['answer'][:40]!r}, {dev}, {r['timing']['wall_s']:.0f} s"


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
