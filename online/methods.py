"""The second system's rows on top of cdcda.py's method (Qin et al., DAC'24): the device keeps only
what its online buffer holds of the history, in front of step 1 (`buffered`), and the rows that
compare buffers with the whole history (`buffer_methods`). buffer.py holds the buffer itself.
"""
import functools
import json

import cdcda
import filters
import hub
import runner
from augment import augment
from cdcda import Answers, Method, answer, download, personalize, upload
from online import buffer

BUFFER_SIZES = (16, 32)  # the comparison's buffer capacities (items)
OPTIONS = ("buffer", "buffer_policy", "synthesis_filter", "eps_rouge1")


def buffer_history(s: cdcda.Shared, user, pairs, capacity: int, policy: str, seed: int, name: str):
    """The device streams D_u, oldest first, through a `capacity`-item buffer (policy "scores":
    EOE + DSS + IDD on its own embeddings; "random") and keeps only what the buffer holds: the
    kept pairs in arrival order; the buffer's summary in the user's `name`.json."""
    if len(pairs) <= capacity:
        print(f"  buffer of {capacity}: the history has only {len(pairs)} items, so it keeps them all")
    kept, summary = buffer.keep_history(s.device.model, s.device.tokenizer, [x for x, _ in pairs], capacity,
                                        policy, seed)
    where = runner.user_dir(s.settings, user)
    where.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(where / f"{name}.json", json.dumps(summary | {"kept_indices": kept}, indent=1))
    return [pairs[i] for i in kept]


def buffered(capacity: int, policy: str, augmented: bool, select=filters.select, whole_upload: bool = True):
    """A row trained on the items a `capacity`-item buffer keeps of D_u and, when `augmented`, the
    synthetic pairs step 3 keeps of them. `whole_upload`: the cloud augments the whole history (as
    the other rows' upload, so it writes the same candidates once) and the row takes its items'
    pairs; else only the kept items are uploaded (--buffer). `select`: step 3."""
    def method(s: cdcda.Shared, user, seed: int) -> Answers:
        name = "buffer" if not whole_upload else f"buffer-{policy}-{capacity}"
        history = upload(s.task, user, s.rewrites)
        pairs = buffer_history(s, user, history, capacity, policy, seed, name) if capacity else history
        selection, synthetic = None, []
        if augmented:
            uploaded = history if whole_upload else pairs
            selection = select(uploaded, augment(s.cloud, uploaded, s.settings, seed, s.task), s.judge, s.settings)
            mine = set(pairs)
            synthetic = [(r["syn_input"], r["syn_output"]) for r in selection.records
                         if r["kept"] and (r["input"], r["output"]) in mine]
        model, losses = personalize(s.device, s.task, download(pairs, synthetic), s.settings, seed)
        return Answers(answer(s.device, model, s.task, user.queries, s.settings, seed), model, losses, selection)
    return method


def history_methods(capacity: int, policy: str, synthesis_filter: str, eps_rouge1: float) -> dict:
    """cdcda.py's rows with --buffer (only what the buffer keeps is uploaded and trained on) and
    --synthesis-filter (step 3: the paper's SCF + TDF + LSF, or Qin et al.'s ROUGE-1 check)."""
    select = (functools.partial(buffer.rouge1_select, threshold=eps_rouge1) if synthesis_filter == "rouge1"
              else filters.select)
    methods = dict(cdcda.METHODS)
    if capacity:
        methods["direct-ft"] = methods["direct-ft"]._replace(answers=buffered(capacity, policy, False, whole_upload=False))
    if capacity or synthesis_filter != "cdcda":
        methods["cdcda"] = methods["cdcda"]._replace(answers=buffered(capacity, policy, True, select, False))
    return methods


def buffer_methods(capacities=BUFFER_SIZES) -> dict:
    """The comparison's rows: M_base, the whole history (Direct-FT, CDCDA-PLM), and for each
    capacity a buffer chosen by the scores or at random, without and with augmentation."""
    rows = {"base": "no personalization (M_base)", "direct-ft": "whole history",
            "cdcda": "whole history + augmentation"}
    methods = {m: cdcda.METHODS[m]._replace(label=label) for m, label in rows.items()}
    for capacity in capacities:
        for policy in ("scores", "random"):
            for augmented in (False, True):
                name = f"{policy}-{capacity}" + ("+aug" if augmented else "")
                label = f"{capacity}-item buffer, {'EOE+DSS+IDD' if policy == 'scores' else 'random'}"
                methods[name] = Method(label + (" + augmentation" if augmented else ""),
                                       buffered(capacity, policy, augmented), augmented)
    return methods
