"""The on-device fine-tuning of eq. 6: Delta W_u = argmin CE(M_device | D_u + D_u^filtered).

`finetune` trains a model's LoRA adapters (lora.py) with cross-entropy on the response tokens,
each example encoded as the device will see it when it answers (`encode_example`: the chat
template and generation prompt, then the response and the end of turn; a prompt too long loses
the end of its user content, `fit_messages`). `nll` scores a model by the same loss on gold
answers. `response_loss` is a decoder's loss; an encoder-decoder (experiments/t5.py) and RKD-FT's
distillation (experiments/baselines.py) hand `finetune` their own: the seam they share."""
import math
import random
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import options

IGNORE = -100  # label of a token that carries no loss (prompt, padding)
MAX_GRAD_NORM = 1.0  # gradient clipping, as transformers' Trainer does by default


def fit_messages(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """The messages with the last user content shortened at its end so that the rendered prompt
    (template + generation prompt) takes at most `budget` tokens; as they are when they fit. One
    rule for training and answering: the template, the system text, the content's start (LaMP's
    instruction) and its trailing whitespace stay; the end of the review or article goes. Raises
    ValueError when the prompt without that content is already over `budget`."""
    def length(msgs):
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        return len(tokenizer.encode(prompt))
    over = length(messages) - budget
    if over <= 0:
        return messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"the prompt takes {over + budget} tokens > {budget} and has no user "
                         "content to shorten")
    i = users[-1]
    body = messages[i]["content"].rstrip()
    tail = messages[i]["content"][len(body):]
    ids = tokenizer.encode(body)
    keep = len(ids) - over
    while True:  # a cut can re-tokenize differently at its edge: measure again, cut again
        kept = tokenizer.decode(ids[:keep]).rstrip() if keep > 0 else ""
        fitted = messages[:i] + [{**messages[i], "content": kept + tail}] + messages[i + 1:]
        over = length(fitted) - budget
        if over <= 0:
            return fitted
        if keep <= 0:
            raise ValueError(f"the chat template and the other messages alone take {over + budget} "
                             f"tokens, more than the {budget} allowed; raise --max-length")
        keep -= over


def encode_example(tokenizer, messages: list[dict], response: str,
                   max_length: int) -> tuple[list[int], int]:
    """One training example -> (token ids, number of prompt tokens): the chat template with the
    generation prompt (what the model sees when it answers), then the response and the end of turn
    (what it must produce). Past `max_length` the prompt gets max(max_length - response tokens,
    max_length // 2) tokens (`fit_messages`) and the response the rest."""
    end = tokenizer.encode(tokenizer.end_of_turn)  # <|im_end|> (ChatML), </s> (T5)
    if len(end) != 1:
        raise ValueError(f"tokenizer encodes {tokenizer.end_of_turn!r} as {end}, not as one "
                         "special token")
    answer = tokenizer.encode(response) + end
    messages = fit_messages(tokenizer, messages, max(max_length - len(answer), max_length // 2))
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return prompt + answer[: max_length - len(prompt)], len(prompt)


def finetune(model: nn.Module, tokenizer, examples: list[tuple[list[dict], str]],
             settings: options.Settings, seed: int = 0, desc: str | None = None,
             loss=None) -> list[float]:
    """Eq. 6: train the model's trainable (LoRA) parameters with cross-entropy on the response
    tokens of `examples` [(ChatML messages, response)]; each epoch's mean loss. `settings`:
    epochs, lr, batch_size, max_length. `loss(model, ids, labels)`: default `response_loss`.

    Seeded shuffled batches, right-padded, logits only where a label is, AdamW without weight
    decay, gradients clipped to norm 1. A NaN/inf loss or gradient, or a loss above 2 max(first
    batch's loss, ln V), raises FloatingPointError before the step, so no broken adapter is saved.
    No autocast: an NF4 base already computes in bf16; only the rank-r LoRA matmuls run in fp32."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters; call "
                         "lora.add_lora(model) first")
    if not examples:
        raise ValueError("finetune: no training examples")
    max_length, batch_size = settings.max_length, settings.batch_size
    encoded = [encode_example(tokenizer, messages, response, max_length)
               for messages, response in examples]
    cut = sum(len(ids) >= max_length for ids, _ in encoded)
    if cut:
        print(f"finetune: {cut} of {len(encoded)} examples reach max_length={max_length}; "
              "user contents cut at their end (see train.fit_messages)", file=sys.stderr)
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    loss_of = loss or response_loss
    rng = random.Random(seed)
    torch.manual_seed(seed)  # LoRA dropout
    batches_per_epoch = math.ceil(len(encoded) / batch_size)
    was_training = model.training
    model.train()
    epoch_losses, limit = [], None
    total = settings.epochs * batches_per_epoch
    with tqdm(total=total, desc=desc or "fine-tune", unit="batch") as bar:
        for epoch in range(settings.epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            total = 0.0
            for i in range(batches_per_epoch):
                batch = [encoded[j] for j in order[i * batch_size:(i + 1) * batch_size]]
                ids, labels = right_pad(batch, tokenizer.pad_token_id, device)  # (B, T) each
                value = loss_of(model, ids, labels)
                if limit is None:  # twice the first loss, or twice that of uniform guessing
                    limit = 2 * max(value.item(), math.log(model.config.vocab_size))
                check_loss(value, limit, f"epoch {epoch + 1}, batch {i + 1}")
                value.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                if not torch.isfinite(norm):
                    raise FloatingPointError(f"finetune: gradient norm is {norm.item()} at epoch "
                                             f"{epoch + 1}, batch {i + 1}; lower lr={settings.lr}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += value.item()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value.item():.3f}")
            epoch_losses.append(total / batches_per_epoch)
    model.train(was_training)
    return epoch_losses


def right_pad(batch: list[tuple[list[int], int]], pad_token_id: int, device="cpu"):
    """[(ids, n_prompt), ...] -> ids (B, T_max), labels (B, T_max): labels are the ids on the
    response tokens and IGNORE on the prompt and the padding."""
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    for row, (tokens, n_prompt) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, n_prompt: len(tokens)] = torch.tensor(tokens[n_prompt:])
    return ids.to(device), labels.to(device)


def response_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (t predicts labels[t + 1]), only
    they through the head (fp32 logits)."""
    hidden = model.model(ids)  # (B, T, H)
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])  # (N, V), N = response tokens in the batch
    return F.cross_entropy(logits.float(), target[keep])


def check_loss(loss: torch.Tensor, limit: float, where: str) -> None:
    if not torch.isfinite(loss) or loss.item() > limit:
        raise FloatingPointError(f"finetune: loss {loss.item()} at {where} (NaN/inf or above "
                                 f"{limit:.1f}): training diverged; lower the learning rate")


@torch.inference_mode()
def nll(model: nn.Module, tokenizer, examples: list[tuple[list[dict], str]], max_length: int,
        loss=None) -> list[float]:
    """Per example: the mean cross-entropy (nats per token, lower is better) of its response and end
    of turn after its prompt, as eq. 6 scores a response: it tells apart models whose samples are
    alike."""
    device = next(model.parameters()).device
    scores = []
    for messages, response in examples:
        ids, labels = right_pad([encode_example(tokenizer, messages, response, max_length)],
                                tokenizer.pad_token_id, device)  # (1, T) each
        scores.append((loss or response_loss)(model, ids, labels).item())
    return scores
