"""The cloud LM's one decoding thread, shared by the requests in flight to cloud/server.py.

A request's thread queues its batch (`Batcher.generate`, `generate.generate`'s arguments but the
model) and waits; the decoding thread merges the batches waiting whose end ids, scaffold and top-p
agree into one left-padded batch, decodes it with one `generate.generate` and hands each request
its own rows. Each reply draws from its own generator, so it is the reply its request gets alone.
A production server (vLLM) also lets requests join a batch already running, at any step; here a
request waits for the batch in progress to end."""
import threading
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import generate


class Batcher:
    """`generate` (on a request's thread; a generator per reply) queues a batch and waits; the
    decoding thread (`start`) waits `linger` seconds for more, takes the batches that agree, up to
    max_batch replies (at least one batch), and gives each its rows back, as long as it would have
    had alone. `most`: the most batches decoded together so far."""
    def __init__(self, model, max_batch: int, linger: float = 0.02):
        self.model, self.max_batch, self.linger, self.most = model, max_batch, linger, 0
        self.waiting, self.ready = [], threading.Condition()

    def start(self) -> "Batcher":
        threading.Thread(target=self.loop, name="decoder", daemon=True).start()
        return self

    def generate(self, ids, max_new_tokens: int, temperature, attention_mask=None, generator=None, copies=None,
                 eos_token_id=..., scaffold=None, scaffold_tokens: int = 0, top_p: float = 1.0):
        copies = [1] * len(ids) if copies is None else [int(c) for c in copies]
        R = sum(copies)
        if not isinstance(generator, list) or len(generator) != R:
            raise ValueError("Batcher.generate: one generator per reply")
        job = SimpleNamespace(
            ids=ids, mask=torch.ones_like(ids) if attention_mask is None else attention_mask, copies=copies,
            budget=[max_new_tokens] * R, second=[scaffold_tokens] * R, generator=generator,
            temperature=torch.as_tensor(temperature, dtype=torch.float).expand(R),
            key=(eos_token_id, scaffold, top_p), done=threading.Event(), out=None, error=None)
        with self.ready:
            self.waiting.append(job)
            self.ready.notify()
        job.done.wait()
        if job.error is not None:
            raise RuntimeError(f"decoding failed: {job.error}") from job.error
        return job.out

    def loop(self):
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.waiting)
            time.sleep(self.linger)  # requests sent together arrive a few milliseconds apart: let them join
            with self.ready:
                jobs, rest, rows, key = [], [], 0, self.waiting[0].key
                for job in self.waiting:  # by position, never by ==: a job holds tensors
                    if job.key == key and (not jobs or rows + len(job.budget) <= self.max_batch):
                        jobs.append(job)
                        rows += len(job.budget)
                    else:
                        rest.append(job)
                self.waiting = rest
            self.most = max(self.most, len(jobs))
            try:
                self.decode(jobs)
            except Exception as e:  # a model failure: its requests get a 500, the loop goes on
                traceback.print_exc()
                for job in jobs:
                    job.error = e
            for job in jobs:
                job.done.set()

    def decode(self, jobs):
        """The jobs' prompts left-padded to the longest, one `generate.generate`, each job its rows."""
        T = max(job.ids.shape[1] for job in jobs)
        eos, scaffold, top_p = jobs[0].key

        def joined(name):
            return [x for job in jobs for x in getattr(job, name)]
        out = generate.generate(
            self.model, torch.cat([F.pad(job.ids, (T - job.ids.shape[1], 0)) for job in jobs]), joined("budget"),
            torch.cat([job.temperature for job in jobs]), top_p, eos_token_id=eos,
            attention_mask=torch.cat([F.pad(job.mask, (T - job.mask.shape[1], 0)) for job in jobs]),
            generator=joined("generator"), copies=joined("copies"), scaffold=scaffold, scaffold_tokens=joined("second"))
        ids, resumed = out if scaffold else (out, None)
        start = 0
        for job in jobs:  # its rows, from its own prompt's length on, as long as it would have run alone
            rows, T_job = slice(start, start + len(job.budget)), job.ids.shape[1]
            length = T_job + job.budget[0] + (max(map(len, scaffold.values())) + job.second[0] if scaffold else 0)
            job.out = ids[rows, T - T_job:][:, :length]
            job.out = (job.out, resumed[rows]) if scaffold else job.out
            start += len(job.budget)
