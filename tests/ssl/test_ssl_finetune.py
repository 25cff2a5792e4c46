"""Fine-tuning a pretrained backbone: ``narrows train --checkpoint exported.safetensors`` gives
it a new classifier (1 or 2 class tokens), and ``finetune`` runs the README recipe."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import one_torch_thread

from narrows.cli import main
from narrows.runs import RunDir
from narrows.ssl.options import SSLOptions

TINY = "shapes:classes=3,size=32,train=12,test=6"
QUIET = ["--device", "cpu", "--threads", "1", "--no-progress"]
ARCH = "depth=2,patch_size=8,embed_dim=48,num_heads=3"


@pytest.fixture(autouse=True)
def one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining checkpoint as ``narrows ssl train`` writes it (random weights: what is
    tested is the plumbing, not the accuracy)."""
    from narrows.data import load
    from narrows.ssl.model import pair_for
    from narrows.ssl.trainer import asdict_plain

    options = SSLOptions.from_preset("smoke", model_kwargs=ARCH, img_size=32, knn=False)
    torch.manual_seed(0)
    student, teacher = pair_for(options)
    teacher.load_state_dict(student.state_dict())
    info = load(TINY).info
    path = tmp_path_factory.mktemp("pre") / "checkpoint.pt"
    torch.save({"format": "narrows.ssl_checkpoint/1", "options": asdict_plain(options),
                "student": student.state_dict(), "teacher": teacher.state_dict(),
                "data": TINY, "mean": list(info.mean), "std": list(info.std)}, path)
    return path, teacher


@pytest.mark.parametrize("tokens, count", [("keep", 2), ("drop", 1)])
def test_narrows_train_fine_tunes_an_exported_backbone(tmp_path, pretrained, tokens, count):
    from narrows.models import load_model
    from narrows.ssl.export import export_checkpoint

    source, teacher = pretrained
    exported = export_checkpoint(source, tmp_path / f"{tokens}.safetensors", class_tokens=tokens)
    out = tmp_path / "run"
    assert main(["train", "--checkpoint", str(exported.path), "--data", TINY, "--epochs", "1",
                 "--batch-size", "6", "--optimizer", "adamw", "--lr", "1e-3",
                 "--layer-decay", "0.55", "--drop-path", "0.1", "--mixup", "0.8",
                 "--cutmix", "1.0", "--out", str(out), *QUIET]) == 0
    loaded = load_model(str(out / "best.pt"))
    vit, card = loaded.model, loaded.card
    assert card.num_classes == 3 and vit.num_classes == 3
    assert vit.num_prefix_tokens == count
    assert dict(card.model_kwargs).get("reg_tokens", 0) == count - 1
    assert card.model_kwargs["drop_path_rate"] == 0.1
    # the weights training started from: the teacher's backbone and a tiny zero-bias head
    init = torch.load(out / "init.pt", weights_only=True)["state_dict"]
    backbone = teacher.backbone.state_dict()
    assert torch.equal(init["blocks.1.mlp.fc2.weight"], backbone["blocks.1.mlp.fc2.weight"])
    assert torch.equal(init["cls_token"], backbone["cls_token"][:, :1])
    assert torch.equal(init["pos_embed"][:, 0], backbone["pos_embed"][:, 0])
    assert torch.equal(init["pos_embed"][:, count:], backbone["pos_embed"][:, 2:])
    assert init["head.weight"].shape == (3, 48)
    assert torch.count_nonzero(init["head.bias"]) == 0
    assert 0.5 * 2e-5 < init["head.weight"].std() < 1.5 * 2e-5  # trunc-normal 0.02 × 0.001
    # the classifier reads cls (token 0), after the final norm
    vit.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(x), vit.head(vit.forward_features(x)[:, 0]), atol=1e-6)


def test_finetune_runs_the_recipe_for_one_epoch(tmp_path, pretrained):
    from narrows.ssl.eval_options import FinetuneOptions
    from narrows.ssl.finetune import BACKBONE_FILE, finetune

    source, _ = pretrained
    options = FinetuneOptions(epochs=1, batch_size=6, warmup_epochs=0.5)
    said: list[str] = []
    run = RunDir.open(tmp_path / "ft", "ssl finetune", {}, {})
    result = finetune(source, TINY, options, run=run, device="cpu", say=said.append)
    assert result.epochs == 1 and result.final is not None
    assert (tmp_path / "ft" / BACKBONE_FILE).is_file()
    assert any("both class tokens kept" in line for line in said)
    summary = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert summary["model_kwargs"]["drop_path_rate"] == 0.1
    assert result.metrics[0]["lr"] == pytest.approx(1e-6, abs=1e-9)  # cosine ends at min_lr
    again = finetune(source, TINY, options, run=RunDir.open(tmp_path / "ft", "ssl finetune",
                                                            {}, {}), device="cpu",
                     say=said.append)
    assert again.resumed_from == 1  # a rerun finds the finished run
