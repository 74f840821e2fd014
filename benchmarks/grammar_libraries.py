"""Grammar libraries for structured output, measured on the default model's tokenizer.

    pip install outlines-core   # the other candidate; llguidance is a dependency
    python benchmarks/grammar_libraries.py

For three JSON Schemas: the time to compile the schema for the vocabulary (what a
worker pays once per schema) and the time to compute the allowed-token mask per token
while following a valid answer (what every constrained request pays each step), up to a
boolean array over the vocabulary (llguidance fills a bitmask; outlines-core lists the
allowed ids).
xgrammar, the third candidate, needs PyTorch and Triton (several GB on a CPU machine) and
is not measured here.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMAS = {
    "person": ({"type": "object", "additionalProperties": False,
                "required": ["name", "age", "city"],
                "properties": {"name": {"type": "string", "maxLength": 40},
                               "age": {"type": "integer", "minimum": 0, "maximum": 130},
                               "city": {"type": "string", "maxLength": 40}}},
               {"name": "Maria", "age": 34, "city": "Lyon"}),
    "label": ({"type": "object", "additionalProperties": False, "required": ["label"],
               "properties": {"label": {"enum": ["positive", "negative", "neutral"]}}},
              {"label": "negative"}),
    "order": ({"type": "object", "additionalProperties": False, "required": ["id", "items"],
               "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
                              "items": {"type": "array", "maxItems": 5, "items": {
                                  "type": "object", "additionalProperties": False,
                                  "required": ["sku", "qty"],
                                  "properties": {"sku": {"type": "string", "maxLength": 12},
                                                 "qty": {"type": "integer", "minimum": 1}}}}}},
              {"id": "AB1234", "items": [{"sku": "lamp-3", "qty": 2}, {"sku": "cord", "qty": 1}]}),
}


def llguidance_run(tokenizer, schema, tokens) -> tuple[float, list[float]]:
    import numpy as np
    from llguidance import LLMatcher
    from llguidance.hf import from_tokenizer
    from llguidance.numpy import fill_next_token_bitmask
    from nightshift.jobs.response_format import JSON_LAYOUT

    llg = from_tokenizer(tokenizer._tokenizer)
    start = time.perf_counter()
    matcher = LLMatcher(llg, LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT))
    compile_s = time.perf_counter() - start
    bits = np.zeros((1, (llg.vocab_size + 31) // 32), dtype=np.int32)
    steps = []
    for t in tokens:
        start = time.perf_counter()
        fill_next_token_bitmask(matcher, bits, 0)
        steps.append(time.perf_counter() - start)
        assert (bits[0, t // 32] >> (t % 32)) & 1, "a valid answer's token was masked"
        matcher.consume_token(t)
    return compile_s, steps


def outlines_run(tokenizer, schema, tokens) -> tuple[float, list[float]]:
    from nightshift.worker.logprobs import token_bytes
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    to_bytes = token_bytes(tokenizer)
    eos = min(tokenizer.eos_token_ids)
    vocab: dict[bytes, list[int]] = {}
    for i in range(len(tokenizer)):
        if i not in tokenizer.eos_token_ids:
            vocab.setdefault(to_bytes(i), []).append(i)
    vocabulary = Vocabulary(eos, vocab)
    start = time.perf_counter()
    # The same layout as llguidance's: ", " and ": ".
    regex = build_regex_from_schema(json.dumps(schema), r"[ ]?")
    guide = Guide(Index(regex, vocabulary))
    compile_s = time.perf_counter() - start
    import numpy as np

    steps = []
    for t in tokens:
        start = time.perf_counter()
        mask = np.zeros(len(tokenizer), dtype=np.bool_)  # what the decode step applies
        mask[guide.get_tokens()] = True
        steps.append(time.perf_counter() - start)
        assert mask[t], "a valid answer's token was masked"
        guide.advance(t)
    return compile_s, steps


def main() -> int:
    from mlx_lm.utils import load_tokenizer
    from nightshift.worker import registry

    tokenizer = load_tokenizer(Path(registry.resolve("smollm2")))
    print(f"tokenizer: smollm2, {len(tokenizer):,} tokens")
    print(f"{'library':<14}{'schema':<8}{'compile (ms)':>14}{'mask/token median (ms)':>24}"
          f"{'max (ms)':>10}")
    for name, (schema, answer) in SCHEMAS.items():
        text = json.dumps(answer)  # ", " and ": ", as both grammars write it
        tokens = tokenizer.encode(text, add_special_tokens=False)
        for library, run in (("llguidance", llguidance_run), ("outlines-core", outlines_run)):
            try:
                compile_s, steps = run(tokenizer, schema, tokens)
            except ImportError as exc:
                print(f"{library:<14}{name:<8}  not installed ({exc.name})")
                continue
            print(f"{library:<14}{name:<8}{compile_s * 1e3:>14.1f}"
                  f"{statistics.median(steps) * 1e3:>24.3f}{max(steps) * 1e3:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
