"""Data is read batch by batch: no verb holds every input at once, streamed results equal the
in-memory ones, the feature cache is hit and invalidated as it should be, devices are chosen
and refused clearly, and predictions stream to a file."""

from __future__ import annotations

import copy
import csv
import json
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

import netmeld
from netmeld.cli import main
from netmeld.errors import DataError
from netmeld.methods._extract import FeatureCache, extract, member_keys


class Window(torch.utils.data.Dataset):
    """Items of a tensor data set, counting how many item tensors are alive at once."""

    def __init__(self, x: torch.Tensor, labels: list[str] | None) -> None:
        self.x, self.labels = x, labels
        self.alive = 0
        self.most_alive = 0
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def _gone(self) -> None:
        self.alive -= 1

    def __getitem__(self, i: int):
        item = self.x[i].clone()
        self.alive += 1
        self.reads += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(item, self._gone)
        return item if self.labels is None else (item, self.labels[i])


BATCH = 16


def _window(scenario, n: int = 160, labeled: bool = True) -> Window:
    x = scenario.pool[:n]
    return Window(x, [scenario.pool_labels[i] for i in range(n)] if labeled else None)


def test_no_verb_holds_the_whole_data_set(digits2, tmp_path):
    model = netmeld.meld(digits2.members, "concat")
    limit = 3 * BATCH  # a batch being built, one being run, one ahead
    checks = {
        "evaluate": lambda ds: netmeld.evaluate(
            model, ds, batch_size=BATCH, workers=0, cache=False, latency=False
        ),
        "meld calibrate": lambda ds: netmeld.meld(
            digits2.members, "calibrate", ds, batch_size=BATCH, workers=0, cache=False
        ),
        "predict": lambda ds: list(netmeld.predict(model, ds, batch_size=BATCH, workers=0)),
        "extend": lambda ds: netmeld.extend(
            model,
            (digits2.pool[:12], ["new"] * 12),
            unlabeled=ds,
            steps=2,
            batch_size=BATCH,
            workers=0,
        ),
        "distill": lambda ds: netmeld.distill(
            model, ds, epochs=1, batch_size=BATCH, device="cpu", progress=False
        ),
    }
    for verb, run in checks.items():
        ds = _window(digits2, labeled=verb not in ("extend", "predict", "distill"))
        run(ds)
        assert ds.reads >= len(ds), f"{verb} did not read the data"
        assert ds.most_alive <= limit, f"{verb} held {ds.most_alive} of {len(ds)} inputs at once"


def test_streamed_results_equal_in_memory_results(digits2, tmp_path):
    n = 120
    x, labels = digits2.pool[:n], digits2.pool_labels[:n]
    in_memory = netmeld.meld(digits2.members, "finetune", (x, labels), cache=False)
    streamed = netmeld.meld(
        digits2.members, "finetune", Window(x, labels), batch_size=BATCH, workers=0, cache=False
    )
    for key, value in in_memory.state_dict().items():
        torch.testing.assert_close(streamed.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    folder = _image_folder(tmp_path / "d", x, labels)
    as_tensor = _as_saved_images(x)
    a = netmeld.evaluate(in_memory, (as_tensor, labels), latency=False, cache=False)
    b = netmeld.evaluate(in_memory, folder, latency=False, cache=False, workers=1, batch_size=7)
    assert (a.union_accuracy, a.ece) == pytest.approx((b.union_accuracy, b.ece))
    assert a.member_accuracy == pytest.approx(b.member_accuracy)


def _as_saved_images(x: torch.Tensor) -> torch.Tensor:
    """What the images look like after a round trip through 8-bit PNG files."""
    return (x * 255).round().clamp(0, 255) / 255


def _image_folder(root: Path, x: torch.Tensor, labels: list[str]) -> Path:
    for i, (image, label) in enumerate(zip(x, labels, strict=True)):
        (root / label).mkdir(parents=True, exist_ok=True)
        arr = (image[0] * 255).round().clamp(0, 255).byte().numpy()
        Image.fromarray(arr, mode="L").save(root / label / f"{i:04d}.png")
    return root


def test_the_cache_is_hit_and_invalidated_by_weights_preprocessing_and_data(digits2, tmp_path):
    cache = FeatureCache()
    model = netmeld.meld(digits2.members, "concat")
    x = digits2.pool[:64]
    first = extract(model, x, cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    again = extract(model, x.clone(), cache=cache)
    assert (cache.hits, cache.misses) == (2, 2), "the same weights and data ran again"
    for a, b in zip(first.features, again.features, strict=True):
        assert torch.equal(a, b)

    changed_data = x.clone()
    changed_data[3, 0, 0, 0] += 0.01
    extract(model, changed_data, cache=cache)
    assert cache.misses == 4, "other data content hit the cache"

    changed_weights = netmeld.meld(
        copy.deepcopy(digits2.members), "concat"
    )  # the trunk is the members'

    with torch.no_grad():
        next(changed_weights.trunks["0"].parameters()).view(-1)[0] += 1e-3
    before = cache.misses
    extract(changed_weights, x, cache=cache)
    assert cache.misses > before, "other trunk weights hit the cache"

    changed_pre = netmeld.meld(digits2.members, "concat")
    for _name, buf in changed_pre.preprocess["0"].named_buffers():
        if buf.is_floating_point() and buf.numel():
            buf.add_(0.05)
            break
    else:  # pragma: no cover - the fixture normalises its inputs
        pytest.fail("the preprocessing holds no statistics to change")
    before = cache.misses
    extract(changed_pre, x, cache=cache)
    assert cache.misses > before, "other preprocessing hit the cache"


def test_a_cache_folder_is_reused_across_processes_and_bad_entries_are_replaced(digits2, tmp_path):
    model = netmeld.meld(digits2.members, "concat")
    x = digits2.pool[:40]
    writer = FeatureCache(tmp_path / "cache")
    reference = extract(model, x, cache=writer)
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == len(set(member_keys(model)))  # members on one trunk share an entry
    reader = FeatureCache(tmp_path / "cache")  # a later process: nothing in memory
    again = extract(model, x, cache=reader)
    assert reader.hits == len(model.members) and reader.misses == 0
    assert all(torch.equal(a, b) for a, b in zip(reference.features, again.features, strict=True))
    files[0].write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="not a valid cache entry"):
        fresh = extract(model, x, cache=FeatureCache(tmp_path / "cache"))
    assert all(torch.equal(a, b) for a, b in zip(reference.features, fresh.features, strict=True))


def test_evaluating_six_models_of_the_same_members_runs_each_trunk_once(digits2):
    x, labels = digits2.test
    models = {
        m: netmeld.meld(digits2.members, m, (digits2.pool[:80], digits2.pool_labels[:80]))
        for m in ("concat", "calibrate", "bn-standardize", "stack", "mean", "weight-norm")
    }
    calls = []
    trunks = {id(t): t for model in models.values() for t in model.trunks.values()}
    handles = [  # models of the same members may share the modules: each hooked once
        trunk.register_forward_hook(lambda *_: calls.append(1)) for trunk in trunks.values()
    ]
    reports = netmeld.compare(models, (x, labels), cache=FeatureCache(), latency=False)
    batches = -(-len(x) // 256)
    per_model = len(next(iter(models.values())).trunks)
    assert len(trunks) == per_model * len(models)
    assert len(calls) == per_model * batches, "the models' trunk ran more than once over D"
    uncached = netmeld.compare(models, (x, labels), cache=False, latency=False)
    assert len(calls) == per_model * batches * (1 + len(models))  # without the cache: each
    for handle in handles:
        handle.remove()
    for a, b in zip(reports, uncached, strict=True):
        assert a.union_accuracy == pytest.approx(b.union_accuracy)


def test_reduced_precision_stays_within_its_stated_tolerance(digits2):
    model = netmeld.meld(digits2.members, "calibrate", (digits2.pool, digits2.pool_labels))
    full = extract(model, digits2.test[0], cache=False)
    bf16 = extract(model, digits2.test[0], precision="bf16", cache=False)
    for a, b in zip(full.features, bf16.features, strict=True):
        assert b.dtype == torch.float32
        assert (a - b).abs().max() <= 2e-2 * a.abs().max()
    r32 = netmeld.evaluate(model, digits2.test, latency=False, cache=False)
    r16 = netmeld.evaluate(model, digits2.test, precision="bf16", latency=False, cache=False)
    assert abs(r32.union_accuracy - r16.union_accuracy) <= 0.02
    with pytest.raises(DataError, match="precision 'int8'"):
        netmeld.evaluate(model, digits2.test, precision="int8", latency=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_device_cpu_works_and_cuda_without_a_gpu_is_a_clear_error(digits2, tmp_path, capsys):
    model = netmeld.meld(digits2.members, "concat")
    with pytest.raises(DataError, match=r"device 'cuda'.*no CUDA GPU"):
        netmeld.evaluate(model, digits2.test, device="cuda")
    with pytest.raises(DataError, match="no CUDA GPU"):
        netmeld.meld(digits2.members, "calibrate", digits2.test, device="cuda")
    with pytest.raises(DataError, match="not a device"):
        netmeld.evaluate(model, digits2.test, device="tpu9")
    folder = _image_folder(tmp_path / "d", digits2.test[0][:20], digits2.test[1][:20])
    saved = model.save(tmp_path / "m")
    assert main(["eval", str(saved), "--data", str(folder), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["examples"] == 20
    assert main(["eval", str(saved), "--data", str(folder), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err


def test_predict_streams_rows_to_csv_and_jsonl(digits2, tmp_path, capsys):
    model = netmeld.meld(digits2.members, "concat")
    saved = model.save(tmp_path / "m")
    x, labels = digits2.test[0][:30], digits2.test[1][:30]
    folder = _image_folder(tmp_path / "d", x, labels)
    expected = model.predict_proba(_as_saved_images(x))
    files = sorted(folder.rglob("*.png"))
    assert (
        main(
            [
                "predict",
                str(saved),
                *map(str, files),
                "--output",
                str(tmp_path / "p.csv"),
                "--top",
                "2",
            ]
        )
        == 0
    )
    with (tmp_path / "p.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30 and rows[0].keys() == {"file", "index", "label", "probability", "top"}
    by_file = {Path(r["file"]).name: r for r in rows}
    for i in range(30):
        row = by_file[f"{i:04d}.png"]
        assert row["label"] == model.labels[int(expected[i].argmax())]
        assert float(row["probability"]) == pytest.approx(float(expected[i].max()), abs=1e-5)
        assert len(row["top"].split(";")) == 2
    assert (
        main(
            ["predict", str(saved), str(folder / labels[0]), "--output", str(tmp_path / "p.jsonl")]
        )
        == 0
    )
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == labels.count(labels[0])
    assert set(json.loads(lines[0])) == {"file", "index", "label", "probability", "predictions"}
    assert main(["predict", str(saved), str(files[0]), "--output", str(tmp_path / "p.txt")]) == 2
    assert ".csv or .jsonl" in capsys.readouterr().err
    assert not (tmp_path / "p.txt").exists()
