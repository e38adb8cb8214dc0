"""--amp follows the processor: bf16 autocast only on a CPU with native bf16, fp32 elsewhere, fp16 on CUDA; train.py
and predict.py apply the same rule and record the precision that ran. The capability check is forced each way with
TRASHSEG_CPU_BF16, so both branches run on any CPU."""
import json

import pytest
import torch

import inference
import precision
import predict
import train
from outputs import read_log


def test_the_rule_on_each_kind_of_machine(monkeypatch):
    monkeypatch.setenv("TRASHSEG_CPU_BF16", "0")
    assert precision.amp_precision(torch.device("cpu"), True) == "fp32"
    assert "no native bf16" in precision.precision_note("cpu", True)
    monkeypatch.setenv("TRASHSEG_CPU_BF16", "1")
    assert precision.amp_precision(torch.device("cpu"), True) == "bf16"
    assert precision.precision_note("cpu", True) is None
    assert precision.amp_precision(torch.device("cuda"), True) == "fp16"
    assert precision.amp_precision("cpu", False) == precision.amp_precision("cuda", False) == "fp32"


def test_without_an_override_the_check_reads_the_cpu(monkeypatch):
    monkeypatch.delenv("TRASHSEG_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not precision.cpu_bf16_native()
    # oneDNN says yes on AVX-512 without bf16 instructions (it converts in software): the bf16 flags decide on x86
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not precision.cpu_bf16_native()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision.cpu_bf16_native()


def test_autocast_runs_the_convolutions_in_the_precision_asked():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with precision.autocast(torch.device("cpu"), "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with precision.autocast(torch.device("cpu"), "fp32"):
        assert conv(x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.autocast("cpu", "fp8")


def tiny(demo_dir, out, *extra):
    return ["--data-dir", str(demo_dir), "--train-json", "train_all.json", "--val-json", "train_all.json",
            "--arch", "unet", "--backbone", "resnet18", "--no-pretrained", "--img-size", "32", "-b", "4",
            "--workers", "0", "--epochs", "1", "--output-dir", str(out), "--mask-cache", "none",
            "--print-freq", "100", "--device", "cpu", *extra]


def record_autocasts(monkeypatch, module):
    """The precisions module.autocast is entered with (a list that fills as the code runs)."""
    seen = []
    real = precision.autocast

    def spy(device, kind):
        seen.append(kind)
        return real(device, kind)
    monkeypatch.setattr(module, "autocast", spy)
    return seen


@pytest.mark.parametrize("native, expected", [("0", "fp32"), ("1", "bf16")])
def test_train_and_predict_follow_the_rule_and_record_it(demo_dir, tmp_path, monkeypatch, capsys, native, expected):
    monkeypatch.setenv("TRASHSEG_CPU_BF16", native)
    trained = record_autocasts(monkeypatch, train)
    validated = record_autocasts(monkeypatch, inference)
    out = tmp_path / "run"
    train.main(tiny(demo_dir, out, "--amp", "--no-channels-last"))
    assert set(trained) == {expected} and set(validated) == {expected}
    assert ("no native bf16" in capsys.readouterr().out) == (expected == "fp32")
    assert json.loads((out / "config.json").read_text())["precision"] == expected
    assert {"precision": expected} in read_log(out / "log.jsonl")
    assert torch.load(out / "last.pt", weights_only=True)["args"]["precision"] == expected

    validated.clear()
    preds = tmp_path / "preds"
    predict.main(["--ckpt", str(out / "last.pt"), "--data-dir", str(demo_dir), "--json", "test.json",
                  "--output-dir", str(preds), "--workers", "0", "--device", "cpu", "--amp", "--no-probs"])
    assert set(validated) == {expected}
    assert json.loads((preds / "predictions.json").read_text())["timing"]["precision"] == expected


def test_without_amp_every_machine_runs_fp32(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRASHSEG_CPU_BF16", "1")
    trained = record_autocasts(monkeypatch, train)
    train.main(tiny(demo_dir, tmp_path / "run", "--no-channels-last"))
    assert set(trained) == {"fp32"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "fp32"


def test_the_memory_format_is_measured_on_the_cpu_and_leaves_the_random_stream_alone():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    faster, cl, plain = precision.faster_memory_format(net, (2, 3, 16, 16), 4, torch.device("cpu"), "fp32")
    assert isinstance(faster, bool) and cl > 0 and plain > 0 and faster == (cl < 0.95 * plain)
    assert torch.equal(torch.rand(3), expected)  # the run's seeded stream is where it was
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # a copy was timed, not the network
    assert precision.choose_memory_format(net, (2, 3, 16, 16), 4, torch.device("cuda"), "fp16") == (True, None)


def test_train_measures_the_format_unless_told(demo_dir, tmp_path, capsys):
    train.main(tiny(demo_dir, tmp_path / "auto", "--val-json", "none"))
    out = capsys.readouterr().out
    chosen = json.loads((tmp_path / "auto" / "config.json").read_text())["channels_last"]
    assert "memory format: channels_last" in out and isinstance(chosen, bool)
    assert f"using {'channels_last' if chosen else 'contiguous'}" in out
    train.main(tiny(demo_dir, tmp_path / "told", "--val-json", "none", "--no-channels-last"))
    assert "memory format:" not in capsys.readouterr().out
    assert json.loads((tmp_path / "told" / "config.json").read_text())["channels_last"] is False
