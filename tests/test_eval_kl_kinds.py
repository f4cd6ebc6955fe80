"""The KL task on several kinds of ordinary text (issue 16): essays (kl), standard library source (kl-code), the
language reference (kl-docs); every seed another text."""

from asrkf_gguf.evaluation.grid import GridSpec, Tokenizer
from asrkf_gguf.evaluation.tasks import DEPTHLESS, KL_TASKS, make_case


def test_kl_code_and_docs_cases_fill_their_context_and_differ_by_seed(demo_model_path):
    with Tokenizer(demo_model_path) as tok:
        for task in ("kl-code", "kl-docs"):
            cases = [make_case(task, 2048, 0.5, seed, tok.count, n_continuation=512) for seed in range(3)]
            assert cases[0] == make_case(task, 2048, None, 0, tok.count, n_continuation=512)  # seeded, depthless
            assert len({c.text[:200] for c in cases}) == 3  # three texts
            for c in cases:
                assert c.task == task and c.depth is None and c.n_continuation == 512
                assert c.key == f"{task}|ctx=2048|depth=-|seed={c.seed}|cont=512"
                assert len(tok.tokenize(c.text, add_special=True)) >= 2048
        # sized so that a file's opening docstring cannot fill it with a small vocabulary's tokens (the GPU
        # machine's written stand-in, 1,024 entries: 2,048 tokens held only site.py's docstring on Python 3.12)
        code = make_case("kl-code", 8192, None, 0, tok.count)
        assert "def " in code.text and "import " in code.text


def test_kl_kinds_are_depthless_and_checked_against_the_context():
    assert KL_TASKS <= DEPTHLESS and {"kl", "kl-code", "kl-docs"} == KL_TASKS
    spec = GridSpec(tasks=("kl-docs",), ctxs=(1024,), budgets=(0.25,), depths=(0.1, 0.9),
                    settings=("asrkf-fresh", "full"), kl_tokens=512)
    runs = list(spec.runs())
    assert [r[3].name for r in runs] == ["full", "asrkf-fresh"]  # the reference first, one case (no depths)
    try:
        GridSpec(tasks=("kl-code",), ctxs=(512,), budgets=(0.25,), depths=(0.5,), settings=("full",), kl_tokens=512)
    except ValueError as e:
        assert "--kl-tokens" in str(e)
    else:
        raise AssertionError("a continuation as long as the context was accepted")
