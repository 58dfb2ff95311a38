"""Under ``torchrun`` each process reads its share of the data; features, counts and fits are
gathered, so a 2-process (gloo, CPU) meld and evaluation equal a single-process run."""

from __future__ import annotations

import torch

import netmeld
from netmeld.zoo import small_cnn

from ._ddp import two_process_run

SHAPE = (1, 8, 8)
LABELS = [["a", "b", "c"], ["d", "e"]]


def _members() -> list[netmeld.Member]:
    members = []
    for seed, labels in enumerate(LABELS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = small_cnn(num_classes=len(labels), in_channels=1, width=4, blocks=2)
        members.append(
            netmeld.Member(
                module.eval(),
                labels,
                name=f"m{seed}",
                preprocessing={"input_shape": SHAPE, "mean": (0.5,), "std": (0.25,)},
            )
        )
    return members


def _data() -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(53, *SHAPE, generator=g)  # an odd count: the shares differ in size
    everything = [label for group in LABELS for label in group]
    return x, [everything[int(i)] for i in torch.randint(5, (53,), generator=g)]


class _Counting(torch.utils.data.Dataset):
    def __init__(self, data: tuple[torch.Tensor, list[str]]) -> None:
        self.data, self.reads = data, 0

    def __len__(self) -> int:
        return len(self.data[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        self.reads += 1
        return self.data[0][i], self.data[1][i]


def _run() -> dict[str, torch.Tensor]:
    members, data = _members(), _data()
    out: dict[str, torch.Tensor] = {}
    counting = _Counting(data)
    model = netmeld.meld(members, "concat")
    report = netmeld.evaluate(model, counting, latency=False, batch_size=8, workers=0)
    out["dataset.report"] = torch.tensor([report.examples, report.union_accuracy])
    out["reads"] = torch.tensor(counting.reads - 1)  # less the first item, read to see labels
    for method, params in (("calibrate", {}), ("stack", {"passthrough": "input"})):
        model = netmeld.meld(members, method, data, params=params, cache=False)
        report = netmeld.evaluate(model, data, cache=False, latency=False, batch_size=8)
        out[f"{method}.report"] = torch.tensor(
            [report.examples, report.union_accuracy, report.ece, report.task_confusion]
        )
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                out[f"{method}.{key}"] = value.detach().clone()
    return out


def test_two_processes_give_the_single_process_result(tmp_path):
    sharded = two_process_run(_run, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes runs: the same arithmetic order
    try:
        single = _run()
    finally:
        torch.set_num_threads(threads)
    assert sharded.keys() == single.keys()
    assert (int(sharded.pop("reads")), int(single.pop("reads"))) == (27, 53)  # rank 0's share
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert single["calibrate.report"][0] == 53
