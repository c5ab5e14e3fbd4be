"""The cloud LM's one decoding loop, shared by the requests in flight to cloud/server.py.

A request's thread queues its batch (`Batcher.generate`, `generate.generate`'s arguments but the
model) and waits. The decoding loop (the server's main thread) keeps one running batch
(`generate.Replies`) and decodes it a token a step; between two steps the requests waiting whose end ids, scaffold, top-p and labels agree
with it are prefilled and join it (`join`: continuous batching, as vLLM does), and a request whose
replies have all ended gets them at once. Each reply draws from its own generator, so it is the
reply its request gets alone."""
import threading
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from generate import Replies
from qwen2 import KVCache


class FewRowLinear(nn.Linear):
    """nn.Linear computing a few rows x (R, in), 1 < R <= MAX_ROWS, as (W @ x^T)^T: the same
    products with the weight on the left. A decoding step multiplies each weight by one row a
    reply; on the CPU in fp32, x @ W^T with 2 to 16 rows can cost twice one row's (RESULTS.md)."""
    MAX_ROWS = 16

    def forward(self, x):
        rows = x.shape[:-1].numel()
        if not 1 < rows <= self.MAX_ROWS or x.device.type != "cpu" or self.weight.dtype != torch.float32:
            return super().forward(x)
        y = (self.weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def join(a: Replies, b: Replies, keep: list[int]) -> None:
    """b's replies join a's batch. a keeps the state of its replies `keep` (every live one among
    them), renumbered 0, 1, ... in that order; b's follow. Both caches are right-aligned in a new
    one as long as the longer: the shorter's rows are padded on the left and masked, so each row
    attends to what it did alone, at its own positions."""
    n, rows = max(a.cache.seq_len, b.cache.seq_len), len(a.live) + len(b.live)
    room = max(x.cap[i] - len(x.new[i]) for x in (a, b) for i in x.live)  # the most steps left
    cache = KVCache(a.model.config, rows, n + room, a.cache.k.dtype, a.cache.k.device)
    mask = torch.ones(rows, n + room, dtype=torch.long, device=a.cache.k.device)
    for x, at in ((a, 0), (b, len(a.live))):
        s, rows_x = x.cache.seq_len, slice(at, at + len(x.live))
        for mine, theirs in ((cache.k, x.cache.k), (cache.v, x.cache.v)):
            mine[:, rows_x, :, :n - s] = 0  # padding: never attended to, but 0 * NaN would be NaN
            mine[:, rows_x, :, n - s:n] = theirs[:, :, :, :s]
        mask[rows_x, :n - s] = 0
        if x.mask is not None:
            mask[rows_x, n - s:n] = x.mask[:, :s]
    cache.seq_len = n
    renumbered = {old: new for new, old in enumerate(keep)}
    a.cache, a.mask, a.live = cache, mask, [renumbered[i] for i in a.live] + [len(keep) + i for i in b.live]
    a.logits, a.temperature = torch.cat([a.logits, b.logits]), torch.cat([a.temperature[keep], b.temperature])
    for name in Replies.PER_REPLY:
        setattr(a, name, [getattr(a, name)[i] for i in keep] + getattr(b, name))


class Batcher:
    """`generate` (on a request's thread; a generator per reply) queues a batch and waits; `loop`
    (on the thread that loaded the model; `start`: a thread of its own) decodes the running batch
    a step at a time, letting in the waiting batches that agree with it, up to max_batch live
    replies, and hands each request its rows as `generate.generate` would have. When idle it waits
    `linger` seconds for requests sent together. `most`: the most requests decoded together so far."""
    def __init__(self, model, max_batch: int, linger: float = 0.02):
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = FewRowLinear  # the same weights and names; a few rows computed faster
        self.model, self.max_batch, self.linger, self.most = model, max_batch, linger, 0
        self.waiting, self.ready = [], threading.Condition()

    def start(self) -> "Batcher":
        threading.Thread(target=self.loop, name="decoder", daemon=True).start()
        return self

    def generate(self, ids, max_new_tokens: int, temperature, attention_mask=None, generator=None, copies=None,
                 eos_token_id=..., scaffold=None, scaffold_tokens: int = 0, top_p: float = 1.0, labels=None):
        copies = [1] * len(ids) if copies is None else [int(c) for c in copies]
        R = sum(copies)
        if not isinstance(generator, list) or len(generator) != R:
            raise ValueError("Batcher.generate: one generator per reply")
        job = SimpleNamespace(
            ids=ids, mask=torch.ones_like(ids) if attention_mask is None else attention_mask, copies=copies,
            budget=[max_new_tokens] * R, second=[scaffold_tokens] * R, generator=generator,
            temperature=torch.as_tensor(temperature, dtype=torch.float).expand(R),
            key=(eos_token_id, scaffold, top_p, labels), done=threading.Event(), out=None, error=None, first=0)
        with self.ready:
            self.waiting.append(job)
            self.ready.notify()
        job.done.wait()
        if job.error is not None:
            raise RuntimeError(f"decoding failed: {job.error}") from job.error
        return job.out

    def take(self, batch, key) -> list:
        """The waiting jobs that agree with `key` and fit beside the batch's live replies (one at
        least into an empty batch). None join while the oldest waiting job cannot: the batch drains."""
        with self.ready:
            if batch is not None and self.waiting and self.waiting[0].key != key:
                return []
            jobs, rest, rows = [], [], len(batch.live) if batch else 0
            for job in self.waiting:  # by position, never by ==: a job holds tensors
                if job.key == key and (rows == 0 or rows + len(job.budget) <= self.max_batch):
                    jobs.append(job)
                    rows += len(job.budget)
                else:
                    rest.append(job)
            self.waiting = rest
        return jobs

    def loop(self):
        """Forever: when idle, wait for requests; let in those that can join; one step; answer the ended."""
        batch, running = None, []  # the running Replies; its requests, their replies numbered in this order
        while True:
            if batch is None:
                with self.ready:
                    self.ready.wait_for(lambda: self.waiting)
                time.sleep(self.linger)  # requests sent together arrive a few milliseconds apart: let them in
            jobs = self.take(batch, running[0].key if running else self.waiting[0].key)
            before, running = running, running + jobs  # from here a failure fails them all
            try:
                with torch.inference_mode():
                    batch = self.admit(batch, before, jobs) if jobs else batch
                    if batch.live:
                        batch.step()
            except Exception as e:  # a model failure: the requests in the batch get a 500, the loop goes on
                traceback.print_exc()
                for job in running:
                    job.error = e
                    job.done.set()
                batch, running = None, []
                continue
            self.most, live, still = max(self.most, len(running)), set(batch.live), []
            for job in running:  # a request whose replies have all ended gets them now
                if live & set(replies(job)):
                    still.append(job)
                else:
                    self.finish(batch, job)
            batch, running = (batch, still) if batch.live else (None, [])

    def admit(self, batch: Replies | None, running: list, jobs: list) -> Replies:
        """The jobs' prompts, left-padded to the longest, prefilled together and joined to the batch
        (the ended requests' replies dropped); each job's replies numbered after the running ones'."""
        T = max(job.ids.shape[1] for job in jobs)
        eos, scaffold, top_p, labels = jobs[0].key

        def joined(name):
            return [x for job in jobs for x in getattr(job, name)]
        new = Replies(
            self.model, torch.cat([F.pad(job.ids, (T - job.ids.shape[1], 0)) for job in jobs]), joined("budget"),
            torch.cat([job.temperature for job in jobs]), top_p, eos,
            torch.cat([F.pad(job.mask, (T - job.mask.shape[1], 0)) for job in jobs]),
            joined("generator"), joined("copies"), scaffold, joined("second"), labels)
        if batch is not None:
            join(batch, new, [i for job in running for i in replies(job)])
        first = 0
        for job in running + jobs:
            job.first, first = first, first + len(job.budget)
        return new if batch is None else batch

    @staticmethod
    def finish(batch: Replies, job):
        """The job's rows as `generate.generate` returns them alone: its prompts, its replies' new ids."""
        rows = torch.arange(len(job.copies)).repeat_interleave(torch.tensor(job.copies))
        job.out = torch.cat([job.ids[rows.to(job.ids.device)], batch.new_ids(replies(job))], 1)
        job.out = (job.out, [batch.resumed[i] for i in replies(job)]) if job.key[1] else job.out
        job.done.set()


def replies(job) -> range:
    """A request's replies' numbers in the running batch."""
    return range(job.first, job.first + len(job.budget))
