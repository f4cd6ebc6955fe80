"""A model whose memory is not a KV cache (Mamba's recurrent state) is refused with a clear error, untouched."""

import numpy as np
import pytest

from asrkf_gguf import AsrkfError, KVCache
from asrkf_gguf.testmodels import TinyModelSpec, tiny_model
from conftest import random_tokens, session

MAMBA = TinyModelSpec(arch="mamba", n_layer=2, n_embd=128, seed=2)


@pytest.fixture(scope="module")
def mamba_path():
    return str(tiny_model(MAMBA))


def test_mamba_attach_is_refused_and_changes_nothing(mamba_path):
    prompt, more = random_tokens(12, seed=30), random_tokens(5, seed=31)
    with session(mamba_path, n_ctx=256) as s:
        logits = s.decode(prompt, 0)  # the tiny Mamba loads and runs
        assert np.isfinite(logits).all() and logits.std() > 0
        assert s.pos_max() == len(prompt) - 1

        with pytest.raises(AsrkfError) as err:
            KVCache(ctx=s.context)
        assert err.value.code == -5
        assert "mamba" in err.value.message

        # nothing changed: the sequence continues exactly as in a context that was never attached to
        assert s.pos_max() == len(prompt) - 1
        after = s.decode(more, len(prompt))
        assert s.pos_max() == len(prompt) + len(more) - 1

    with session(mamba_path, n_ctx=256) as ref:
        ref.decode(prompt, 0)
        expected = ref.decode(more, len(prompt))
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)
