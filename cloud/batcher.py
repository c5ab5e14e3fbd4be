"""The cloud LM's one decoding loop, shared by the requests in flight to cloud/server.py.

A request's thread queues a job (`Batcher.generate`, `generate.generate`'s arguments but the
model) and waits. The decoding loop (the server's main thread) keeps one running batch
(`generate.Replies`) and decodes it a token a step, as vLLM's scheduler does:
- continuous batching: between two steps, the waiting jobs are let in oldest first, as long as
  their replies fit beside the live ones (--max-batch); none passes an older one;
- chunked prefill: a job let in is prefilled `chunk` prompt tokens a step, in a cache of its
  own, and joins the running batch (`join`) once its whole prompt is in, so a long prompt
  delays the others' steps by a chunk's time, not by its whole prefill;
- per job: a job whose prefill raises, or whose logits cannot be sampled, fails alone; a
  cancelled job (its client gone) leaves at the next step; a job whose replies have all ended
  gets them at once. Only a step that fails as a whole fails the batch's jobs.
Each reply draws from its own generator and carries its own end ids, scaffold and top-p, so
any requests share a batch and each reply is the one its request gets alone, to float rounding:
a batch's products are summed in another order (MKL chooses its kernel by the number of rows;
`FewRowLinear` puts the weight on the left), which moves a logit by about 1e-6 and may, rarely,
move a draw that falls on the edge between two tokens. vLLM's batches have the same caveat."""
import threading
import time
import traceback
from types import SimpleNamespace

import torch
from torch import nn

from generate import Replies
from qwen2 import KVCache

# the per-reply lists of `generate.Replies` that `join` carries over (tests/test_batcher.py
# checks that it names every one)
PER_REPLY = ("generator", "budget", "second", "cap", "new", "resumed", "spent", "phase", "forced",
             "ends", "fill", "scaffold", "top_p", "labels")


class Cancelled(Exception):
    """The job's client is gone: the job left the batch unfinished."""


class FewRowLinear(nn.Linear):
    """nn.Linear computing a few rows x (R, in), 1 < R <= MAX_ROWS, as (W @ x^T)^T: the same
    products with the weight on the left. A decoding step multiplies each weight by one row a
    reply; on the CPU in fp32, x @ W^T with 2 to 16 rows costs far more than one row's (RESULTS.md,
    the cloud service). Both x and the result are kept row-major: x^T is then a transposed view,
    which MKL multiplies fast; x^T stored contiguous (a column-major x: the transposed product of the
    layer before, passed on through the MLP's product and the residual) takes a much slower kernel."""
    MAX_ROWS = 16

    def forward(self, x):
        rows = x.shape[:-1].numel()
        if not 1 < rows <= self.MAX_ROWS or x.device.type != "cpu" or self.weight.dtype != torch.float32:
            return super().forward(x)
        y = (self.weight @ x.reshape(rows, -1).contiguous().T).T.contiguous()
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def few_rows(model: nn.Module) -> nn.Module:
    """The model's nn.Linear layers made FewRowLinear in place: the same weights and names, a few
    rows computed faster (the service's arithmetic, for a comparison in process)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowLinear
    return model


def join(a: Replies, b: Replies, keep: list[int]) -> None:
    """b's replies join a's batch. a keeps the state of its replies `keep` (every live one among
    them), renumbered 0, 1, ... in that order; b's follow. Both caches are right-aligned in a new
    one as long as the longer: the shorter's rows are padded on the left and masked, so each row
    attends to what it did alone, at its own positions. Everything is built before a changes:
    a failure leaves a as it was."""
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
    live = [renumbered[i] for i in a.live] + [len(keep) + i for i in b.live]
    logits = torch.cat([a.logits, b.logits])
    temperature = torch.cat([a.temperature[keep], b.temperature])
    lists = {name: [getattr(a, name)[i] for i in keep] + getattr(b, name) for name in PER_REPLY}
    a.cache, a.mask, a.live, a.logits, a.temperature = cache, mask, live, logits, temperature
    for name, values in lists.items():
        setattr(a, name, values)


# Prompt tokens a job prefills between two decoding steps of the batch: smaller, a chat request
# beside a long upload waits less and the upload takes longer (RESULTS.md: the cloud service under
# hostile and abandoned requests, measured at 16, 32, 128 and unchunked).
PREFILL_CHUNK = 32


class Batcher:
    """`generate` (on a request's thread; a generator per reply) queues a job and waits; `loop`
    (on the thread that loaded the model; `start`: a thread of its own) decodes the running batch
    a step at a time, prefilling the jobs let in `chunk` prompt tokens a step each, up to
    max_batch live replies, and hands each request its rows as `generate.generate` would have.
    When idle it waits `linger` seconds for requests sent together. `most`: the most requests
    decoded together so far; `counts`: the jobs answered, failed and cancelled so far."""
    def __init__(self, model, max_batch: int, chunk: int = PREFILL_CHUNK, linger: float = 0.02,
                 poll: float = 0.2):
        few_rows(model)
        self.model, self.max_batch, self.chunk = model, max_batch, chunk
        self.linger, self.poll = linger, poll
        self.most, self.counts = 0, {"answered": 0, "failed": 0, "cancelled": 0}
        self.waiting, self.ready = [], threading.Condition()

    def start(self) -> "Batcher":
        threading.Thread(target=self.loop, name="decoder", daemon=True).start()
        return self

    def generate(self, ids, max_new_tokens: int, temperature, attention_mask=None, generator=None, copies=None,
                 eos_token_id=..., scaffold=None, scaffold_tokens: int = 0, top_p: float = 1.0,
                 gone=None, labels=None):
        """`generate.generate(model, ...)` decoded in the shared batch. gone: a callable polled
        while waiting; once it says the client is gone the job is cancelled (raises Cancelled)."""
        copies = [1] * len(ids) if copies is None else [int(c) for c in copies]
        R = sum(copies)
        if not isinstance(generator, list) or len(generator) != R:
            raise ValueError("Batcher.generate: one generator per reply")
        job = SimpleNamespace(
            ids=ids, mask=torch.ones_like(ids) if attention_mask is None else attention_mask, copies=copies,
            budget=max_new_tokens, second=scaffold_tokens, generator=generator, R=R,
            eos=eos_token_id, scaffold=scaffold, top_p=top_p, labels=labels,
            temperature=torch.as_tensor(temperature, dtype=torch.float).expand(R),
            done=threading.Event(), out=None, error=None, first=0, replies=None, cancelled=False)
        with self.ready:
            self.waiting.append(job)
            self.ready.notify()
        while not job.done.wait(None if gone is None else self.poll):
            if gone():
                job.cancelled = True  # the loop drops it at its next step
                raise Cancelled("the client is gone")
        if job.error is not None:
            raise RuntimeError(f"decoding failed: {job.error}") from job.error
        return job.out

    def take(self, rows: int) -> list:
        """The oldest waiting jobs whose replies fit beside `rows` replies (one at least when none
        runs), in order: the first that does not fit stops the others, so none waits forever."""
        with self.ready:
            jobs = []
            while self.waiting and (rows == 0 or rows + self.waiting[0].R <= self.max_batch):
                jobs.append(self.waiting.pop(0))
                rows += jobs[-1].R
        return jobs

    def loop(self):
        """Forever: when idle, wait for requests; then a step of the batch (`step`)."""
        batch, running, filling = None, [], []  # the running Replies, its jobs (replies numbered in
        while True:  # this order), the jobs being prefilled
            if batch is None and not filling:
                with self.ready:
                    self.ready.wait_for(lambda: self.waiting)
                time.sleep(self.linger)  # requests sent together arrive a few milliseconds apart: let them in
            try:
                with torch.inference_mode():
                    batch, running, filling = self.step(batch, running, filling)
            except Exception as e:  # the step of all (or a bug): it fails the batch's jobs
                traceback.print_exc()
                for job in running + filling:
                    if not job.done.is_set():
                        self.end(job, e)
                batch, running, filling = None, [], []

    def step(self, batch: Replies | None, running: list, filling: list) -> tuple:
        """Drop the cancelled; let in the waiting that fit; prefill a chunk of each job let in (a
        prefilled one joins); drop the jobs whose logits cannot be sampled; one step of the batch;
        answer the jobs whose replies have all ended. -> the new (batch, running, filling)."""
        batch, running, filling = self.drop_cancelled(batch, running, filling)
        rows = (len(batch.live) if batch else 0) + sum(job.R for job in filling)
        filling = filling + self.take(rows)
        for job in list(filling):
            ready = self.prefill(job)
            if ready or job.error is not None:  # out by identity: == would compare tensors
                filling = [other for other in filling if other is not job]
            if ready:
                batch, running = self.admit(batch, running, job)
        if batch is not None and batch.live:
            self.drop_unsampleable(batch, running)
        if batch is not None and batch.live:
            batch.step()
        self.most, still = max(self.most, len(running)), []
        live = set(batch.live) if batch else set()
        for job in running:  # a request whose replies have all ended gets them now
            if live & set(replies(job)):
                still.append(job)
            elif not job.done.is_set():
                self.finish(batch, job)
        return (batch, still, filling) if still else (None, [], filling)

    def prefill(self, job) -> bool:
        """The job's next chunk of prompt tokens into its own cache; True once its replies are
        ready. A failure (its prefill alone) fails the job: False, its error set."""
        try:
            if job.replies is None:
                ids, mask = job.ids, job.mask
                job.replies = Replies(
                    self.model, ids, job.budget, job.temperature, job.top_p, job.eos, mask,
                    job.generator, job.copies, job.scaffold, job.second, job.labels, prefill=False)
            return job.replies.prefill(max(1, self.chunk // job.ids.shape[0]))
        except Exception as e:
            traceback.print_exc()
            self.end(job, e)
            job.replies = None
            return False

    def admit(self, batch: Replies | None, running: list, job) -> tuple:
        """The prefilled job joins the batch (the ended requests' replies dropped), its replies
        numbered after the running ones'. A failure to join fails the job alone."""
        new, job.replies = job.replies, None
        if batch is None:
            job.first = 0
            return new, [job]
        keep = [i for other in running for i in replies(other)]
        try:
            join(batch, new, keep)
        except Exception as e:
            traceback.print_exc()
            self.end(job, e)
            return batch, running
        first = 0
        for other in running + [job]:
            other.first, first = first, first + other.R
        return batch, running + [job]

    def drop_cancelled(self, batch, running, filling):
        """The cancelled jobs out: from the queue, the prefills, and their rows from the batch."""
        with self.ready:
            gone = [job for job in self.waiting if job.cancelled]
            self.waiting = [job for job in self.waiting if not job.cancelled]
        gone += [job for job in filling + running if job.cancelled and not job.done.is_set()]
        if not gone:
            return batch, running, filling
        self.leave(batch, [job for job in running if job.cancelled])
        for job in gone:
            self.end(job, Cancelled("the client is gone"))
        running = [job for job in running if not job.cancelled]
        return (batch if running else None), running, [job for job in filling if not job.cancelled]

    def drop_unsampleable(self, batch: Replies, running: list):
        """A job whose next-token logits hold a NaN or an inf, or are all -inf, fails alone: its
        rows leave before the step (`generate.sample` would raise for the whole batch)."""
        bad = (~torch.isfinite(batch.logits.amax(-1))).nonzero().squeeze(1).tolist()
        if bad:
            jobs = [job for job in running if {batch.live[j] for j in bad} & set(replies(job))]
            self.leave(batch, jobs)
            for job in jobs:
                self.end(job, ValueError("the model's logits hold a NaN or an inf: "
                                         "nothing can be sampled"))

    @staticmethod
    def leave(batch: Replies | None, jobs: list):
        """These jobs' live replies leave the batch."""
        ours = {i for job in jobs for i in replies(job)}
        if batch is not None and ours:
            batch.leave({j for j, i in enumerate(batch.live) if i in ours})

    def end(self, job, error: Exception):
        """The job fails (or is cancelled): its request is told, the counts kept."""
        job.error = error
        self.counts["cancelled" if isinstance(error, Cancelled) else "failed"] += 1
        job.done.set()

    def finish(self, batch: Replies, job):
        """The job's rows as `generate.generate` returns them alone: its prompts, its replies' new ids."""
        rows = torch.arange(len(job.copies)).repeat_interleave(torch.tensor(job.copies))
        job.out = torch.cat([job.ids[rows.to(job.ids.device)], batch.new_ids(replies(job))], 1)
        job.out = (job.out, [batch.resumed[i] for i in replies(job)]) if job.scaffold else job.out
        self.counts["answered"] += 1
        job.done.set()


def replies(job) -> range:
    """A request's replies' numbers in the running batch."""
    return range(job.first, job.first + job.R)
