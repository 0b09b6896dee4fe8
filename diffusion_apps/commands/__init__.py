"""Our subcommands besides LightningCLI's own, one module each: thin functions that parse their
typed arguments (jsonargparse reads the signature), load checkpoints, call the methods' public
API and write files. Shared helpers: :mod:`diffusion_apps.commands.common`.

A new command is a module here with one typed function, added to :data:`COMMANDS`.
"""

from collections.abc import Callable

from diffusion_apps.commands.autoencode import autoencode
from diffusion_apps.commands.data import Data
from diffusion_apps.commands.evaluate import evaluate
from diffusion_apps.commands.export import export
from diffusion_apps.commands.import_checkpoint import import_checkpoint
from diffusion_apps.commands.sample import sample

COMMANDS: dict[str, Callable] = {
    "sample": sample,
    "eval": evaluate,
    "autoencode": autoencode,
    "import": import_checkpoint,
    "export": export,
    "data": Data,
}

__all__ = ["COMMANDS", "autoencode", "evaluate", "export", "import_checkpoint", "sample"]
