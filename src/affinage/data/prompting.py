"""How a run turns examples into prompt tokens: its template, system message and length limit.

Training, evaluation, prediction and export all take a :class:`Prompting` built from the
run's config, so the prompt is the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from affinage.config import Config
from affinage.data.formats import Example
from affinage.data.template import encode_prompt, fit_prompt


@dataclass
class Prompting:
    template: str | None = None
    system: str | None = None
    max_len: int = 512

    @classmethod
    def from_config(cls, config: Config) -> Prompting:
        return cls(template=config.prompt.template, system=config.prompt.system, max_len=config.trainer.max_seq_len)

    def prompt_budget(self, reserve: int = 0) -> int:
        """Prompt tokens kept when ``reserve`` tokens are to be generated after it."""
        # Generation may run past max_len (the model's context is longer); never starve the prompt.
        return max(self.max_len - reserve, self.max_len // 2)

    def prompt_ids(self, tokenizer: Any, example: Example, reserve: int = 0) -> list[int]:
        ids = encode_prompt(tokenizer, example, self.template, self.system)
        return fit_prompt(ids, self.prompt_budget(reserve))
