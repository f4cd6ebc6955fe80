"""Copy a GGUF's tokenizer (vocabulary, merges, special ids, chat template) into a small JSON file.

  python scripts/extract_vocab.py MODEL.gguf OUT.json.gz

scripts/write_bench_model.py --vocab OUT.json.gz gives the random-weight benchmark model that vocabulary, so that
`python -m asrkf_gguf run` and `Engine` (which tokenize text and apply the chat template) run on it on a machine
that cannot download the real model. The file is derived from a model's metadata: keep it out of the repository.
"""

from __future__ import annotations

import gzip
import json
import sys


def read_tokenizer(path: str) -> dict:
    import gguf

    r = gguf.GGUFReader(path)
    out = {}
    for name, field in r.fields.items():
        if not (name.startswith("tokenizer.") or name == "general.architecture"):
            continue
        kind = field.types[0] if field.types else None
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                out[name] = {"array": "string", "value": [bytes(field.parts[i]).decode("utf-8", "surrogateescape")
                                                          for i in field.data]}
            else:
                out[name] = {"array": sub.name, "value": [field.parts[i].tolist()[0] for i in field.data]}
        elif kind == gguf.GGUFValueType.STRING:
            out[name] = {"type": "string", "value": bytes(field.parts[field.data[0]]).decode("utf-8")}
        else:
            out[name] = {"type": kind.name, "value": field.parts[field.data[0]].tolist()[0]}
    if "tokenizer.ggml.tokens" not in out:
        raise SystemExit(f"{path} has no tokenizer.ggml.tokens")
    return out


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    data = read_tokenizer(sys.argv[1])
    with gzip.open(sys.argv[2], "wt", encoding="utf-8") as f:
        json.dump(data, f)
    print(f"{sys.argv[2]}: {len(data['tokenizer.ggml.tokens']['value'])} tokens, "
          f"{'a chat template' if 'tokenizer.chat_template' in data else 'no chat template'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
