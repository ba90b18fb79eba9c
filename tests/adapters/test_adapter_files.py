"""Adapter folders (adapter_config.json + adapter_model.safetensors): a round trip for every method, no pickle, and
one ValueError naming the file for every damaged or mismatched folder."""

import json

import pytest
import torch

from tcurlora_seg.adapters import ADAPTERS, apply_adapter, load_adapter, save_adapter
from tcurlora_seg.adapters.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.adapters.test_baselines import outputs, randomise_adapter, tiny

METHODS = sorted(ADAPTERS)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(1, 1, 32, 32, 32)


def tuned(method: str, **options):
    model = apply_adapter(tiny(), method, **options)
    randomise_adapter(model)
    with torch.no_grad():
        model.decoder3.transp_conv.conv.weight.mul_(1.5)  # a trained decoder weight
    return model


@pytest.mark.parametrize("method", METHODS)
def test_adapter_folder_round_trip_reproduces_the_fine_tuned_model(tmp_path, x, method):
    model = tuned(method)
    folder = save_adapter(model, tmp_path / "adapter", base_model_config={"hidden_size": 48})
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["method"] == method and config["base_fingerprint"] == model.adapter_config["base_fingerprint"]
    assert config["base_model_config"] == {"hidden_size": 48} and "decoder3.transp_conv.conv" in config["trained_modules"]
    fresh = load_adapter(tiny(), folder)  # the untouched pretrained base
    torch.testing.assert_close(outputs(fresh, x), outputs(model, x), rtol=0, atol=0)
    assert load_adapter(fresh, folder) is fresh  # an adapted model of the same method and options: checked, loaded


def test_the_folder_holds_no_pickle(tmp_path):
    folder = save_adapter(tuned("tcurlora", groups=("attn",)), tmp_path / "a")
    blob = (folder / ADAPTER_WEIGHTS).read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])  # safetensors: a JSON header, then raw tensors
    assert {"tcur_rows", "tcur_cols"} <= {name.rpartition(".")[2] for name in header}  # the CUR selection travels
    assert b"\x80\x04" not in blob[:2] and not blob.startswith(b"PK")  # neither a pickle nor torch's zip format


def test_options_given_as_tuples_load_back(tmp_path, x):
    model = tuned("tcurlora", groups=("attn", "mlp_up"), rank=2)
    fresh = load_adapter(tiny(), save_adapter(model, tmp_path / "a"))
    torch.testing.assert_close(outputs(fresh, x), outputs(model, x), rtol=0, atol=0)


def test_missing_truncated_or_foreign_files_name_the_file(tmp_path):
    folder = save_adapter(tuned("lora"), tmp_path / "a")
    weights = folder / ADAPTER_WEIGHTS
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=rf"{ADAPTER_WEIGHTS} is damaged or truncated.*save_adapter"):
        load_adapter(tiny(), folder)
    weights.write_bytes(blob)
    (folder / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG} is not valid JSON"):
        load_adapter(tiny(), folder)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"method": "lora"}))
    with pytest.raises(ValueError, match="not a tcurlora_seg adapter config"):
        load_adapter(tiny(), folder)
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG} not found"):
        load_adapter(tiny(), tmp_path / "nothing")


def test_another_base_method_or_shape_is_refused_naming_the_folder(tmp_path):
    folder = save_adapter(tuned("tcurlora"), tmp_path / "a")
    with pytest.raises(ValueError, match=rf"{folder}.*different base model"):
        load_adapter(tiny(seed=1), folder)
    with pytest.raises(ValueError, match=rf"{folder}.*adapter mismatch"):
        load_adapter(apply_adapter(tiny(), "lora"), folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    lora = save_adapter(tuned("lora", rank=4), tmp_path / "b")
    (lora / ADAPTER_CONFIG).write_text(json.dumps({**json.loads((lora / ADAPTER_CONFIG).read_text()),
                                                   "options": {**config["options"], "rank": 4}, "method": "tcurlora"}))
    with pytest.raises(ValueError, match=rf"{lora}.*(unexpected tensor|lacks trained tensors)"):
        load_adapter(tiny(), lora)  # the tensors of another method under this one's name
    other_rank = save_adapter(tuned("lora", rank=4), tmp_path / "c")
    (other_rank / ADAPTER_CONFIG).write_text(json.dumps({**json.loads((other_rank / ADAPTER_CONFIG).read_text()),
                                                         "options": {**json.loads((other_rank / ADAPTER_CONFIG).read_text())["options"], "rank": 2}}))
    with pytest.raises(ValueError, match=rf"{other_rank}.*shape"):
        load_adapter(tiny(), other_rank)
