"""The second system's pieces on top of cdcda.py's run (Qin et al., DAC'24): the device keeps only
what its online buffer holds of the history (`history`, in front of step 1), and the rows that
compare buffers with the whole history (`buffer_methods`). buffer.py holds the buffer itself.
"""
import json

import cdcda
import hub
from cdcda import Method
from online import buffer

BUFFER_SIZES = (16, 32)  # the comparison's buffer capacities (items)
OPTIONS = ("buffer", "buffer_policy", "synthesis_filter", "eps_rouge1")


def buffer_history(pairs, device_model, tokenizer, capacity: int, policy: str, seed: int):
    """The device streams D_u, oldest first, through a `capacity`-item buffer (policy "scores":
    EOE + DSS + IDD on its own embeddings; "random") and keeps only what the buffer holds.
    Returns (the kept pairs in arrival order, a summary)."""
    if len(pairs) <= capacity:
        print(f"  buffer of {capacity}: the history has only {len(pairs)} items, so it keeps them all")
    kept, summary = buffer.keep_history(device_model, tokenizer, [x for x, _ in pairs], capacity, policy, seed)
    return [pairs[i] for i in kept], summary | {"kept_indices": kept}


def history(capacity: int, policy: str):
    """`cdcda.Steps.history` for --buffer: what the buffer keeps, its summary in buffer.json."""
    def keep(pairs, device_model, tokenizer, seed, user_dir):
        pairs, summary = buffer_history(pairs, device_model, tokenizer, capacity, policy, seed)
        hub.write_atomic(user_dir / "buffer.json", json.dumps(summary, indent=1))
        return pairs, {"history": summary["seen"], "buffered": summary["kept"]}
    return keep


def buffered(capacity: int, policy: str, augmented: bool):
    """A row trained on the `capacity` items a buffer keeps (`buffer_history`), plus, when
    `augmented`, the kept synthetic pairs generated from those items."""
    name = f"{policy}-{capacity}" + ("+aug" if augmented else "")

    def method(run: cdcda.Run) -> list[str]:
        pairs, summary = buffer_history(run.pairs, run.device_model, run.tokenizer, capacity, policy, run.seed)
        hub.write_atomic(run.user_dir / f"buffer-{policy}-{capacity}.json", json.dumps(summary, indent=1))
        synthetic = []
        if augmented:
            sources = set(pairs)
            synthetic = [(r["syn_input"], r["syn_output"]) for r in cdcda.synthetic_records(run.user_dir)
                         if r["kept"] and (r["input"], r["output"]) in sources]
        return run.personalized(name, cdcda.download(pairs, synthetic))
    return name, method


def buffer_methods(capacities=BUFFER_SIZES) -> dict:
    """The comparison's rows: M_base, the whole history (Direct-FT, CDCDA-PLM), and for each
    capacity a buffer chosen by the scores or at random, without and with augmentation."""
    rows = {"base": "no personalization (M_base)", "direct-ft": "whole history",
            "cdcda": "whole history + augmentation"}
    methods = {m: cdcda.METHODS[m]._replace(label=label) for m, label in rows.items()}
    for capacity in capacities:
        for policy in ("scores", "random"):
            for augmented in (False, True):
                name, method = buffered(capacity, policy, augmented)
                label = f"{capacity}-item buffer, {'EOE+DSS+IDD' if policy == 'scores' else 'random'}"
                methods[name] = Method(label + (" + augmentation" if augmented else ""), method, augmented)
    return methods
