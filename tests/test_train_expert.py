"""LoRA expert training on a tiny random Llama: loss falls, the adapter reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_worker import kill_while_writing_checkpoint
from tiny_models import tiny_llama, tiny_tokenizer
from peft import PeftModel
from safetensors.torch import load_file

from atmoe.train.data import PadCollator, encode_dataset, load_jsonl
from atmoe.train.expert import ExpertTrainConfig, parse_args, train_expert
from demo.suite import EXPERT_DESCRIPTIONS, expert_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "labs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in expert_rows("labs", 48, seed=0)), encoding="utf-8")
    return path


def _cfg(data: Path, out: Path, **kw: object) -> ExpertTrainConfig:
    args = dict(name="labs", group="task", data=str(data), out=str(out), steps=20, batch_size=8, lr=1e-2,
                logging_steps=5, save_steps=0, max_length=192)
    return ExpertTrainConfig(**{**args, **kw})  # type: ignore[arg-type]


def _loss(model: torch.nn.Module, tok, data: Path) -> float:
    feats, _ = encode_dataset(tok, load_jsonl(data)[:16], 192)
    with torch.no_grad():
        return float(model(**PadCollator(tok.pad_token_id)(feats)).loss)


def test_config_validation(data: Path, tmp_path: Path) -> None:
    for bad in ({"name": "a b"}, {"group": " "}, {"rank": 0}, {"steps": 0}, {"lr": 0.0}, {"dtype_out": "int8"},
                {"targets": ()}, {"dropout": 1.0}, {"save_steps": -1}):
        with pytest.raises(ValueError):
            _cfg(data, tmp_path / "x", **bad)
    assert _cfg(data, tmp_path / "x").description == ""  # the engine knows no suite: the caller describes


def test_cli_parses_into_config() -> None:
    cfg = parse_args(["--name", "labs", "--group", "task", "--data", "d.jsonl", "--out", "o", "--steps", "7",
                      "--lr", "0.002", "--targets", "q_proj", "v_proj", "--resume"])
    assert (cfg.steps, cfg.lr, cfg.targets, cfg.resume, cfg.base, cfg.rank) == (7, 0.002, ("q_proj", "v_proj"), True, None, 8)


def test_training_lowers_loss_and_saves_a_loadable_adapter(data: Path, tmp_path: Path) -> None:
    texts = [f"{e.instruction} {e.input} {e.output}" for e in load_jsonl(data)]
    tok = tiny_tokenizer(texts)
    before = _loss(tiny_llama(len(tok)), tok, data)
    out = tmp_path / "experts" / "labs"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old run")  # an existing out folder is replaced whole
    model = tiny_llama(len(tok))
    saved = train_expert(_cfg(data, out, description=EXPERT_DESCRIPTIONS["labs"]), model, tok)

    assert saved == out and not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      "atmoe_expert.json", "train_log.jsonl"]
    assert not list(tmp_path.joinpath("experts").glob(".*"))  # no temp or old folders left behind
    meta = json.loads((out / "atmoe_expert.json").read_text())
    assert (meta["name"], meta["group"], meta["train_rows"], meta["steps"]) == ("labs", "task", 48, 20)
    assert meta["final_loss"] < before
    assert all(t.dtype == torch.float16 for t in load_file(out / "adapter_model.safetensors").values())
    assert meta["description"] == EXPERT_DESCRIPTIONS["labs"]
    readme = (out / "README.md").read_text()
    assert "48 rows" in readme and EXPERT_DESCRIPTIONS["labs"] in readme

    trained = model.eval()
    after = _loss(trained, tok, data)
    assert after < 0.85 * before
    reloaded = PeftModel.from_pretrained(tiny_llama(len(tok)), out).eval()
    ids = PadCollator(tok.pad_token_id)(encode_dataset(tok, load_jsonl(data)[:4], 192)[0])
    with torch.no_grad():
        expected, got = trained(**ids).logits, reloaded(**ids).logits
        plain = tiny_llama(len(tok))(**ids).logits
    assert torch.allclose(expected, got, atol=1e-2)  # fp16 adapter weights
    assert not torch.allclose(plain, got, atol=1e-2)  # the adapter does change the model


def test_a_relaunch_resumes_by_default_skipping_a_checkpoint_cut_short(data: Path, tmp_path: Path, monkeypatch,
                                                                       capsys) -> None:
    """The same behaviour as `train-router`: relaunching the command resumes (no `--resume` needed) from the last
    complete checkpoint; one killed while its trainer state was being written is named and skipped."""
    texts = [f"{e.instruction} {e.input} {e.output}" for e in load_jsonl(data)]
    tok = tiny_tokenizer(texts)
    cfg = _cfg(data, tmp_path / "labs", steps=8, save_steps=3, logging_steps=1, dtype_out="float32")
    assert cfg.resume   # the default
    train_expert(_cfg(data, tmp_path / "full", steps=8, save_steps=3, logging_steps=1, dtype_out="float32"),
                 tiny_llama(len(tok)), tok)

    kill_while_writing_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_expert(cfg, tiny_llama(len(tok)), tok)
    monkeypatch.undo()
    assert sorted(p.name for p in cfg.checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    capsys.readouterr()
    train_expert(cfg, tiny_llama(len(tok)), tok)
    said = capsys.readouterr().out
    assert f"resuming from {cfg.checkpoints / 'checkpoint-3'} (step 3)" in said
    assert f"skipping checkpoint {cfg.checkpoints / 'checkpoint-6'}" in said
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
              for d in ("full", "labs")]
    assert len(losses[1]) == 8 and max(abs(a - b) for a, b in zip(*losses)) < 1e-5   # every step, the same losses
    w1, w2 = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("full", "labs"))
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"measured: expert, cut short and resumed vs uninterrupted max |Δ| = {diff:.2e}")
    assert diff <= 1e-5 and not cfg.checkpoints.exists()


def test_an_expert_refuses_routing_only_rows_by_name(tmp_path: Path) -> None:
    from atmoe.train.expert import train_lora

    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Plan a trip.", "output": "Go.", "experts": []}\n'
                    '{"instruction": "Plan a trip to Lisbon.", "output": null, "experts": []}\n')
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r'row\(s\) \[2\] have "output": null \(routing-only rows\)'):
        train_lora(tiny_llama(len(tok)), tok, _cfg(path, tmp_path / "out"))
