"""Every checkpoint gptoss writes carries a model card and the family's license notice, and
`gptoss info` names the license."""

import os
import stat

import torch
from transformers import AutoModelForCausalLM

from conftest import random_model, tiny_config
from gptoss import save_model
from gptoss.checkpoint import checkpoint_facts
from gptoss.cli import main
from gptoss.model_card import LICENSE_NAME, ModelCard, read_license_name


def test_saved_checkpoint_has_card_and_license(tmp_path):
    model = random_model(tiny_config())
    path = save_model(model, tmp_path / "ckpt")
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlicense: other\n")
    assert f"license_name: {LICENSE_NAME}" in card
    assert f"| total parameters | {model.config.total_params():,} |" in card
    assert "use restrictions" in (path / "LICENSE").read_text()
    assert checkpoint_facts(path)["license"] == LICENSE_NAME
    # The extra files do not disturb transformers.
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_card_records_training_data_and_evaluation(tmp_path):
    card = ModelCard(
        description="A test model.",
        training_data="Ten tokens of nothing.",
        evaluation={"held-out loss (nats/token)": 1.25},
        license_name="custom-license",
    )
    path = save_model(random_model(tiny_config()), tmp_path / "ckpt", card=card)
    text = (path / "README.md").read_text()
    assert "Ten tokens of nothing." in text and "| held-out loss (nats/token) | 1.25 |" in text
    assert read_license_name(path) == "custom-license"


def test_info_shows_the_license(tmp_path, capsys):
    path = save_model(random_model(tiny_config()), tmp_path / "ckpt")
    assert main(["info", str(path)]) == 0
    assert LICENSE_NAME in capsys.readouterr().out


def test_checkpoint_files_get_the_umask_modes_not_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_model(random_model(tiny_config()), tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}


def test_checkpoint_without_card_says_so(tmp_path):
    path = save_model(random_model(tiny_config()), tmp_path / "ckpt")
    (path / "README.md").unlink()
    assert checkpoint_facts(path)["license"].startswith("not stated")
