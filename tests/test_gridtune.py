"""gridtune.py: the grid's parametrisation worked by hand, the fp32 student equal to the deployed
weights dequantized, and tuning that lowers the KL to the personalized model while leaving the
codes and everything but the grids as they were."""
import math

import pytest
import torch
import torch.nn.functional as F
from test_deploy import nf4_lora_model, reference_logits

from deployment import deploy, gptq, gridtune


def test_grid_by_hand():
    # one row, one group of 32: codes 0, 8, 15, then 8s; s0 = 0.5, z0 = 1.0
    codes = torch.full((1, 32), 8, dtype=torch.uint8)
    codes[0, :3] = torch.tensor([0, 8, 15])
    layer = gridtune.GridLinear(deploy.pack(codes), torch.tensor([[0.5]]), torch.tensor([[1.0]]))
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    # w' = (q - 8) 0.5 + 1 = (-3, 1, 4.5): y = -3 + 2 + 13.5 = 12.5
    assert layer(x).item() == 12.5
    with torch.no_grad():
        layer.a.fill_(math.log(2))  # s = 1.0
        layer.b.fill_(1.0)  # z = 1.0 + 0.5 = 1.5
    # w' = (q - 8) 1 + 1.5 = (-6.5, 1.5, 8.5): y = -6.5 + 3 + 25.5 = 22 (the other 29 inputs are 0)
    assert layer(x).item() == pytest.approx(22.0)
    s, z = layer.grid()
    assert s.item() == pytest.approx(1.0) and z.item() == 1.5


@torch.inference_mode()
def test_student_starts_as_the_deployed_weights_dequantized():
    model = nf4_lora_model(tied=False)
    state = deploy.portable_state(model)
    student = gridtune.student(model.config, state, "cpu")
    ids = torch.randint(0, 96, (2, 10))
    torch.testing.assert_close(student(ids), reference_logits(model, ids), rtol=1e-5, atol=1e-5)
    trained = [k for k, p in student.named_parameters() if p.requires_grad]
    assert trained and all(k.endswith((".a", ".b")) for k in trained)


def kl(teacher, model, sequences):
    """Mean per-position KL(teacher || model) over the sequences."""
    total = 0.0
    for ids in sequences:
        ids = torch.tensor([ids])
        p, q = F.log_softmax(teacher(ids).float(), -1), F.log_softmax(model(ids).float(), -1)
        total += F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()
    return total / len(sequences)


def test_tuning_moves_only_the_grids_and_brings_the_model_closer():
    model = nf4_lora_model(tied=True)
    torch.manual_seed(1)
    calibration = torch.randint(0, 96, (8, 24)).tolist()
    held_out = torch.randint(0, 96, (4, 24)).tolist()
    state = deploy.portable_state(model, rounded=gptq.gptq_blocks(model, calibration))
    tuned = gridtune.tune(model, state, calibration, epochs=3)
    with pytest.raises(ValueError, match="no calibration"):
        gridtune.tune(model, state, [])
    assert tuned.keys() == state.keys()
    moved = {k for k in state if not torch.equal(state[k], tuned[k])}
    assert moved and all(k.endswith((".scale", ".zero")) for k in moved)
    assert all(tuned[k].dtype == deploy.DTYPE for k in moved)
    with torch.inference_mode():
        before = deploy.from_portable(model.config, state)
        after = deploy.from_portable(model.config, tuned)
        assert kl(model, after, calibration) < 0.8 * kl(model, before, calibration)
        assert kl(model, after, held_out) < kl(model, before, held_out)
