"""Text members: transformers sequence classifiers with their own tokenizers, texts as data
(lists, CSV tables, folders of .txt files), and the union exported as a plain transformers
text classifier. Tiny configs and a word-level tokenizer built here; nothing is downloaded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import netmeld
from netmeld.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "fish",
    "man",
    "woman",
    "child",
    "runs",
    "sits",
    "sings",
    "swims",
    "good",
    "bad",
    "film",
    "plot",
    "book",
    "song",
    "is",
    "was",
    "very",
    "not",
]
TOPICS = {  # label -> words that mark it
    "animal": ["cat", "dog", "bird", "fish"],
    "person": ["man", "woman", "child"],
    "review": ["film", "plot", "book", "song"],
}


def make_tokenizer(max_length=32):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=max_length,
    )


def config(family, labels):
    named = {"id2label": dict(enumerate(labels)), "label2id": {k: i for i, k in enumerate(labels)}}
    size = len(WORDS) + 4
    if family == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=size, dim=16, n_layers=1, n_heads=2, hidden_dim=32, **named
        )
    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[family]
    return cls(
        vocab_size=size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        pad_token_id=0,
        **named,
    )


def save_text_classifier(folder, family, labels, *, seed=0, backbone=None):
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config(family, labels))
    if backbone is not None:
        own = model.state_dict()
        own.update({k: v for k, v in backbone.state_dict().items() if "classifier" not in k})
        model.load_state_dict(own)
    model.eval().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model


def sentences(n, seed=0):
    """Texts with a topic word each, and the topic as the label."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    fillers = ["the", "a", "is", "was", "very", "good", "bad", "not"]
    topics = list(TOPICS)
    for _ in range(n):
        topic = topics[int(torch.randint(len(topics), (1,), generator=g))]
        words = TOPICS[topic]
        word = words[int(torch.randint(len(words), (1,), generator=g))]
        pad = [fillers[int(i)] for i in torch.randint(len(fillers), (3,), generator=g)]
        texts.append(" ".join([pad[0], word, pad[1], pad[2]]))
        labels.append(topic)
    return texts, labels


def reference_logits(model, texts):
    enc = make_tokenizer()(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_a_text_member_gives_the_transformers_models_logits(family, tmp_path):
    model = save_text_classifier(tmp_path / family, family, ["pos", "neg"])
    member = netmeld.Member.from_pretrained(tmp_path / family)
    texts = ["the cat runs", "a good film is not bad", "woman sings very very well", ""]
    combined = netmeld.meld([member], "concat")
    with torch.no_grad():
        got = combined(texts)
    torch.testing.assert_close(got, reference_logits(model, texts), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def topic_members(tmp_path_factory):
    """A frozen BERT encoder with a head trained on animal|person texts and another on review
    texts (as two authors would, on their own data)."""
    root = tmp_path_factory.mktemp("text")
    base = save_text_classifier(root / "base", "bert", ["x", "y"])
    save_text_classifier(root / "living", "bert", ["animal", "person"], seed=1, backbone=base)
    save_text_classifier(root / "media", "bert", ["review", "other"], seed=2, backbone=base)
    members = [netmeld.Member.from_pretrained(root / n) for n in ("living", "media")]
    texts, labels = sentences(240)
    for member in members:  # train each head on its own labels' texts, trunk frozen
        rows = [i for i, k in enumerate(labels) if k in member.labels]
        own = [texts[i] for i in rows]
        y = torch.tensor([member.labels.index(labels[i]) for i in rows])
        if member.name == "media":  # its second label: the other texts it saw
            own += texts[:40]
            y = torch.cat([y, torch.tensor([1 if k != "review" else 0 for k in labels[:40]])])
        with torch.no_grad():
            feats = netmeld.extract(netmeld.meld([member], "concat"), own).features[0]
        head = member.module.head
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(feats), y).backward()
            opt.step()
    return root, members


def test_text_members_share_their_encoder_and_every_union_method_reads_texts(topic_members):
    _, members = topic_members
    texts, labels = sentences(120, seed=3)
    concat = netmeld.meld(members, "concat")
    assert len(concat.plan) == 1  # one encoder for both
    accuracies = {}
    for method in ("concat", "weight-norm", "calibrate", "router", "infomax", "semi"):
        inputs: dict = {}
        if method in ("calibrate", "router", "semi"):
            inputs["data"] = (texts[:60], labels[:60])
        if method == "infomax":
            inputs["data"] = texts
        if method == "semi":
            inputs["unlabeled"] = texts
        model = netmeld.meld(members, method, **inputs)
        report = netmeld.evaluate(model, (texts[60:], labels[60:]), latency=False)
        accuracies[method] = report.union_accuracy
    assert accuracies["calibrate"] > accuracies["concat"], accuracies
    assert min(accuracies.values()) > 0.3, accuracies


def test_texts_from_a_csv_and_from_folders_of_txt_files(topic_members, tmp_path):
    _, members = topic_members
    model = netmeld.meld(members, "weight-norm")
    texts, labels = sentences(30, seed=4)
    with (tmp_path / "t.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        (tmp_path / "labeled" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "labeled" / label / f"{i:03d}.txt").write_text(text, encoding="utf-8")
        (tmp_path / "flat").mkdir(exist_ok=True)
        (tmp_path / "flat" / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    direct = netmeld.evaluate(model, (texts, labels), latency=False)
    for source in (tmp_path / "t.csv", tmp_path / "labeled"):
        report = netmeld.evaluate(model, source, latency=False)
        assert report.examples == 30 and report.union_accuracy == direct.union_accuracy
    predicted = [p.label for p in netmeld.predict(model, tmp_path / "flat")]
    assert predicted == model.predict(texts)
    with pytest.raises(netmeld.DataError, match="needs a 'text' column"):
        (tmp_path / "bad.csv").write_text("sentence,label\nthe cat,animal\n", encoding="utf-8")
        netmeld.evaluate(model, tmp_path / "bad.csv", latency=False)


def test_a_text_union_exports_as_a_plain_transformers_classifier(topic_members, tmp_path):
    _, members = topic_members
    texts, labels = sentences(60, seed=5)
    model = netmeld.meld(members, "calibrate", (texts, labels))
    assert netmeld.export(model, tmp_path / "out", format="transformers") < 1e-5
    probe = ["the cat was good", "a film", "woman sings"]
    code = f"""
        import sys
        sys.modules["netmeld"] = None
        import json, torch, transformers
        folder = {str(tmp_path / "out")!r}
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        m = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        enc = tok({probe!r}, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        print(json.dumps({{"logits": out.tolist(), "labels": m.config.id2label}}))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    with torch.no_grad():
        expected = model(probe)
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert list(result["labels"].values()) == model.labels


def test_text_models_do_not_export_to_onnx(topic_members, tmp_path):
    _, members = topic_members
    model = netmeld.meld(members, "concat")
    with pytest.raises(netmeld.NetmeldError, match="tokenises its texts in Python"):
        netmeld.export(model, tmp_path / "m.onnx")


def test_a_text_recipe_melds_and_evaluates_from_the_cli(topic_members, tmp_path, capsys):
    import yaml

    root, _ = topic_members
    texts, labels = sentences(40, seed=6)
    with (tmp_path / "t.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    recipe = {
        "members": [{"hf": str(root / "living")}, {"hf": str(root / "media")}],
        "method": "calibrate",
        "data": str(tmp_path / "t.csv"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["meld", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "t.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["examples"] == 40


def test_ensembles_stacking_extension_and_distillation_read_texts(tmp_path):
    root = tmp_path
    base = save_text_classifier(root / "base", "bert", ["x", "y"])
    save_text_classifier(root / "a", "bert", ["animal", "person"], seed=1, backbone=base)
    save_text_classifier(root / "b", "bert", ["person", "review"], seed=2, backbone=base)
    members = [netmeld.Member.from_pretrained(root / n) for n in ("a", "b")]
    texts, labels = sentences(60)
    mean = netmeld.meld(members, "mean")
    assert mean.labels == ["animal", "person", "review"]  # 'person' from both
    with torch.no_grad():
        probs = mean(texts[:5]).exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    stack = netmeld.meld(members, "stack", (texts, labels))
    assert netmeld.evaluate(stack, (texts, labels), latency=False).examples == 60
    concat = netmeld.meld(members, "concat")
    extended = netmeld.extend(concat, (["the fish swims", "a fish"] * 3, ["fish"] * 6), steps=0)
    assert extended.labels == ["animal", "person", "review", "fish"]
    with torch.no_grad():  # the old labels' logits are untouched by the extension
        torch.testing.assert_close(extended(texts[:8])[:, :3], concat(texts[:8]))
    student = netmeld.distill(concat, texts, epochs=1)
    assert student.labels == concat.labels
    loaded = netmeld.load(student.save(tmp_path / "student"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(texts[:4]), student(texts[:4]))
