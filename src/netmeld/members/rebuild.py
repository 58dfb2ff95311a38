"""What is saved opens: a member's architecture rebuilt, given its tensors, must give its
outputs, or the member cannot be saved without pickle."""

from __future__ import annotations

import torch

from netmeld.errors import ModelFileError, NetmeldError
from netmeld.members.member import Member


def check_rebuilds(member: Member) -> None:
    """What is saved opens: ``member``'s architecture builds a module that takes its tensors
    and gives its outputs on a probe batch; otherwise the save is refused with the reason, before
    anything is written."""
    assert member.architecture is not None
    what = f"member {member.name!r}: its architecture {member.architecture.spec!r}"
    try:
        with torch.random.fork_rng(devices=[]):  # fresh weights, replaced: no draws
            rebuilt = member.architecture.build(num_classes=len(member.labels))
    except NetmeldError as exc:
        raise ModelFileError(
            f"{what} cannot be rebuilt, so the saved model would not open: {exc}"
        ) from exc
    state = member.module.state_dict()
    try:
        rebuilt.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"{what} with {dict(member.architecture.kwargs)} builds a module whose tensors differ "
            f"from the member's ({first}); pass the architecture_kwargs that made it"
        ) from exc
    device = next((t.device for t in state.values()), torch.device("cpu"))
    rebuilt.to(device)
    probe = torch.randn(
        2, *member.preprocessing.input_shape, generator=torch.Generator().manual_seed(0)
    ).to(device)
    was_training = member.module.training
    member.module.eval()
    rebuilt.eval()
    try:
        with torch.no_grad():
            ours, theirs = member.module(probe), rebuilt(probe)
    except Exception:  # a module that cannot run on random inputs: its tensors matched
        return
    finally:
        member.module.train(was_training)
    if (
        isinstance(ours, torch.Tensor)
        and isinstance(theirs, torch.Tensor)
        and (ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4))
    ):
        raise ModelFileError(
            f"{what} rebuilt with the member's tensors gives other outputs on a probe batch; the "
            "module holds state outside its tensors, so it cannot be saved without pickle"
        )
