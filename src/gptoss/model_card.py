"""What travels with every checkpoint gptoss writes: a model card (`README.md`, with the Hugging Face
front matter that the Hub and other tools read) and the family's license notice (`LICENSE`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss.config import ModelConfig

CARD_FILE = "README.md"
LICENSE_FILE = "LICENSE"
LICENSE_NAME = "gpt-oss-community-license"

LICENSE_NOTICE = f"""\
{LICENSE_NAME}: notice

The weights in this directory are a member of the gpt-oss model family, or derived from one
(trained, fine-tuned, merged or converted by gptoss). The family is released under a community
license with use restrictions. By using, copying, modifying or redistributing these weights you
accept that license and its usage policy, including:

- use only in compliance with applicable law and the usage policy published with the family;
- no use for the purposes the usage policy prohibits;
- redistribution, of these weights or of any model derived from them (fine-tunes, merges, LoRA
  adapters merged or not, quantizations), only together with this notice and under the same terms.

The full terms are those published with the gpt-oss model family; this file is a notice of them,
written by gptoss into every checkpoint it saves, and is not a substitute for them.
"""


@dataclass
class ModelCard:
    """What a checkpoint's README.md says beyond its config: where it came from and how it does."""

    description: str = "A gpt-oss family checkpoint written by gptoss."
    training_data: str = "Not recorded by the program that saved this checkpoint."
    evaluation: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    license_name: str = LICENSE_NAME

    def render(self, config: ModelConfig) -> str:
        """The README.md text: front matter, then sections a reader scans."""
        shape = config.summary()
        rows = [
            ("kind", shape["kind"]),
            ("layers", shape["layers"]),
            ("hidden size", shape["hidden_size"]),
            ("attention heads / kv heads", f"{shape['attention_heads']} / {shape['kv_heads']}"),
            ("experts (active)", f"{shape['experts']} ({shape['experts_per_token']})"),
            ("vocabulary (ids with rows)", f"{shape['vocab_size']:,} ({shape['vocab_rows']:,})"),
            ("context", f"{shape['context']:,}"),
            ("total parameters", f"{shape['total_params']:,}"),
            ("active parameters", f"{shape['active_params']:,}"),
        ]
        lines = [
            "---",
            "license: other",
            f"license_name: {self.license_name}",
            f"license_link: {LICENSE_FILE}",
            "library_name: gptoss",
            "tags: [gpt-oss, gptoss]",
            "---",
            "",
            f"# {config.name}",
            "",
            self.description,
            "",
            "## Model",
            "",
            "| | |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
            "",
            "## Training data",
            "",
            self.training_data,
            "",
        ]
        if self.evaluation:
            lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in self.evaluation.items()]
            lines.append("")
        if self.notes:
            lines += ["## Notes", "", self.notes, ""]
        lines += [
            "## License",
            "",
            f"{self.license_name}, with use restrictions: see [{LICENSE_FILE}]({LICENSE_FILE}).",
            "",
            "## Configuration",
            "",
            "```json",
            json.dumps(config.to_hf(), indent=2),
            "```",
            "",
        ]
        return "\n".join(lines)


def write_card(directory: Path, config: ModelConfig, card: ModelCard | None = None) -> None:
    """Write README.md and LICENSE into `directory`."""
    card = card or ModelCard()
    (directory / CARD_FILE).write_text(card.render(config))
    (directory / LICENSE_FILE).write_text(LICENSE_NOTICE)


def read_license_name(directory: str | Path) -> str | None:
    """The `license_name` (else `license`) of a checkpoint's model card front matter, if any."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    values = dict(line.split(":", 1) for line in front.splitlines() if ":" in line)
    values = {k.strip(): v.strip() for k, v in values.items()}
    return values.get("license_name") or values.get("license")
