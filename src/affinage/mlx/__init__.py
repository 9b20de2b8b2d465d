"""mlx-lm's way of asking for a run: ``mlx_lm.lora``'s flags and its ``-c`` YAML, as an affinage config.

Seed 003 trains with ``mlx_lm.lora --train --model M --data data --batch-size 2`` and no config
file; ``affinage train --train --model M --data data --batch-size 2`` takes the same command. The
names are mlx-lm's (``mlx_lm/lora.py``: its argparse and ``CONFIG_DEFAULTS``, ``mlx_lm/tuner``).
A command that tunes mlx-lm's recipe (``--iters``, ``--learning-rate``, ``--num-layers``,
``--optimizer``, or the -c YAML's ``lora_parameters``/``lr_schedule``) gets the rest of mlx-lm's
recipe with it (rank 8, scale 20, the last 16 blocks, Adam at a constant 1e-5, 1000 iterations of
batch 4, no clipping): its numbers were chosen against those. A command that only says which data,
model and batch (seed 003's) gets affinage's defaults, the schema's, tuned for the CPU. A flag or
key with no honest equivalent is refused, saying what it does in mlx-lm and what to use instead.
Like ``ludwig``, this sits beside the schema and knows nothing above it.
"""

from affinage.mlx.command import notes, run_directory, train_config
from affinage.mlx.flags import add_mlx_flags, given_flags, read_mlx_yaml
from affinage.mlx.translate import translate_mlx

__all__ = ["add_mlx_flags", "given_flags", "notes", "read_mlx_yaml", "run_directory", "train_config", "translate_mlx"]
