"""MultiLossTrainer with GradMitigator and GradFilter attached as handlers (the MONAI engine integration)."""

from __future__ import annotations

import pytest
import torch

from metacontrast.engines import GradFilter, GradMitigator, MultiLossEvents, MultiLossTrainer, NonFiniteLossError

from tests.helpers import TwoHeads


def conflicting_losses(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two objectives that pull the outputs in opposite directions."""
    return {"a": ((pred - target) ** 2).mean(), "b": ((pred + target) ** 2).mean()}


def _trainer(handlers, loss=conflicting_losses, iterations: int = 1, **kwargs) -> tuple[MultiLossTrainer, TwoHeads]:
    torch.manual_seed(1)
    batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(iterations)]
    network = TwoHeads()
    trainer = MultiLossTrainer(
        device="cpu", max_epochs=1, train_data_loader=batches, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=loss,
        train_handlers=handlers, decollate=False, **kwargs,
    )
    return trainer, network


def _per_loss_grads(network: TwoHeads, batch) -> dict[str, list[torch.Tensor]]:
    x, y = batch
    losses = conflicting_losses(network(x), y)
    return {k: list(torch.autograd.grad(v, list(network.parameters()), retain_graph=True)) for k, v in losses.items()}


def test_mitigator_handler_applies_algorithm_1_to_encoder_and_averages_heads():
    trainer, network = _trainer([GradMitigator(beta=0.5, mitigated_prefixes=("encoder.",))])
    before = [p.detach().clone() for p in network.parameters()]
    per_loss = _per_loss_grads(network, trainer.data_loader[0])
    reference = GradMitigator(beta=0.5)
    expected = []
    names = [n for n, _ in network.named_parameters()]
    for k, name in enumerate(names):
        grads = torch.stack([per_loss["a"][k].flatten(), per_loss["b"][k].flatten()])
        if name.startswith("encoder."):
            reference.targets = None
            expected.append(reference.mitigate(grads, torch.zeros(grads.shape[1], dtype=torch.long), 1))
        else:
            expected.append(grads.mean(0))
    trainer.run()
    for p0, p1, g in zip(before, network.parameters(), expected):
        torch.testing.assert_close(p1.detach(), p0 - 0.1 * g.view_as(p0))
    assert any(not torch.allclose(e, torch.stack([per_loss["a"][k].flatten(), per_loss["b"][k].flatten()]).mean(0))
               for k, e in enumerate(expected))  # the mitigation changed something


def test_without_mitigator_the_update_is_the_mean_objective():
    trainer, network = _trainer([])
    x, y = trainer.data_loader[0]
    losses = conflicting_losses(network(x), y)
    grads = torch.autograd.grad(torch.stack(list(losses.values())).mean(), list(network.parameters()))
    before = [p.detach().clone() for p in network.parameters()]
    trainer.run()
    for p0, p1, g in zip(before, network.parameters(), grads):
        torch.testing.assert_close(p1.detach(), p0 - 0.1 * g)


def test_events_fire_in_order_and_expose_losses():
    trainer, _ = _trainer([GradMitigator()])
    seen = []
    for event in (MultiLossEvents.LOSSES_COMPUTED, MultiLossEvents.PER_LOSS_GRADIENTS_COMPUTED, MultiLossEvents.GRADIENTS_READY):
        trainer.add_event_handler(event, lambda e, ev=event: seen.append((ev, sorted(e.state.output["losses"]))))
    trainer.run()
    assert [ev for ev, _ in seen] == [MultiLossEvents.LOSSES_COMPUTED, MultiLossEvents.PER_LOSS_GRADIENTS_COMPUTED, MultiLossEvents.GRADIENTS_READY]
    assert seen[0][1] == ["a", "b"]


def test_grad_filter_follows_the_engine_step():
    grad_filter = GradFilter()
    trainer, _ = _trainer([grad_filter], iterations=4)
    steps = []
    trainer.add_event_handler(MultiLossEvents.LOSSES_COMPUTED, lambda e: steps.append((grad_filter.step, grad_filter.total_steps)))
    trainer.run()
    assert steps == [(0, 4), (1, 4), (2, 4), (3, 4)]


def nan_loss(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"img/patient_id": pred.mean() * float("nan"), "pix/patient_id": pred.pow(2).mean()}


def test_nonfinite_loss_stops_with_iteration_and_term():
    trainer, _ = _trainer([], loss=nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"iteration 1: loss term 'img/patient_id' is nan"):
        trainer.run()


def test_nonfinite_loss_can_skip_the_step():
    trainer, network = _trainer([], loss=nan_loss, skip_nonfinite=True)
    before = [p.detach().clone() for p in network.parameters()]
    trainer.run()
    assert trainer.state.skipped_steps == 1
    for p0, p1 in zip(before, network.parameters()):
        torch.testing.assert_close(p0, p1.detach())


def test_mitigation_sees_unscaled_gradients_under_amp():
    """With a GradScaler at 2**10 the handler still receives true gradients, and the step matches."""
    seen = {}
    trainer, network = _trainer([GradMitigator()], amp=True, amp_kwargs={"dtype": torch.bfloat16})
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.add_event_handler(MultiLossEvents.PER_LOSS_GRADIENTS_COMPUTED,
                              lambda e: seen.update({k: [g.clone() for g in v] for k, v in e.state.per_loss_grads.items()}))
    expected = _per_loss_grads(network, trainer.data_loader[0])
    trainer.run()
    for name in ("a", "b"):
        for got, want in zip(seen[name], expected[name]):
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)  # bf16 autocast, not x1024


def test_batched_per_loss_gradients_equal_the_loop():
    """One batched VJP (is_grads_batched) gives each objective's gradient exactly as one backward pass each (float64)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        seen = []
        for batched in (False, True):
            grads = {}
            trainer, _ = _trainer([GradMitigator()], batched_gradients=batched)
            trainer.add_event_handler(MultiLossEvents.PER_LOSS_GRADIENTS_COMPUTED,
                                      lambda e, grads=grads: grads.update({k: [g.clone() for g in v] for k, v in e.state.per_loss_grads.items()}))
            trainer.run()
            seen.append(grads)
    finally:
        torch.set_default_dtype(previous)
    assert seen[0].keys() == seen[1].keys() == {"a", "b"}
    for name in seen[0]:
        for loop, batched in zip(seen[0][name], seen[1][name]):
            assert loop.dtype == torch.float64
            torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)
