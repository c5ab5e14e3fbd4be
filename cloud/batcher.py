"""The cloud LM's one decoding loop, shared by the requests in flight to cloud/server.py.

A request's thread queues a job (`Batcher.generate`, `generate.generate`'s arguments but the
model) and waits. The decoding loop (the server's main thread) keeps one running batch
(`generate.Replies`) and decodes it a token a step, as vLLM's scheduler does:
- continuous batching: between two steps, the waiting jobs are let in oldest first, as long as
  their replies fit beside the live ones (--max-batch); none passes an older one;
- chunked prefill: a job let in is prefilled `chunk` prompt tokens a step, in a cache of its
  own, and joins the running batch (`join`) once its whole prompt is in, so a long prompt
  delays the others' steps by a chunk's time, not by its whole prefill. The chunks and the
  batch's step are one forward pass (`forward_together`): their rows share each weight's read;
- per job: a job whose prefill raises, or whose logits cannot be sampled, fails alone; a
  cancelled job (its client gone) leaves at the next step; a job whose replies have all ended
  gets them at once. Only a step that fails as a whole fails the batch's jobs.
Each reply draws from its own generator and carries its own end ids, scaffold and top-p, so
any requests share a batch and each reply is the one its request gets alone, to float rounding:
a batch's products are summed in another order (MKL chooses its kernel by the number of rows;
`FewRowLinear` puts the weight on the left; a cached prefix was computed in another pass), which
moves a logit by about 1e-6 and may, rarely, move a draw that falls on the edge between two
tokens. vLLM's batches have the same caveat."""
import threading
import time
import traceback
from collections import OrderedDict
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


def forward_together(model, parts: list[tuple]) -> list:
    """`model.model(ids, mask, cache)` for several batches (ids, mask, cache) in one pass: each
    block's attention runs per batch (its own cache and positions), its MLP once over all their
    rows. A decoding step beside a prompt's chunk so reads the MLP weights (most of the model's)
    once, not twice: vLLM's chunked prefill, which puts decoding tokens and prompt tokens in one
    pass. Each block is Block.forward's two residual halves."""
    m = model.model
    inputs = [m.inputs(ids, mask, cache) for ids, mask, cache in parts]
    xs = [x for x, *_ in inputs]
    for block in m.layers:
        xs = [x + block.self_attn(block.input_layernorm(x), cos, sin, mask, cache)
              for x, (_, cos, sin, mask), (*_, cache) in zip(xs, inputs, parts)]
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        rows = rows + block.mlp(block.post_attention_layernorm(rows))
        xs = [y.view(x.shape) for x, y in zip(xs, rows.split([x.shape[0] * x.shape[1] for x in xs]))]
    hidden = [m.norm(x) for x in xs]
    for ids, _, cache in parts:
        cache.seq_len += ids.shape[1]
    return hidden


class PrefixCache:
    """The keys and values of the last prompts prefilled (one prompt, no padding: a chat request),
    up to `tokens` positions in all, so that a new prompt starts from the longest prefix it shares
    with one of them: vLLM's automatic prefix caching (which shares blocks of 16 tokens; here any
    length). Attention is causal, so a position's keys and values depend on the tokens up to it
    alone: the shared prefix's are the ones the new prompt computes, to float rounding (they came
    from another pass). The k copies of an augmentation prompt that --cloud-api sends as k requests,
    and the chat template and the paper's prompt that begin every one, are then prefilled once."""
    def __init__(self, tokens: int):
        self.tokens, self.entries = tokens, OrderedDict()  # ids (tuple) -> (ids, k, v), oldest first

    def load(self, r: Replies) -> int:
        """r's cache filled with the longest cached prefix of its prompt (its last token left to
        prefill, for the logits): the positions loaded."""
        if not self.cacheable(r):
            return 0
        ids, best, hit = r.input_ids[0], 0, None
        for key, (theirs, _, _) in self.entries.items():
            n = min(len(theirs), len(ids) - 1)
            differ = (theirs[:n] != ids[:n]).nonzero()
            shared = int(differ[0]) if len(differ) else n
            if shared > best:
                best, hit = shared, key
        if hit is not None:
            _, k, v = self.entries[hit]
            self.entries.move_to_end(hit)
            r.cache.k[:, :, :, :best], r.cache.v[:, :, :, :best] = k[:, :, :, :best], v[:, :, :, :best]
            r.cache.seq_len = best
        return best

    def store(self, r: Replies):
        """r's prompt (just prefilled) kept, unless it is already (a repeat: only made the newest);
        the oldest dropped past `tokens` positions."""
        ids, T = r.input_ids[0], r.input_ids.shape[1]
        if not self.cacheable(r) or T > self.tokens:
            return
        key = tuple(ids.tolist())
        if key not in self.entries:
            self.entries[key] = (ids, r.cache.k[:, :1, :, :T].clone(), r.cache.v[:, :1, :, :T].clone())
        self.entries.move_to_end(key)
        while sum(len(kept) for kept in self.entries) > self.tokens:
            self.entries.popitem(last=False)

    @staticmethod
    def cacheable(r: Replies) -> bool:
        """One prompt, not padded (a chat request): its positions are 0, 1, ... as in any other."""
        return r.input_ids.shape[0] == 1 and r.mask is None


# Prompt tokens a job prefills between two decoding steps of the batch: smaller, a chat request
# beside a long upload waits less and the upload takes longer (RESULTS.md: the cloud service under
# hostile and abandoned requests, measured at 16, 32, 128 and unchunked).
PREFILL_CHUNK = 32
# Prompt positions whose keys and values PrefixCache keeps (0: none)
PREFIX_TOKENS = 2048


class Batcher:
    """`generate` (on a request's thread; a generator per reply) queues a job and waits; `loop`
    (on the thread that loaded the model; `start`: a thread of its own) decodes the running batch
    a step at a time, prefilling the jobs let in `chunk` prompt tokens a step each (from the
    longest prefix cached, `PrefixCache`: `prefix` positions kept), up to max_batch live replies,
    and hands each request its rows as `generate.generate` would have.
    When idle it waits `linger` seconds for requests sent together. `most`: the most requests
    decoded together so far; `counts`: the jobs answered, failed and cancelled so far."""
    def __init__(self, model, max_batch: int, chunk: int = PREFILL_CHUNK, linger: float = 0.02,
                 poll: float = 0.2, prefix: int = PREFIX_TOKENS):
        few_rows(model)
        self.model, self.max_batch, self.chunk = model, max_batch, chunk
        self.prefixes = PrefixCache(prefix)
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
        """Drop the cancelled; let in the waiting that fit; drop the jobs whose logits cannot be
        sampled; the batch's next tokens drawn; one forward pass (`forward`) over them and a chunk
        of each job let in (a prefilled one joins); answer the jobs whose replies have all ended.
        -> the new (batch, running, filling)."""
        batch, running, filling = self.drop_cancelled(batch, running, filling)
        rows = (len(batch.live) if batch else 0) + sum(job.R for job in filling)
        filling = filling + [job for job in self.take(rows) if self.set_up(job)]
        if batch is not None and batch.live:
            self.drop_unsampleable(batch, running)
        if batch is not None and batch.live:
            batch.draw()
        decoding = batch is not None and bool(batch.live)
        outcomes = self.forward(([batch] if decoding else []) + [job.replies for job in filling])
        if decoding and isinstance(outcomes[0], Exception):  # the batch's own pass failed: its jobs fail
            for job in running:
                self.end(job, outcomes[0])
            batch, running = None, []
        self.most, still = max(self.most, len(running)), []
        live = set(batch.live) if batch else set()
        for job in running:  # a request whose replies have all ended gets them now
            if live & set(replies(job)):
                still.append(job)
            elif not job.done.is_set():
                self.finish(batch, job)
        batch, running = (batch, still) if still else (None, [])
        prefills = outcomes[decoding:]  # each filling job's: prefilled, not yet, or its exception
        for job, outcome in zip(filling, prefills):
            if isinstance(outcome, Exception):
                self.end(job, outcome)
            elif outcome:
                self.prefixes.store(job.replies)
                batch, running = self.admit(batch, running, job)
        return batch, running, [job for job, out in zip(filling, prefills) if out is False]

    def set_up(self, job) -> bool:
        """The job's replies set up (its cache allocated), to be prefilled; a failure fails it alone."""
        try:
            job.replies = Replies(self.model, job.ids, job.budget, job.temperature, job.top_p, job.eos,
                                  job.mask, job.generator, job.copies, job.scaffold, job.second,
                                  job.labels, prefill=False)
            self.prefixes.load(job.replies)
            return True
        except Exception as e:
            traceback.print_exc()
            self.end(job, e)
            return False

    def forward(self, parts: list[Replies]) -> list:
        """One forward pass (`forward_together`) over these replies' next inputs: the running
        batch's last tokens, each prefilling job's next `chunk` prompt positions (shared among its
        prompts). -> for each, whether it is prefilled, or the exception it raised: a failed pass is
        run again one batch at a time, so that a job's bad prompt fails that job alone."""
        if not parts:
            return []
        inputs = [r.inputs(max(1, self.chunk // r.input_ids.shape[0])) for r in parts]
        try:
            hidden = forward_together(self.model, [(ids, mask, r.cache) for (ids, mask), r in zip(inputs, parts)])
        except Exception:
            traceback.print_exc()
            hidden = [self.attempt(self.model.model, ids, mask, r.cache) for (ids, mask), r in zip(inputs, parts)]
        return [h if isinstance(h, Exception) else self.attempt(r.outputs, h) for r, h in zip(parts, hidden)]

    @staticmethod
    def attempt(f, *args):
        """f(*args), or the exception it raised."""
        try:
            return f(*args)
        except Exception as e:
            traceback.print_exc()
            return e

    def admit(self, batch: Replies | None, running: list, job) -> tuple:
        """The prefilled job joins the batch, its replies numbered after the running ones'. A
        failure to join fails the job alone."""
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
