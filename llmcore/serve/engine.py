"""Generation engines and the request scheduler behind the OpenAI-compatible server.

`Engine` is the small interface the server needs (prompt encoding, decoding, one token iterator per
request). `ModelEngine` wraps an llmcore model + tokenizer; tests use a fake engine.

`Scheduler` owns ONE worker thread that runs every generation, so the asyncio event loop never
blocks on the model. Active requests are interleaved token by token (round robin, at most
`max_active` at a time, the rest wait in a FIFO), so concurrent clients all stream at once. Each
produced token is detokenized incrementally (holding back incomplete UTF-8), checked against the
request's stop strings, and handed to the request's asyncio queue with `loop.call_soon_threadsafe`.
`Request.cancel()` (called when a client disconnects) makes the worker drop the request's token
iterator at its next step: generation stops and its KV cache is freed.
"""
from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import threading
import time
from typing import Any, Iterator, Sequence


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Engine(abc.ABC):
    """What the server needs from a model. Implementations need not be thread-safe: only the
    scheduler's worker thread calls `generate` / `decode`; `encode*` are called from the event loop."""

    model_id: str = "llmcore"
    max_seq_len: int = 512

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Plain-text prompt -> token ids."""

    @abc.abstractmethod
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """[{role, content}] -> token ids of the chat-templated prompt, ending with the assistant
        generation prompt."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (special tokens skipped)."""

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yields generated token ids one at a time; stops by itself at an end-of-sequence token
        (not yielded) or after params.max_tokens tokens. Closing the iterator frees its state."""


class ModelEngine(Engine):
    """llmcore model + tokenizer. `generate` is llmcore.model.generate.stream (KV cache, sampling);
    stop ids default to the tokenizer's eos (<|im_end|>, which ends every assistant turn)."""

    def __init__(self, model, tokenizer, model_id: str = "llmcore", max_seq_len: int | None = None,
                 stop_ids: Sequence[int] | None = None):
        import torch

        self.model = model.eval()
        self.tok = tokenizer
        self.model_id = model_id
        cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
        self.max_seq_len = int(max_seq_len or getattr(cfg, "max_seq_len", 0) or 512)
        if stop_ids is None:
            stop_ids = {i for i in (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "im_end_id", None))
                        if i is not None}
        self.stop_ids = sorted(stop_ids)
        self._torch = torch

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def encode_chat(self, messages):
        out = self.tok.apply_chat_template(list(messages), add_generation_prompt=True)
        if isinstance(out, str):
            return list(self.tok.encode(out))
        return list(out)

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompt_ids, params):
        from llmcore.model.generate import stream

        torch = self._torch
        gen = torch.Generator().manual_seed(int(params.seed)) if params.seed is not None else None
        room = self.max_seq_len - len(prompt_ids)
        # no `with no_grad()` here: generators of several requests interleave on the worker thread, so
        # a context manager held across yields would leak; stream_batch is itself a no_grad generator
        # (torch re-enters the mode around every step).
        yield from stream(self.model, list(prompt_ids), max_new_tokens=max(0, min(params.max_tokens, room)),
                          temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                          repetition_penalty=params.repetition_penalty, stop_tokens=tuple(self.stop_ids),
                          generator=gen)


@dataclasses.dataclass
class Event:
    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


class Request:
    """One generation request; consume `events` (an asyncio.Queue of Event) on the event loop."""

    def __init__(self, rid: int, prompt_ids: Sequence[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.id = rid
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        # worker-side state
        self.it: Iterator[int] | None = None
        self.out_ids: list[int] = []
        self.emitted = ""  # text already sent
        self.pending = ""  # decoded text held back (possible stop-string prefix)

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:  # loop closed: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """Runs all generations on one worker thread, interleaving active requests token by token."""

    def __init__(self, engine: Engine, max_active: int = 16):
        self.engine = engine
        self.max_active = max_active
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._next_id = 0
        self._stop = False
        self.stats = dict(submitted=0, finished=0, cancelled=0, tokens=0)
        self._thread = threading.Thread(target=self._run, name="llmcore-scheduler", daemon=True)
        self._thread.start()

    # ---- event-loop side ----
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._next_id += 1
            req = Request(self._next_id, prompt_ids, params, loop)
            self._waiting.append(req)
            self.stats["submitted"] += 1
            self._lock.notify()
        return req

    def num_running(self) -> int:
        with self._lock:
            return len(self._active) + len(self._waiting)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout)

    # ---- worker side ----
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._active:
                    self._lock.wait()
                if self._stop:
                    for r in self._active + list(self._waiting):
                        self._close(r)
                        r._put(Event("error", text="server shutting down"))
                    return
                while self._waiting and len(self._active) < self.max_active:
                    self._active.append(self._waiting.popleft())
                batch = list(self._active)
            for req in batch:
                done = self._step(req)
                if done:
                    with self._lock:
                        self._active.remove(req)

    def _close(self, req: Request) -> None:
        if req.it is not None and hasattr(req.it, "close"):
            try:
                req.it.close()
            except Exception:  # noqa: BLE001 - closing a broken generator must not kill the worker
                pass
        req.it = None
        req.finished.set()

    def _finish(self, req: Request, reason: str, flush: bool = True) -> bool:
        """Ends a request: with flush, sends whatever decoded text was held back (an incomplete
        UTF-8 tail decodes to U+FFFD, as a plain decode would give it), cut at a stop string."""
        tail = req.pending
        if flush:
            text = self.engine.decode(req.out_ids) if req.out_ids else ""
            if text.startswith(req.emitted):
                tail = text[len(req.emitted):]
            for st in req.params.stop:
                i = tail.find(st)
                if i >= 0:
                    tail, reason = tail[:i], "stop"
        req.pending = ""
        if tail:
            req.emitted += tail
            req._put(Event("delta", text=tail))
        self._close(req)
        self.stats["finished"] += 1
        req._put(Event("done", finish_reason=reason, completion_tokens=len(req.out_ids)))
        return True

    def _step(self, req: Request) -> bool:
        """Advances one request by one token; True when it is finished."""
        if req.cancelled.is_set():
            self._close(req)
            self.stats["cancelled"] += 1
            return True
        try:
            if req.it is None:
                if req.params.max_tokens <= 0:
                    return self._finish(req, "length")
                req.it = iter(self.engine.generate(req.prompt_ids, req.params))
            tok = next(req.it, None)
        except Exception as e:  # noqa: BLE001 - report to the client, keep serving others
            self._close(req)
            req._put(Event("error", text=f"{type(e).__name__}: {e}"))
            return True
        if tok is None:
            return self._finish(req, "stop")
        req.out_ids.append(int(tok))
        self.stats["tokens"] += 1
        text = self.engine.decode(req.out_ids)
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next byte token
            if len(req.out_ids) >= req.params.max_tokens:
                return self._finish(req, "length")
            return False
        new = text[len(req.emitted) + len(req.pending):] if text.startswith(req.emitted + req.pending) else None
        if new is None:  # detokenization changed earlier text (rare with byte-level BPE): resync
            new = text[len(req.emitted):] if text.startswith(req.emitted) else ""
            req.pending = ""
        buf = req.pending + new
        for s in req.params.stop:
            i = buf.find(s)
            if i >= 0:
                req.pending = buf[:i]
                return self._finish(req, "stop", flush=False)
        # hold back the longest suffix that is a prefix of some stop string
        hold = 0
        for s in req.params.stop:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, req.pending = (buf[:-hold], buf[-hold:]) if hold else (buf, "")
        if out:
            req.emitted += out
            req._put(Event("delta", text=out))
        if len(req.out_ids) >= req.params.max_tokens:
            return self._finish(req, "length")
        return False


class FakeEngine(Engine):
    """A deterministic stand-in model for tests and demos: the 'vocabulary' is bytes (id = byte
    value + 3; 0 pad, 1 bos, 2 eos); it answers with a fixed script (default: the prompt reversed,
    then 'eos'), sleeping `delay` seconds per token to look like real decoding."""

    def __init__(self, reply: str | None = None, delay: float = 0.0, max_seq_len: int = 256,
                 model_id: str = "fake", endless: bool = False):
        self.reply = reply
        self.delay = delay
        self.max_seq_len = max_seq_len
        self.model_id = model_id
        self.endless = endless
        self.generated = 0  # total tokens produced (thread: worker only)
        self.live = 0  # generators currently open
        self.max_live = 0  # most generators open at once (shows requests were interleaved)

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def encode_chat(self, messages):
        s = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.encode(s)

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def generate(self, prompt_ids, params):
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        try:
            if self.reply is not None:
                script = self.encode(self.reply)
            else:
                script = list(reversed([i for i in prompt_ids if i >= 3]))[:64]
            n = 0
            while True:
                for t in script:
                    if n >= params.max_tokens:
                        return
                    if self.delay:
                        time.sleep(self.delay)
                    self.generated += 1
                    n += 1
                    yield t
                if not self.endless:
                    return
        finally:
            self.live -= 1


def info(engine: Engine) -> dict[str, Any]:
    return dict(id=engine.model_id, max_seq_len=engine.max_seq_len)
