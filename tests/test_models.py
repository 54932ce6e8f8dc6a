import json

import pytest
from click.testing import CliRunner
from transformers import AutoModelForMaskedLM, BertForMaskedLM, GemmaForCausalLM

from dsdpo.cli import main
from dsdpo.errors import DsdpoError
from dsdpo.models.loading import (
    load_config,
    load_model,
    load_tokenizer,
    model_class_for,
    resolve_mask_token_id,
)


def test_tiny_models_load_as_their_kind(tiny_gemma_dir, tiny_bert_dir):
    assert isinstance(load_model(tiny_gemma_dir), GemmaForCausalLM)
    assert isinstance(load_model(tiny_bert_dir), BertForMaskedLM)
    assert load_config(tiny_gemma_dir).use_bidirectional_attention


def test_mask_token_comes_from_option_then_config_then_tokenizer(tiny_gemma_dir):
    config, tokenizer = load_config(tiny_gemma_dir), load_tokenizer(tiny_gemma_dir)
    assert tokenizer.convert_ids_to_tokens(tokenizer.mask_token_id) == "[MASK]"
    assert resolve_mask_token_id(99, config, tokenizer) == 99
    for outside in (config.vocab_size, -1):
        with pytest.raises(DsdpoError, match=rf"--mask-token-id {outside} is outside the model's vocabulary"):
            resolve_mask_token_id(outside, config, tokenizer)
    config.mask_token_id = 7
    assert resolve_mask_token_id(None, config, tokenizer) == 7
    config.mask_token_id = config.vocab_size  # issue 20: an IndexError at the first forward
    with pytest.raises(
        DsdpoError, match=rf"^{tiny_gemma_dir}/config.json: mask_token_id {config.vocab_size} is"
    ):
        resolve_mask_token_id(None, config, tokenizer)
    config.mask_token_id = None
    assert resolve_mask_token_id(None, config, tokenizer) == tokenizer.mask_token_id
    tokenizer.mask_token = None
    with pytest.raises(DsdpoError, match="give it with --mask-token-id"):
        resolve_mask_token_id(None, config, tokenizer)


def test_remote_code_models_pick_their_registered_auto_class(tiny_gemma_dir):
    config = load_config(tiny_gemma_dir)
    config.auto_map = {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    }
    assert model_class_for(config, trust_remote_code=True).__name__ == "AutoModel"
    config.auto_map["AutoModelForMaskedLM"] = "modeling_x.X"
    assert model_class_for(config, trust_remote_code=True) is AutoModelForMaskedLM


def test_missing_or_wrong_folders_are_clear_errors(tmp_path):
    with pytest.raises(DsdpoError, match="no such model folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(DsdpoError, match=r"not a Hugging Face model folder \(no config.json\)"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(DsdpoError, match=r"config\.json"):
        load_model(tmp_path)


def test_init_tiny_cli_writes_a_loadable_folder(tmp_path):
    result = CliRunner().invoke(
        main, ["init-tiny", str(tmp_path / "m"), "--arch", "bert", "--hidden-size", "32"]
    )
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "m")
    assert model.config.hidden_size == 32
    bad = CliRunner().invoke(main, ["init-tiny", str(tmp_path / "x"), "--hidden-size", "33", "--heads", "2"])
    assert bad.exit_code == 1
    assert "Error: hidden_size 33 is not divisible by num_heads 2" in bad.output
