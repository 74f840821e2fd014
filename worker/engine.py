"""The engine: claimed requests in, results out, on mlx-lm's BatchGenerator.

mlx-lm does the batching, sampling, stop-token matching and caches; this module
turns a stored request into what BatchGenerator takes (tokens, a sampler, stop
sequences, a token budget), measures each request's own timings, and turns what
comes out into a Result. It never touches the database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import make_stop_sequences
from mlx_lm.sample_utils import apply_top_p
from nightshift.jobs import settings
from nightshift.jobs.vocabulary import Claimed, Result
from nightshift.worker import logprobs
from nightshift.worker.cohorts import CohortBatchGenerator
from nightshift.worker.constrain import Grammars
from nightshift.worker.decode import RowSampler, use_logits_step
from nightshift.worker.prefill import prefill_settings
from nightshift.worker.prefix import PrefixCache, prefilled
from nightshift.worker.reasoning import Thinking, ThinkingGate

log = logging.getLogger("nightshift.engine")


class RequestError(Exception):
    """A request that cannot run (too long, no chat template); it fails alone."""


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of one of a request's ``n`` samples: the request's own for the first (so
    n=1 and the first of n agree), one derived from it for the others."""
    if seed is None or choice == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_sampler(temperature: float, top_p: float, seed: int | None):
    """A sampler with its own random key, so a seed reproduces one request's output
    whatever else shares the batch (mlx-lm's samplers use the global random state)."""
    state = [mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))]
    scale = 1.0 / temperature

    def sample(logprobs: mx.array) -> mx.array:
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        state[0], key = mx.random.split(state[0])
        return mx.random.categorical(logprobs * scale, key=key)

    return sample


@dataclass
class Live:
    """A request inside the generator."""

    claimed: Claimed
    prompt_tokens: int
    cached_tokens: int
    stops: tuple[str, ...]
    started_at: float
    first_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    detokenizer: object = None
    top_logprobs: int | None = None  # None: log-probabilities not asked for
    picked: list[logprobs.Picked] = field(default_factory=list)
    choice: int = 0  # which of the request's n samples
    opened: bool | None = None  # a reasoning model's: whether the template opened thinking


def _vocab_size(model, tokenizer) -> int:
    """The width of the model's logits (a vocabulary may be padded past the tokenizer's)."""
    args = getattr(model, "args", None)
    return getattr(args, "vocab_size", None) or len(tokenizer)


class Engine:
    """Continuous batching over one loaded model.

    Call ``add`` while ``free_slots()`` > 0 and ``step`` while ``busy``; each step is
    one decode step for every live request plus one prefill chunk for new ones, and
    returns the results of the requests that finished in it.
    """

    def __init__(self, model, tokenizer, *, batch_size: int, context_length: int | None = None,
                 planned_tokens: int | None = None,
                 prefill_batch_size: int | None = None, prefill_step_size: int | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.context_length = context_length
        # Prompt + completion tokens a sequence may hold within the memory the worker
        # planned for (worker/memory.py); a request that asks for more fails alone at
        # admission instead of growing the KV cache past the plan (an out-of-memory
        # kill takes the whole batch down, again at every restart).
        self.planned_tokens = planned_tokens
        self.prefixes = prefix_cache
        self.eos = set(tokenizer.eos_token_ids)
        self._token_bytes = None  # built when a request first asks for log-probabilities
        self.grammars = Grammars(tokenizer, _vocab_size(model, tokenizer))
        self.thinking = Thinking.of(tokenizer)
        # A freed slot is refilled at once, and a long prefill never stalls the decode
        # of the others for more than one bounded chunk per step.
        default_batch, default_step = prefill_settings(batch_size)
        self.generator = CohortBatchGenerator(
            model,
            stop_tokens=[[t] for t in self.eos],
            completion_batch_size=batch_size,
            prefill_batch_size=prefill_batch_size or default_batch,
            prefill_step_size=prefill_step_size or default_step,
        )
        use_logits_step(self.generator)  # no vocabulary log-softmax per step
        self.live: dict[int, Live] = {}
        # Finished samples of requests with n > 1, until all n are: request id -> choices.
        self.choices: dict[int, list[dict | None]] = {}
        # Requests that were in a batch when a step raised: rerun one at a time, so
        # the one that breaks fails alone and the others complete.
        self.suspects: list[Claimed] = []
        # Live requests were admitted apart (lost with a dead worker): nothing joins
        # them until they finish, so if one kills the process it takes no others.
        self.isolated = False
        self.steps = 0
        self.occupied = 0  # sum over decode steps of live sequences
        self.prompt_tokens_computed = 0  # prefilled here (shared prefixes count once)

    @property
    def busy(self) -> bool:
        return bool(self.live)

    def free_slots(self) -> int:
        if self.suspects or (self.isolated and self.live):
            return 0
        return self.batch_size - len(self.live)

    # -- requests in ---------------------------------------------------------------

    def encode(self, claimed: Claimed) -> list[int]:
        """The prompt tokens of a request, with the chat template where it applies."""
        tok = self.tokenizer
        if claimed.kind == "completion":
            text = claimed.body
            add_bos = tok.bos_token is None or not text.startswith(tok.bos_token)
            return tok.encode(text, add_special_tokens=add_bos)
        messages = list(claimed.body)
        if claimed.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": claimed.system})
        if not getattr(tok, "has_chat_template", False) and not tok.chat_template:
            if len(messages) == 1 and messages[0]["role"] == "user":
                return tok.encode(messages[0]["content"])
            raise RequestError("this model has no chat template: submit raw prompts (--raw)")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def add(self, batch: list[Claimed], *, isolated: bool = False) -> list[Result]:
        """Put requests into the generator; returns results of those that cannot run.

        ``isolated``: run these apart; no other request is admitted until they finish.
        """
        self.isolated = isolated
        failed, ready = [], []
        now = time.time()
        for c in batch:
            try:
                tokens = self.encode(c)
                spec = c.params.get("response_format")
                n = c.params.get("n") or 1
                opened = (self.thinking.opened_by(tokens)
                          if self.thinking and c.kind == "chat" else None)
                ready.append((c, tokens, self._budget(c, len(tokens)), opened,
                              [self.grammars.constraint(spec, self._gate(opened)) if spec
                               else None for _ in range(n)]))
            except Exception as exc:  # one bad request never stops the others
                failed.append(Result(c.id, c.job_id, now, now, error=f"{exc}"))
        if not ready:
            return failed
        shared = self._shared_prefixes([tokens for _, tokens, _, _, _ in ready])
        prompts, budgets, samplers, stops, caches, history = [], [], [], [], [], []
        lives = []
        for (c, tokens, budget, opened, constraints), hit in zip(ready, shared):
            p = c.params
            temperature = p.get("temperature") or 0.0
            prefix, cache = hit if hit else ([], None)
            cached = len(prefix)  # taken from a shared prefix's cache
            if len(constraints) > 1:  # n samples: the prompt is computed once, then copied
                prefix, cache = tokens[:-1], prefilled(self.model, tokens[:-1])
                self.prompt_tokens_computed += len(prefix)
                cached = 0
            for choice, constraint in enumerate(constraints):
                prompts.append(tokens[len(prefix):])
                self.prompt_tokens_computed += len(prompts[-1])
                caches.append(cache)
                history.append(prefix)
                budgets.append(budget)
                sampler = (seeded_sampler(temperature, p.get("top_p") or 1.0,
                                          choice_seed(p.get("seed"), choice))
                           if temperature > 0 else None)
                asks = p.get("logprobs") is not None
                samplers.append(RowSampler(sampler, logprobs=asks, constraint=constraint)
                                if asks or constraint else sampler)
                stops.append(make_stop_sequences(self.tokenizer, p.get("stop") or ()))
                lives.append(Live(c, len(tokens), cached,
                                  tuple(p.get("stop") or ()), now,
                                  top_logprobs=p.get("logprobs"), choice=choice, opened=opened))
            if len(constraints) > 1:
                self.choices[c.id] = [None] * len(constraints)
        uids = self.generator.insert(prompts, budgets, caches=caches, all_tokens=history,
                                     samplers=samplers, stop_sequences=stops)
        for uid, live in zip(uids, lives):
            if live.stops:
                live.detokenizer = self.tokenizer.detokenizer
            self.live[uid] = live
        return failed

    def _gate(self, opened: bool | None) -> ThinkingGate | None:
        return None if opened is None else ThinkingGate(self.thinking, opened)

    def _shared_prefixes(self, prompts: list[list[int]]) -> list:
        """For each prompt, (prefix, cache) of a stored shared prefix, or None."""
        if self.prefixes is None:
            return [None] * len(prompts)
        self.prefixes.learn(prompts)
        return [self.prefixes.lookup(t) for t in prompts]

    def _budget(self, c: Claimed, prompt_len: int) -> int:
        budget = int(c.params.get("max_tokens") or settings.DEFAULT_MAX_TOKENS)
        if self.context_length:
            room = self.context_length - prompt_len
            if room <= 0:
                raise RequestError(
                    f"the prompt is {prompt_len} tokens and the model's context window is "
                    f"{self.context_length}: shorten it"
                )
            budget = min(budget, room)
        if self.planned_tokens and prompt_len + budget > self.planned_tokens:
            raise RequestError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({budget}) is more than "
                f"the {self.planned_tokens} tokens a sequence may hold in the memory this "
                "worker planned for: lower max_tokens, or start the worker with a larger "
                "--max-context"
            )
        return budget

    # -- results out -----------------------------------------------------------------

    def step(self) -> list[Result]:
        """One generator step; returns the results of requests that finished in it."""
        if not self.live and self.suspects:
            self._admit_suspect()
        try:
            _, responses = self.generator.next()
        except Exception as exc:
            return self._after_failed_step(exc)
        now = time.time()
        if responses:
            self.steps += 1
            self.occupied += len(responses)  # sequences in this decode step
        finished = []
        for r in responses:
            live = self.live.get(r.uid)
            if live is None:
                continue
            if live.first_token_at is None:
                live.first_token_at = now
            live.tokens.append(r.token)
            if live.top_logprobs is not None:
                live.picked.append(logprobs.pick(r.logprobs, r.token, live.top_logprobs))
            reason = r.finish_reason
            if reason is None and live.stops and self._hit_text_stop(live, r.token):
                self.generator.remove([r.uid])
                reason = "stop"
            if reason is not None:
                del self.live[r.uid]
                result = self._result(live, reason, now)
                if result is not None:
                    finished.append(result)
        return finished

    def _hit_text_stop(self, live: Live, token: int) -> bool:
        # Stop texts can straddle token boundaries that mlx-lm's token-level
        # matcher does not see; check the decoded text as it grows.
        live.detokenizer.add_token(token)
        text = live.detokenizer.text
        window = max(len(s) for s in live.stops) + 16
        return any(s in text[-window:] for s in live.stops)

    def _result(self, live: Live, reason: str, now: float) -> Result | None:
        """The request's result, or None while others of its n samples still run."""
        tokens = live.tokens
        if reason == "stop" and tokens and tokens[-1] in self.eos:
            tokens = tokens[:-1]  # the end-of-sequence token is not part of the text
        reasoning, answer = None, 0  # the answer's first token, past any thinking
        span = self.thinking.split(tokens, live.opened) if live.opened is not None else None
        if span:
            thought = tokens[span[0]:span[1]]
            if tuple(thought[-len(self.thinking.end):]) == self.thinking.end:
                thought = thought[:-len(self.thinking.end)]
            reasoning, answer = self.tokenizer.decode(thought).strip(), span[1]
        text = self.tokenizer.decode(tokens[answer:])
        cut = [text.find(s) for s in live.stops if s in text]
        if cut:  # the API's meaning: end before the stop text, never include it
            text, reason = text[: min(cut)], "stop"
        choice = {"text": text, "finish_reason": reason, "completion_tokens": len(live.tokens),
                  "first_token_at": live.first_token_at, "reasoning": reasoning,
                  "logprobs": self._logprobs(live, tokens, answer,
                                             len(text.encode()) if cut else None)}
        c = live.claimed
        choices = [choice]
        if c.id in self.choices:
            choices = self.choices[c.id]
            choices[live.choice] = choice
            if None in choices:
                return None
            del self.choices[c.id]
        first = choices[0]
        return Result(
            c.id, c.job_id, live.started_at, now,
            first_token_at=min(ch["first_token_at"] for ch in choices),
            response=first["text"], finish_reason=first["finish_reason"],
            prompt_tokens=live.prompt_tokens, cached_tokens=live.cached_tokens,
            completion_tokens=sum(ch["completion_tokens"] for ch in choices),
            logprobs=first["logprobs"], reasoning=first["reasoning"],
            choices=[{k: ch[k] for k in ("text", "finish_reason", "logprobs", "reasoning",
                                         "completion_tokens")} for ch in choices]
            if len(choices) > 1 else None,
        )

    def _logprobs(self, live: Live, tokens: list[int], answer: int,
                  size: int | None) -> list | None:
        """The answer's tokens (from ``answer``: past the thinking) with their
        log-probabilities, if the request asked; those past a stop text (``size`` bytes
        of text kept) are left out with it."""
        if live.top_logprobs is None:
            return None
        if self._token_bytes is None:
            self._token_bytes = logprobs.token_bytes(self.tokenizer)
        tokens = tokens[answer:]
        if size is not None:
            tokens = tokens[:logprobs.tokens_within(self._token_bytes, tokens, size)]
        return logprobs.entries(self._token_bytes, tokens, live.picked[answer:])

    def _after_failed_step(self, exc: Exception) -> list[Result]:
        now = time.time()
        self.generator.remove(list(self.live))
        lives = {live.claimed.id: live for live in self.live.values()}  # n samples: once
        held = [live.claimed for live in lives.values()]
        self.live.clear()
        self.choices.clear()
        if len(held) == 1:  # alone in the step (a suspect rerun alone, say): its own fault
            live = next(iter(lives.values()))
            c = live.claimed
            log.warning("request %s failed: %r", c.id, exc)
            return [Result(c.id, c.job_id, live.started_at, now,
                           first_token_at=live.first_token_at, error=f"generation failed: {exc}")]
        log.warning("a batch step failed (%r); rerunning its %d requests one at a time",
                    exc, len(held))
        self.suspects.extend(held)
        return []

    def _admit_suspect(self) -> None:
        c = self.suspects.pop(0)
        failed = self.add([c])
        if failed:  # cannot happen twice in a row; keep the result path uniform
            self.suspects.insert(0, c)

    def remove(self, request_ids: set[int]) -> list[Claimed]:
        """Take requests out of the generator (cancelled, or put back); returns them."""
        uids = [u for u, live in self.live.items() if live.claimed.id in request_ids]
        self.generator.remove(uids)
        out = list({c.id: c for c in (self.live.pop(u).claimed for u in uids)}.values())
        for c in out:
            self.choices.pop(c.id, None)
        out += [c for c in self.suspects if c.id in request_ids]
        self.suspects = [c for c in self.suspects if c.id not in request_ids]
        return out

    def held(self) -> list[Claimed]:
        """Every request the engine holds (live or waiting to be rerun)."""
        live = {live.claimed.id: live.claimed for live in self.live.values()}  # n samples: once
        return list(live.values()) + list(self.suspects)

    def counters(self) -> dict:
        """What the engine did since it started, for the worker's heartbeat."""
        built = self.prefixes.built_tokens if self.prefixes else 0
        return {"decode_steps": self.steps, "sequences_decoded": self.occupied,
                "prompt_tokens_computed": self.prompt_tokens_computed + built}

    def occupancy(self) -> float | None:
        """Mean live sequences per decode step, over the batch size."""
        return self.occupied / (self.steps * self.batch_size) if self.steps else None

    def close(self) -> None:
        self.generator.close()
