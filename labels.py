"""Constrained label decoding (issue 30): a reply that may only spell one of a task's labels.

`LabelTrie` holds the token-id sequences of each label (a trie keyed by prefix): `allowed(prefix)`
the ids that continue some label, plus the closing ids once the prefix spells a whole label, and
`mask(logits, prefixes)` sets every other logit to -inf, so sampling from softmax(masked / T)
draws from softmax(logits / T) restricted to the allowed ids and renormalized. Decoding ends when
a closing id is drawn: right after a label is complete (or later, if a longer label goes on)."""
import torch

from errors import InputError


def close_ids(tokenizer, stop: str = "]") -> list[int]:
    """The ids that may end a label: end of turn / eos, and every id whose text starts with `stop`
    ("]", "].", "]," but not "fi]", which would add text to the label)."""
    vocab = range(tokenizer.tokenizer.get_vocab_size())
    closing = [i for i in vocab if tokenizer.decode([i]).startswith(stop)]
    return list(tokenizer.eos_token_ids) + closing


class LabelTrie:
    """The labels' token sequences: each label tokenized alone and, when `after` (the text the label
    follows, augment.SCAFFOLD "], Response: [") keeps its own ids, as it reads after it; a sequence
    must decode back to its label exactly (byte-level BPE may split a character). end_ids: the ids
    that close a reply (`close_ids`)."""

    def __init__(self, tokenizer, labels, end_ids, after: str = ""):
        self.end_ids = sorted(set(end_ids))
        self.next: dict[tuple, set[int]] = {}  # prefix -> the ids that continue some label
        self.complete: dict[tuple, str] = {}  # a whole label's ids -> the label
        head = tokenizer.encode(after) if after else []
        for label in labels:
            seqs = {tuple(tokenizer.encode(label))}
            ctx = tokenizer.encode(after + label) if after else []
            if after and ctx[:len(head)] == head:
                seqs.add(tuple(ctx[len(head):]))
            for seq in seqs:
                if not seq or tokenizer.decode(list(seq)) != label:
                    raise InputError(f"label {label!r}: its tokens {list(seq)} decode to "
                                     f"{tokenizer.decode(list(seq))!r}, not to the label")
                for n in range(len(seq)):
                    self.next.setdefault(seq[:n], set()).add(seq[n])
                self.complete[seq] = label

    def __iter__(self):
        """The labels, in their order (an API's choice list)."""
        return iter(dict.fromkeys(self.complete.values()))

    def allowed(self, prefix) -> list[int]:
        """The next ids after `prefix` (the reply's ids so far): those continuing a label, and the
        closing ids if `prefix` is a whole label. A prefix that no label starts with is an error."""
        key = tuple(prefix)
        if key not in self.next and key not in self.complete:
            raise ValueError(f"reply ids {list(prefix)} start no label")
        ends = set(self.end_ids) if key in self.complete else set()
        return sorted(self.next.get(key, set()) | ends)

    def mask(self, logits: torch.Tensor, prefixes) -> torch.Tensor:
        """logits (R, V), one prefix per row -> (R, V), -inf outside each row's allowed ids."""
        keep = torch.zeros_like(logits, dtype=torch.bool)
        for row, prefix in enumerate(prefixes):
            ids = torch.tensor(self.allowed(prefix), dtype=torch.long, device=logits.device)
            keep[row, ids[ids < logits.shape[1]]] = True
        return logits.masked_fill(~keep, float("-inf"))
