"""Test set-up: offline Hugging Face, DeepSpeed on its CPU accelerator, one cache for compiled ops."""

import json
import os
import tempfile
from pathlib import Path

# Before torch, transformers or deepspeed are imported anywhere.
_HF_HOME = tempfile.mkdtemp(prefix="dsdpo-hf-home-")
os.environ.update(
    {
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": _HF_HOME,
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
)
# DeepSpeed's C++ ops compile once per machine into one folder shared by every test and subprocess.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

from dsdpo.models.loading import load_model, load_tokenizer  # noqa: E402
from dsdpo.models.tiny import init_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("tiny-gemma"), arch="gemma", seed=0)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("tiny-bert"), arch="bert", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma(tiny_gemma_dir):
    torch.manual_seed(0)
    return load_model(tiny_gemma_dir).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_gemma_dir):
    return load_tokenizer(tiny_gemma_dir)


@pytest.fixture(scope="session")
def folder_without_mask_token(tmp_path_factory) -> Path:
    """A tiny model whose config and tokenizer name no mask token."""
    folder = init_tiny(tmp_path_factory.mktemp("no-mask"))
    config = json.loads((folder / "config.json").read_text())
    del config["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    tokenizer.mask_token = None
    tokenizer.save_pretrained(folder)
    return folder
