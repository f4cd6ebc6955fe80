"""Chat prompts as llama-cpp-python and llama-server build them: the GGUF's own Jinja template
(tokenizer.chat_template), rendered with llama-cpp-python's Jinja2ChatFormatter; llama.cpp's built-in templates
(llama_chat_apply_template) when the caller names one, or as the fallback when the Jinja template does not render.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

from . import _lib  # noqa: F401  (must load before llama_cpp)
import llama_cpp

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def builtin_template_names() -> Tuple[str, ...]:
    """The names of llama.cpp's built-in templates (chatml, llama3, gemma, ...)."""
    n = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * max(1, n))()
    n = llama_cpp.llama_chat_builtin_templates(names, n)
    return tuple(names[i].decode() for i in range(n))


class ChatTemplate:
    """Messages -> prompt token ids for one model.

    template: None (the GGUF's own), the name of a llama.cpp built-in, or a Jinja template. A Jinja template
    (the GGUF's too) is rendered as llama-cpp-python renders it; if it raises (a template that refuses a system
    message, a filter Jinja2 lacks), llama.cpp's built-in that its text resembles is applied instead, as
    llama_chat_apply_template detects them. ValueError when the model has none and none is given."""

    def __init__(self, session, template: Optional[str] = None):
        self.session = session
        model = session.model.model
        if template is None:
            raw = llama_cpp.llama_model_chat_template(model, None)
            template = raw.decode("utf-8", "replace") if raw else None
            self.source = "gguf"
        else:
            self.source = "given"
        self.template = template
        self.builtin = template is not None and template in builtin_template_names()
        self._jinja = None
        self._warned = False
        self.used = "builtin" if self.builtin else "jinja"  # what rendered the last prompt
        log.info("chat template: %s", "none" if template is None else
                 f"llama.cpp's built-in {template}" if self.builtin else
                 "the GGUF's Jinja template" if self.source == "gguf" else "the Jinja template given")
        if template is not None and not self.builtin:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            vocab = session.model.vocab
            try:
                self._jinja = Jinja2ChatFormatter(template=template, eos_token=_token_text(vocab, "eos"),
                                                  bos_token=_token_text(vocab, "bos"), add_generation_prompt=True)
            except Exception as err:  # a syntax error: llama.cpp's heuristics may still know the template
                log.warning("the chat template is not valid Jinja (%s); using llama.cpp's built-in templates",
                            _one_line(err))

    def tokens(self, messages: Sequence[dict]) -> List[int]:
        """The prompt's token ids, ending with the assistant's turn opening. A Jinja template writes the BOS
        text itself (llama-cpp-python tokenizes it without adding one); a BOS the model wants and the template
        left out is added once, never twice."""
        if self.template is None:
            raise ValueError("the model has no chat template")
        s = self.session
        if self._jinja is not None:
            try:
                text = self._jinja(messages=[dict(m) for m in messages]).prompt
            except Exception as err:
                if not self._warned:  # once per conversation, not at every turn
                    self._warned = True
                    log.warning("the Jinja chat template did not render (%s); using llama.cpp's built-in one",
                                _one_line(err))
            else:
                self.used = "jinja"
                tokens = s.tokenize(text, add_special=False)
                vocab = s.model.vocab
                bos = llama_cpp.llama_vocab_bos(vocab)
                if llama_cpp.llama_vocab_get_add_bos(vocab) and bos >= 0 and tokens[:1] != [bos]:
                    tokens.insert(0, bos)
                return tokens
        self.used = "builtin"
        return s.tokenize(s.chat_prompt(messages, template=self.template), add_special=True)


def _token_text(vocab, which: str) -> str:
    token = llama_cpp.llama_vocab_bos(vocab) if which == "bos" else llama_cpp.llama_vocab_eos(vocab)
    if token < 0:
        return ""
    text = llama_cpp.llama_vocab_get_text(vocab, token)
    return text.decode("utf-8", "replace") if text else ""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
